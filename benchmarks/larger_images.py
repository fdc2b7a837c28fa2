"""Images larger than the prior: its network applied patch-wise or to the whole image.

The bundled priors are whole-image NCSN++ networks trained at 128². Clinical CT is 256² to
512², and fastMRI's reconstruction matrix 320². The solver can apply such a prior to a
larger image in two ways (ReconConfig.patch_wise, models/nets/patch.py ``tiled_score``):

* patch-wise: the image cut into 128² tiles of a randomly shifted partition at every
  evaluation (the network sees tiles of its trained size, the seams move);
* whole: the network is fully convolutional, so it takes the whole image in one evaluation
  (padded to a multiple of its downsampling), with no seams, at the cost of seeing anatomy
  at another scale than it was trained on;
* whole, windowed attention: the same, its attention layers attending within windows of the
  span they were trained on (models.nets.ncsnpp.ATTENTION_WINDOW), at 1/k² of their cost
  for an image k times the prior's side.

This script measures both on real validation slices at ``--size`` (the protocol: a grid
twice as fine, realistic noise), with everything else at the card's defaults (sampler,
warm start, NFE, K posterior samples), and chooses per card: the higher PSNR, or the faster
where they are within ``MAX_LOSS`` dB. ``--write-card`` stores the choice as the card's
``patch_wise`` and ``windowed_attention`` (the solver's defaults for that modality).

A larger image costs the network more per evaluation (4× the pixels at 256²), so the
card's K posterior samples may cost more than the issue's floor allows at that size
(``FLOOR`` × FISTA-TV's time on the same slices, timed here with its weight tuned on
them, less a ``MARGIN`` for run-to-run timing noise). The script then times fewer samples
(down to 2, the fewest that give a posterior std) and fewer CG iterations per
data-consistency step in the chosen application, and keeps the highest PSNR within that
time (the fastest where none fits); ``--write-card`` stores it as ``larger`` →
``samples`` and ``cg_iters``, which ``ReconConfig.for_prior`` applies to images larger than
the prior.

Run: ``python benchmarks/larger_images.py [--tasks ct mri] [--n-val 2] [--size 256]
[--write-card]``. Writes docs/benchmarks/larger_images.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from models.inverse import Prior, ReconConfig, reconstruct  # noqa: E402
from models.metrics import psnr, ssim  # noqa: E402
from models.protocol import classical, fine_slices, simulate, tune_classical  # noqa: E402
from models.registry import BUNDLED, bf16_is_fast, update_card  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
TASKS = {  # the tasks the cards were tuned on (benchmarks/quality_real.py)
    "ct": ("ct-sparse", 23, "gaussian:0.005", "ct-default"),
    "mri": ("mri", 8, "complex:0.01", "mri-default"),
}
# application → (ReconConfig.patch_wise, ReconConfig.windowed_attention)
MODES = {
    "patch-wise": (True, False),
    "whole": (False, False),
    "whole, windowed attention": (False, True),
}
MAX_LOSS = 0.2  # dB within which the faster application is chosen
FLOOR = 3.0  # × FISTA-TV's seconds per slice: the most a default reconstruction may take
# A choice must fit the floor by this factor: timings vary by ~10 % from run to run (K = 3
# took 2.85× FISTA-TV's time on validation here, 3.09× on the test slices in speed.py).
MARGIN = 0.9
FEWER_CG = 3  # the other CG iteration count per data-consistency step tried (the card: 5)


def evaluate(
    prior: Prior,
    val,
    modality: str,
    mode: tuple[bool, bool],
    samples: int | None = None,
    cg_iters: int | None = None,
) -> dict:
    """Mean PSNR, SSIM, seconds per slice, the first slice's mean image; ``samples``: K and
    ``cg_iters`` (default the card's at its trained size)."""
    config = ReconConfig.for_prior(prior, modality)
    config.patch_wise, config.windowed_attention = mode
    config.cg_iters = cg_iters or config.cg_iters
    scores, structure, seconds, first = [], [], [], None
    for i in range(len(val.y)):
        t0 = time.perf_counter()
        rec = reconstruct(val.operator, val.y[i : i + 1], prior, config, samples, i)
        seconds.append(time.perf_counter() - t0)
        image = rec.mean[0].clamp(0, 1)
        scores.append(psnr(image, val.reference[i]))
        structure.append(ssim(image, val.reference[i]))
        first = image[0] if first is None else first
    return {
        "psnr": statistics.fmean(scores),
        "ssim": statistics.fmean(structure),
        "seconds": statistics.fmean(seconds),
        "per_slice": scores,
        "image": first,
    }


def choose(rows: dict[str, dict]) -> str:
    """The higher PSNR; within MAX_LOSS dB of it, the faster."""
    best = max(r["psnr"] for r in rows.values())
    kept = [m for m, r in rows.items() if r["psnr"] >= best - MAX_LOSS]
    return min(kept, key=lambda m: rows[m]["seconds"])


def run(name: str, size: int, n_val: int, write_card: bool) -> dict:
    task, level, noise, model = TASKS[name]
    prior = Prior.load(model, bf16=bf16_is_fast())
    val = simulate(fine_slices(name, "val", size, n_val), task, level, noise, seed=1)
    config = ReconConfig.for_prior(prior, name)
    print(
        f"{name} at {size}²: {len(val.y)} validation slices, {prior.image_size}² prior, "
        f"K = {config.samples}, start {config.start}, {prior.engine}",
        flush=True,
    )
    rows = {}
    for mode, setting in MODES.items():
        rows[mode] = evaluate(prior, val, name, setting)
        r = rows[mode]
        print(f"  {mode}: {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, {r['seconds']:.1f} s")
    chosen = choose(rows)
    tv = fista_tv_seconds(val, name)
    print(f"  FISTA-TV: {tv['psnr']:.2f} dB, {tv['seconds']:.1f} s", flush=True)
    budget = FLOOR * MARGIN * tv["seconds"]
    options = {(config.samples, config.cg_iters): rows[chosen]}
    if rows[chosen]["seconds"] > budget:
        for k in range(config.samples, 1, -1):
            for cg in (config.cg_iters, FEWER_CG):
                if (k, cg) not in options:
                    options[k, cg] = r = evaluate(prior, val, name, MODES[chosen], k, cg)
                    print(f"  K = {k}, {cg} CG: {r['psnr']:.2f} dB, {r['seconds']:.1f} s")
    samples, cg_iters = choose_budget(options, budget)
    if write_card:
        recon = {**(prior.card.get("recon") or {})}
        recon[name] = {
            **recon.get(name, {}),
            "patch_wise": MODES[chosen][0],
            "windowed_attention": MODES[chosen][1],
            "patch_wise_tuned_by": f"benchmarks/larger_images.py ({len(val.y)} real val "
            f"slices at {size}², the higher PSNR, the faster within {MAX_LOSS} dB)",
            "larger": {
                "samples": samples,
                "cg_iters": cg_iters,
                "tuned_by": f"benchmarks/larger_images.py ({len(val.y)} real val slices at "
                f"{size}², K and CG iterations: the highest PSNR within {MARGIN:g} × "
                f"{FLOOR:g}× FISTA-TV's time)",
            },
        }
        update_card(BUNDLED / model, {"recon": recon})
    return {
        "task": f"{task} {level}, {noise}",
        "model": model,
        "size": size,
        "prior_size": prior.image_size,
        "samples": config.samples,
        "nfe": config.n_steps * config.nfe_per_step(),
        "start": config.start,
        "val": len(val.y),
        "rows": rows,
        "reference": val.reference[0, 0],
        "chosen": chosen,
        "fista_tv": tv,
        "options": [
            {"samples": k, "cg_iters": cg} | {m: v for m, v in r.items() if m != "image"}
            for (k, cg), r in options.items()
        ],
        "larger": {"samples": samples, "cg_iters": cg_iters},
    }


def fista_tv_seconds(val, modality: str) -> dict:
    """FISTA-TV on these slices at its best weight for them: mean PSNR and seconds a slice."""
    weight, score = tune_classical(val, modality)
    t0 = time.perf_counter()
    for i in range(len(val.y)):
        classical(replace(val, y=val.y[i : i + 1]), modality, weight)
    return {"weight": weight, "psnr": score, "seconds": (time.perf_counter() - t0) / len(val.y)}


def choose_budget(options: dict[tuple[int, int], dict], budget: float) -> tuple[int, int]:
    """(K, CG iterations) with the highest PSNR among those within ``budget`` seconds a
    slice; the fastest where none is."""
    within = [o for o, r in options.items() if r["seconds"] <= budget]
    if not within:
        return min(options, key=lambda o: options[o]["seconds"])
    return max(within, key=lambda o: options[o]["psnr"])


def figure(results: dict) -> None:
    """Per task measured this run: the reference, then each mode, with a 2× close-up of the
    centre below."""
    results = {n: r for n, r in results.items() if "reference" in r}
    fig, axes = plt.subplots(
        2 * len(results), 1 + len(MODES), figsize=(3.2 * (1 + len(MODES)), 6.4 * len(results))
    )
    axes = axes.reshape(2 * len(results), -1)
    for row, res in enumerate(results.values()):
        panels = {"reference": (res["reference"], None)}
        panels |= {m: (r["image"], r["psnr"]) for m, r in res["rows"].items()}
        for col, (label, (image, score)) in enumerate(panels.items()):
            n = image.shape[-1]
            crop = image[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4]
            for ax, im in ((axes[2 * row, col], image), (axes[2 * row + 1, col], crop)):
                ax.imshow(im.float().numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
            title = label if score is None else f"{label}: {score:.2f} dB (mean)"
            axes[2 * row, col].set_title(f"{res['model']} {res['size']}²\n{title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(DOCS / "larger_images.png", dpi=80)


def render(results: dict, machine: str) -> str:
    lines = [
        "# Images larger than the prior: patch-wise or whole",
        "",
        f"Measured by `python benchmarks/larger_images.py` on {machine} "
        f"({time.strftime('%Y-%m-%d')}): each card's whole-image 128² prior applied to "
        "larger real validation slices patch-wise (a shifted partition into 128² tiles at "
        "every evaluation) or whole (one evaluation of the fully convolutional network; "
        "its attention over the whole image or within windows of the trained span), "
        "everything else at the card's defaults, under the evaluation protocol (grid twice "
        f"as fine, realistic noise). Chosen: the higher PSNR, the faster within {MAX_LOSS} "
        "dB; stored in the card as `patch_wise` and `windowed_attention`. Seconds are on this "
        "machine (docs/benchmarks/speed.md times the test slices against FISTA-TV).",
        "",
        "| task | model | size | K | start / NFE | application | PSNR (dB) | SSIM | s / slice |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results.values():
        for mode, r in res["rows"].items():
            mark = " (chosen)" if mode == res["chosen"] else ""
            lines.append(
                f"| {res['task']} | {res['model']} | {res['size']}² | {res['samples']} | "
                f"{res['start']} / {res['nfe']} | {mode}{mark} | {r['psnr']:.2f} | "
                f"{r['ssim']:.3f} | {r['seconds']:.1f} |"
            )
    lines += ["", f"{next(iter(results.values()))['val']} validation slices per task.", ""]
    timed = [res for res in results.values() if "options" in res]
    if timed:
        lines += [
            "Posterior samples K and CG iterations per data-consistency step at the larger "
            "size, in the chosen application: FISTA-TV timed on the same slices (its weight "
            f"tuned on them); kept, the highest PSNR within {MARGIN:g} × {FLOOR:g}× its time "
            "(the margin for run-to-run timing noise), stored as the card's `larger` → "
            "`samples`, `cg_iters` and applied to images larger than the prior.",
            "",
            "| model | size | method | PSNR (dB) | s / slice | × FISTA-TV |",
            "|---|---|---|---|---|---|",
        ]
        for res in timed:
            tv = res["fista_tv"]
            lines.append(
                f"| {res['model']} | {res['size']}² | FISTA-TV (weight {tv['weight']:g}) | "
                f"{tv['psnr']:.2f} | {tv['seconds']:.1f} | 1.0 |"
            )
            for o in res["options"]:
                kept = {"samples": o["samples"], "cg_iters": o["cg_iters"]} == res["larger"]
                lines.append(
                    f"| {res['model']} | {res['size']}² | score, K = {o['samples']}, "
                    f"{o['cg_iters']} CG{' (kept)' if kept else ''} | {o['psnr']:.2f} | "
                    f"{o['seconds']:.1f} | {o['seconds'] / tv['seconds']:.1f} |"
                )
        lines.append("")
    lines += ["![patch-wise and whole](larger_images.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--n-val", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--write-card", action="store_true")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    results = {n: run(n, args.size, args.n_val, args.write_card) for n in args.tasks}
    store = DOCS / "larger_images.json"
    if store.exists():  # tasks not re-run keep their last measurement (table only)
        kept = json.loads(store.read_text())
        results = {**{n: r for n, r in kept.items() if n not in results}, **results}
    DOCS.mkdir(parents=True, exist_ok=True)
    figure(results)
    plain = {
        n: {
            **{k: v for k, v in res.items() if k not in ("reference", "measured")},
            "rows": {
                m: {k: v for k, v in r.items() if k != "image"} for m, r in res["rows"].items()
            },
        }
        for n, res in results.items()
    }
    (DOCS / "larger_images.json").write_text(json.dumps(plain, indent=2))
    (DOCS / "larger_images.md").write_text(render(results, machine))


if __name__ == "__main__":
    main()
