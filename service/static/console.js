// scorerecon console: live job state, window/level, zoom and synchronised pan.
// No dependencies; everything it fetches comes from this gateway's /ui routes.
// Only GETs today. A POST by fetch must send the page's CSRF token, as the forms do:
//   headers: { "X-CSRF-Token": document.querySelector('meta[name="csrf-token"]').content }
// (the console's Content-Security-Policy runs no inline script: code goes in this file).
"use strict";

function pct(fraction) { return Math.round(100 * fraction) + " %"; }

// Job list: refresh state and progress of every row once a second.
function liveJobs(table) {
  const url = table.dataset.live;
  async function tick() {
    try {
      const r = await fetch(url, { credentials: "same-origin" });
      if (r.ok) {
        const data = await r.json();
        const body = table.querySelector("tbody");
        const known = new Set([...body.querySelectorAll("tr[data-id]")].map(tr => tr.dataset.id));
        for (const job of data.items) {
          if (!known.has(job.id)) { location.reload(); return; }
          const tr = body.querySelector(`tr[data-id="${job.id}"]`);
          const st = tr.querySelector(".state");
          st.textContent = job.state;
          st.className = "state state-" + job.state;
          tr.querySelector("progress").value = job.progress.fraction;
          tr.querySelector(".pct").textContent = pct(job.progress.fraction);
        }
      }
    } catch (e) { /* the gateway may restart; try again */ }
    setTimeout(tick, 1000);
  }
  setTimeout(tick, 1000);
}

// Job page: poll until the job is final, then reload to show the results.
function liveJob(box) {
  const final = ["succeeded", "failed", "cancelled"];
  if (final.includes(box.dataset.state)) return;
  async function tick() {
    try {
      const r = await fetch(`/ui/jobs/${box.dataset.id}/state`, { credentials: "same-origin" });
      if (r.ok) {
        const job = await r.json();
        document.getElementById("job-state").textContent = job.state;
        document.getElementById("job-state").className = "state state-" + job.state;
        document.getElementById("job-progress").value = job.progress.fraction;
        document.getElementById("job-pct").textContent = pct(job.progress.fraction);
        document.getElementById("job-phase").textContent = job.progress.phase || "";
        if (final.includes(job.state)) { setTimeout(() => location.reload(), 300); return; }
      }
    } catch (e) { /* keep polling */ }
    setTimeout(tick, 700);
  }
  tick();
}

// Panels: float32 images drawn with a window (centre/width); raw panels use their own range.
const view = { scale: 1, x: 0, y: 0 };
const panels = [];

async function loadPanel(canvas) {
  const r = await fetch(canvas.dataset.src, { credentials: "same-origin" });
  if (!r.ok) { canvas.closest("figure").classList.add("missing"); return; }
  const [h, w] = r.headers.get("X-Shape").split(",").map(Number);
  const data = new Float32Array(await r.arrayBuffer());
  let lo = Infinity, hi = -Infinity;
  for (const v of data) { if (v < lo) lo = v; if (v > hi) hi = v; }
  const unit = r.headers.get("X-Unit");
  canvas.closest("figure").querySelector(".unit").textContent = unit ? `(${unit})` : "";
  canvas.width = w; canvas.height = h;
  const panel = { canvas, data, w, h, lo, hi, raw: "raw" in canvas.dataset };
  panels.push(panel);
  return panel;
}

function draw(panel, center, width) {
  const ctx = panel.canvas.getContext("2d");
  const img = ctx.createImageData(panel.w, panel.h);
  let lo = center - width / 2, hi = center + width / 2;
  if (panel.raw) { lo = panel.lo; hi = panel.hi > panel.lo ? panel.hi : panel.lo + 1; }
  const k = 255 / (hi - lo);
  for (let i = 0; i < panel.data.length; i++) {
    const g = Math.max(0, Math.min(255, (panel.data[i] - lo) * k));
    img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = g;
    img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  panel.canvas.dataset.drawn = "1";
}

function applyView() {
  for (const p of panels) {
    p.canvas.style.transform = `translate(${view.x}px, ${view.y}px) scale(${view.scale})`;
  }
}

async function comparison(box) {
  const canvases = [...box.querySelectorAll("canvas")];
  await Promise.all(canvases.map(loadPanel));
  const presets = [...document.querySelectorAll("button.preset")];
  function choose(btn) {
    presets.forEach(b => b.classList.toggle("active", b === btn));
    for (const p of panels) draw(p, Number(btn.dataset.center), Number(btn.dataset.width));
    box.dataset.window = btn.textContent;
  }
  presets.forEach(b => b.addEventListener("click", () => choose(b)));
  choose(presets.find(b => "default" in b.dataset) || presets[0]);
  let drag = null;
  for (const c of canvases) {
    const port = c.parentElement;
    port.addEventListener("wheel", e => {
      e.preventDefault();
      view.scale = Math.max(1, Math.min(16, view.scale * (e.deltaY < 0 ? 1.25 : 0.8)));
      applyView();
    }, { passive: false });
    port.addEventListener("mousedown", e => { drag = { x: e.clientX - view.x, y: e.clientY - view.y }; });
    port.addEventListener("dblclick", () => { view.scale = 1; view.x = view.y = 0; applyView(); });
  }
  window.addEventListener("mousemove", e => {
    if (!drag) return;
    view.x = e.clientX - drag.x; view.y = e.clientY - drag.y; applyView();
  });
  window.addEventListener("mouseup", () => { drag = null; });
  box.dataset.ready = "1";
}

// New reconstruction: spec presets.
function presets() {
  const spec = document.getElementById("spec");
  const size = () => Number(document.getElementById("size").value);
  document.getElementById("preset-ct").addEventListener("click", () => {
    spec.value = JSON.stringify({ modality: "ct", image_size: size(),
      n_views: Number(document.getElementById("views").value) });
  });
  document.getElementById("preset-mri").addEventListener("click", () => {
    spec.value = JSON.stringify({ modality: "mri", image_size: size(),
      mask: { kind: "equispaced", acceleration: Number(document.getElementById("accel").value) } });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const table = document.getElementById("jobs");
  if (table && table.dataset.live) liveJobs(table);
  const box = document.getElementById("job");
  if (box) liveJob(box);
  const grid = document.getElementById("panels");
  if (grid) comparison(grid);
  if (document.getElementById("preset-ct")) presets();
});
