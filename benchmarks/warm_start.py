"""Fewer network evaluations at equal quality: the fast sampler started from the data.

The score solver draws each posterior sample from pure noise at t = T (100 NFE by the
cards). Started instead at t₀ = ``start``·T from the forward-diffused least-squares image
(ReconConfig.start, come-closer-diffuse-faster), it spends its evaluations below t₀, where
the image is decided. This script measures, on the validation slices of each task (never
the test slices), with the card's other settings and its K posterior samples:

* PSNR, seconds per slice and the mean posterior std of each (start, NFE) pair of
  ``CANDIDATES``, against the card's full run (start 1, 100 NFE);
* the choice: the pair with the fewest NFE whose PSNR is within ``MAX_LOSS`` dB of the best
  (issue 22: keep the fastest path that loses < 0.2 dB), written into the card with
  ``--write-card``;
* for MR, then the intensity level of ``LEVELS`` with the best PSNR at that start and NFE
  (ReconConfig.intensity_level: the warm start begins from the image in that unit), also
  written into the card;
* then ρ, the map step's error scale, with the best PSNR at that start, NFE and level
  (the card's and one RHO_STEP either side, extended while an edge is best), also written
  into the card: the cards' ρ was chosen from noise at 100 NFE, at its grid's edge.

The posterior std column says how much narrower a warm start's spread is (it cannot cover
an error of the starting image larger than σ(t₀)).

Run: ``python benchmarks/warm_start.py [--tasks ct mri] [--n-val 3] [--write-card]``.
Writes docs/benchmarks/warm_start.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from models.inverse import Prior, ReconConfig, reconstruct, steps_for_nfe  # noqa: E402
from models.metrics import psnr  # noqa: E402
from models.protocol import simulate, validation_slices  # noqa: E402
from models.registry import BUNDLED, bf16_is_fast, update_card  # noqa: E402
from models.tuning import search_outward  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
TASKS = {  # the tasks the cards were tuned on (benchmarks/quality_real.py)
    "ct": ("ct-sparse", 23, "gaussian:0.005", "ct-default"),
    "mri": ("mri", 8, "complex:0.01", "mri-default"),
}
FULL = (1.0, 100)
CANDIDATES = ((0.6, 50), (0.5, 50), (0.4, 50), (0.3, 50), (0.5, 40), (0.4, 40), (0.4, 30))
MAX_LOSS = 0.2  # dB below the full run that a faster setting may lose
# MR: where a measurement's unit lands in the prior's range (ReconConfig.intensity_level),
# chosen at the chosen start, since the two interact (a warm start begins from that image)
LEVELS = {"mri": (0.6, 0.7, 0.8)}
# Then ρ (the map step's error scale r_t = ρ β/α) at that start, NFE and level: the card's,
# ×/÷ RHO_STEP, extended RHO_EXTEND times at most on the side where the edge is best. The
# cards' ρ was chosen at 100 NFE from noise (benchmarks/quality_real.py), at its grid's edge.
RHO_STEP, RHO_EXTEND = 1.6, 3
# ρ weighs the data against the prior's estimate by the noise level, and the card serves
# every noise model of its modality: ρ is chosen on the mean over the task's validation
# slices and these (CT: Poisson counts, as quality_real.py's ct-poisson measures; on the
# Gaussian task alone ρ 0.48 won by 0.08 dB and lost 0.20 dB on the Poisson test slices).
RHO_NOISES = {"ct": ("poisson:1e5",)}


def evaluate(
    prior: Prior,
    val,
    modality: str,
    start: float,
    nfe: int,
    level: float | None = None,
    rho: float | None = None,
) -> dict:
    """Mean PSNR, seconds per slice and mean posterior std over the validation slices (at
    intensity ``level`` and error scale ``rho``, or the card's)."""
    config = ReconConfig.for_prior(prior, modality)
    config.start, config.n_steps = start, steps_for_nfe(config, nfe)
    if level is not None:
        config.intensity_level = level
    if rho is not None:
        config.rho = rho
    scores, seconds, spread = [], [], []
    for i in range(len(val.y)):
        t0 = time.perf_counter()
        rec = reconstruct(val.operator, val.y[i : i + 1], prior, config, None, i)
        seconds.append(time.perf_counter() - t0)
        scores.append(psnr(rec.mean[0].clamp(0, 1), val.reference[i]))
        spread.append(float(rec.std.mean()))
    row = {
        "start": start,
        "nfe": nfe,
        "psnr": statistics.fmean(scores),
        "seconds": statistics.fmean(seconds),
        "std": statistics.fmean(spread),
        "per_slice": scores,
    }
    print(
        f"  start {start}, {nfe} NFE, "
        + (f"level {config.intensity_level:g}, " if modality in LEVELS else "")
        + f"ρ {config.rho:g}: "
        f"{row['psnr']:.2f} dB, "
        f"{row['seconds']:.1f} s, "
        f"std {row['std']:.4f}",
        flush=True,
    )
    return row


def choose(rows: list[dict]) -> dict:
    """The fewest NFE within MAX_LOSS dB of the best row (ties: the higher PSNR)."""
    best = max(r["psnr"] for r in rows)
    kept = [r for r in rows if r["psnr"] >= best - MAX_LOSS]
    return min(kept, key=lambda r: (r["nfe"], -r["psnr"]))


def run(name: str, n_val: int, write_card: bool) -> dict:
    task, level, noise, model = TASKS[name]
    prior = Prior.load(model, bf16=bf16_is_fast())
    # MR: with close-ups and coarse close-ups, as the test set holds such a volume
    val = simulate(validation_slices(name, prior.image_size, n_val), task, level, noise, seed=1)
    k = ReconConfig.for_prior(prior, name).samples
    print(f"{name}: {len(val.y)} validation slices, K = {k}, {prior.engine}", flush=True)
    rows = [evaluate(prior, val, name, *pair) for pair in (FULL, *CANDIDATES)]
    best = choose(rows)
    chosen = {"start": best["start"], "nfe": best["nfe"]}
    levels = {}
    if name in LEVELS:
        card_level = ReconConfig.for_prior(prior, name).intensity_level
        levels = {
            lv: best["psnr"]
            if lv == card_level
            else evaluate(prior, val, name, best["start"], best["nfe"], lv)["psnr"]
            for lv in LEVELS[name]
        }
        chosen["intensity_level"] = max(levels, key=levels.get)
    at = {"start": best["start"], "nfe": best["nfe"], "level": chosen.get("intensity_level")}
    noisy = [
        simulate(validation_slices(name, prior.image_size, n_val), task, level, other, seed=1)
        for other in RHO_NOISES.get(name, ())
    ]
    card_rho = ReconConfig.for_prior(prior, name).rho
    # At the card's ρ the task's own slices were measured above (the others were not).
    known = levels[chosen["intensity_level"]] if levels else best["psnr"]
    rhos = search_outward(
        lambda rho: statistics.fmean(
            evaluate(prior, v, name, **at, rho=rho)["psnr"] for v in (val, *noisy)
        ),
        (round(card_rho / RHO_STEP, 4), card_rho, round(card_rho * RHO_STEP, 4)),
        RHO_STEP,
        RHO_EXTEND,
        measured=None if noisy else {card_rho: known},
    )
    chosen["rho"] = max(rhos, key=lambda rho: (rhos[rho], rho == card_rho))  # ties: the card's
    if write_card:
        recon = {**(prior.card.get("recon") or {})}
        tuned = f"benchmarks/warm_start.py ({len(val.y)} real val slices"
        recon[name] = {
            **recon.get(name, {}),
            **chosen,
            "start_tuned_by": f"{tuned}, fewest NFE within {MAX_LOSS} dB of the best)",
            **({"intensity_level_tuned_by": f"{tuned}, the best at that start)"} if levels else {}),
            "rho_tuned_by": f"{tuned}, the best at that start, NFE and level"
            + "".join(f", mean with {other}" for other in RHO_NOISES.get(name, ()))
            + ")",
        }
        update_card(BUNDLED / model, {"recon": recon})
    return {
        "task": f"{task} {level}, {noise}",
        "model": model,
        "engine": prior.engine,
        "samples": k,
        "rows": rows,
        "chosen": chosen,
        "levels": {f"{lv:g}": v for lv, v in levels.items()},
        "rhos": {f"{rho:g}": v for rho, v in rhos.items()},
        "rho_noises": [noise, *RHO_NOISES.get(name, ())],
        "val": len(val.y),
        "date": time.strftime("%Y-%m-%d"),
    }


def figure(results: dict) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results.values(), strict=True):
        for r in res["rows"]:
            full = (r["start"], r["nfe"]) == FULL
            chosen = (r["start"], r["nfe"]) == (res["chosen"]["start"], res["chosen"]["nfe"])
            ax.scatter(r["seconds"], r["psnr"], c="k" if full else "C1" if chosen else "C0")
            ax.annotate(f"{r['start']}/{r['nfe']}", (r["seconds"], r["psnr"]), fontsize=8)
        ax.set_xlabel("seconds per slice")
        ax.set_ylabel("validation PSNR (dB)")
        ax.set_title(f"{res['model']}, K = {res['samples']} (start/NFE)")
    fig.tight_layout()
    fig.savefig(DOCS / "warm_start.png", dpi=90)


def render(results: dict, machine: str) -> str:
    lines = [
        "# Warm start: fewer NFE at the same validation quality",
        "",
        f"Measured by `python benchmarks/warm_start.py` on {machine}: the fast sampler "
        "started at t₀ = start·T from the forward-diffused least-squares "
        "image (`ReconConfig.start`), against the card's full run from noise (start 1, 100 "
        "NFE), each with the card's other settings and K posterior samples, on real "
        "validation slices simulated under the evaluation protocol (MR: with their close-ups "
        "and coarse close-ups, models.protocol.validation_slices). Chosen: the fewest NFE "
        f"within {MAX_LOSS} dB of the best. Seconds are on this machine, not a timing "
        "benchmark (docs/benchmarks/speed.md times the test slices).",
        "",
    ]
    for name, res in results.items():
        full = res["rows"][0]
        lines += [
            f"## {name}: {res['task']}, `{res['model']}`"
            + (f" ({res['engine']})" if res.get("engine") else "")
            + f", K = {res['samples']}, "
            f"{res['val']} validation slices ({res['date']})",
            "",
            "| start | NFE | PSNR (dB) | Δ full (dB) | s / slice | mean posterior std |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            lines.append(
                f"| {r['start']} | {r['nfe']} | {r['psnr']:.2f} | {r['psnr'] - full['psnr']:+.2f}"
                f" | {r['seconds']:.1f} | {r['std']:.4f} |"
            )
        c = res["chosen"]
        lines += ["", f"Chosen: start {c['start']}, {c['nfe']} NFE.", ""]
        if res.get("levels"):
            measured = ", ".join(f"{lv}: {v:.2f} dB" for lv, v in res["levels"].items())
            lines += [
                f"Intensity level at that start and NFE (mean validation PSNR): {measured}; "
                f"chosen: {c['intensity_level']:g}.",
                "",
            ]
        if res.get("rhos"):
            measured = ", ".join(f"{rho}: {v:.2f} dB" for rho, v in res["rhos"].items())
            noises = res.get("rho_noises") or []
            over = f" over {' and '.join(noises)}" if len(noises) > 1 else ""
            lines += [
                f"ρ at that start, NFE and level (mean validation PSNR{over}): {measured}; "
                f"chosen: {c['rho']:g}.",
                "",
            ]
    lines += ["![warm start](warm_start.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--n-val", type=int, default=3)
    parser.add_argument("--write-card", action="store_true")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    store = DOCS / "warm_start.json"
    # Tasks not run keep their earlier results (each section says its own date).
    results = json.loads(store.read_text()) if store.exists() else {}
    for name in args.tasks:
        results[name] = run(name, args.n_val, args.write_card)
    DOCS.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(results, indent=2))
    figure(results)
    (DOCS / "warm_start.md").write_text(render(results, machine))


if __name__ == "__main__":
    main()
