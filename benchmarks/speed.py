"""Seconds per slice on this CPU: the score reconstruction's engines against FISTA-TV.

A real held-out CT slice at 128² (the protocol's grid twice as fine, 23 views, Gaussian noise
0.5 %), reconstructed by FISTA-TV (its weight tuned on 2 validation slices) and by ct-default
with the fast sampler at the card's settings (100 NFE), under each engine:

* torch fp32, torch with bf16 autocast (what the workers run where the CPU has bf16 units,
  models.registry.bf16_is_fast), ONNX Runtime fp32 (models/onnx_score.py);
* K = 1 posterior sample and the card's K (posterior mean);
* fewer network evaluations (NFE_SWEEP) on the workers' engine.

Each row: seconds per slice (after one warm-up run), PSNR, and the ratio to FISTA-TV's time.
One run, one machine, in one process, so the rows compare. Not measured yet: 256² (the CT
prior is 128²) and batching slices.

Run: ``python benchmarks/speed.py [--slices 2]``. Writes docs/benchmarks/speed.{md,json,png}.
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

from models.inverse import Prior, ReconConfig, reconstruct  # noqa: E402
from models.metrics import psnr  # noqa: E402
from models.onnx_score import available  # noqa: E402
from models.protocol import classical, fine_slices, simulate, tune_classical  # noqa: E402
from models.registry import bf16_is_fast  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
MODEL, TASK, VIEWS, NOISE = "ct-default", "ct-sparse", 23, "gaussian:0.005"
NFE_SWEEP = (50, 25)  # besides the card's 100


def timed(fn, repeats: int = 1):
    """(result, seconds per call) after one warm-up call."""
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - t) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=2, help="test slices (seconds averaged)")
    args = parser.parse_args()
    val = simulate(fine_slices("ct", "val", 128, 2), TASK, VIEWS, NOISE, seed=1)
    weight, _ = tune_classical(val, "ct")
    test = simulate(fine_slices("ct", "test", 128, args.slices), TASK, VIEWS, NOISE, seed=2)
    rows = []

    def measure(name: str, solve) -> None:
        seconds, scores = [], []
        for i in range(len(test.y)):
            image, s = timed(lambda i=i: solve(i))
            seconds.append(s)
            scores.append(psnr(image.clamp(0, 1), test.reference[i]))
        rows.append(
            {"method": name, "seconds": statistics.fmean(seconds), "psnr": statistics.fmean(scores)}
        )
        print(f"  {name}: {rows[-1]['seconds']:.1f} s, {rows[-1]['psnr']:.2f} dB", flush=True)

    measure(
        f"FISTA-TV (weight {weight})",
        lambda i: classical(
            type(test)(test.operator, test.y[i : i + 1], test.reference, test.noise),
            "ct",
            weight,
        )[0],
    )
    engines = [("torch fp32", {}), ("torch bf16", {"bf16": True})]
    if available():
        engines.append(("ONNX Runtime fp32", {"backend": "onnx"}))
    default = ReconConfig.for_prior(Prior.load(MODEL), "ct")  # what a user gets
    card_k = default.samples
    for label, kw in engines:
        prior = Prior.load(MODEL, **kw)
        config = ReconConfig.for_prior(prior, "ct")
        for k in sorted({1, card_k}):
            measure(
                f"score, {label}, K = {k}",
                lambda i, p=prior, c=config, k=k: reconstruct(
                    test.operator, test.y[i : i + 1], p, c, k, i
                ).mean[0],
            )
    # Fewer network evaluations on the engine the workers pick here (bf16 where fast).
    engine = {"bf16": bf16_is_fast()}
    prior = Prior.load(MODEL, **engine)
    for nfe in NFE_SWEEP:
        config = ReconConfig.for_prior(prior, "ct", nfe=nfe)
        for k in sorted({1, card_k}):
            measure(
                f"score, {prior.engine}, K = {k}, {nfe} NFE",
                lambda i, c=config, k=k: reconstruct(
                    test.operator, test.y[i : i + 1], prior, c, k, i
                ).mean[0],
            )
    tv = rows[0]["seconds"]
    for row in rows:
        row["ratio"] = row["seconds"] / tv
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    result = {
        "machine": machine,
        "slices": len(test.y),
        "nfe": default.n_steps * default.nfe_per_step(),
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
    }
    (DOCS / "speed.json").write_text(json.dumps(result, indent=2))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1))
    ax.barh([r["method"] for r in rows][::-1], [r["seconds"] for r in rows][::-1])
    ax.set_xlabel("seconds per 128² slice")
    ax.set_title(f"{machine}: score reconstruction engines vs FISTA-TV")
    fig.tight_layout()
    fig.savefig(DOCS / "speed.png", dpi=90)
    lines = [
        "# Speed: seconds per slice on this CPU",
        "",
        f"Measured by `python benchmarks/speed.py` on {machine} ({result['date']}): "
        f"{len(test.y)} real held-out CT test slice(s) at 128², {VIEWS} views, Gaussian noise "
        f"0.5 %, `{MODEL}` with the fast sampler at its card's settings ({result['nfe']} NFE), "
        "FISTA-TV with its weight tuned on 2 validation slices. Seconds per slice after one "
        "warm-up run; ratio to FISTA-TV's time. The workers run the network in bf16 where the "
        f"CPU has bf16 units (here: {'yes' if bf16_is_fast() else 'no'}).",
        "",
        "| method | s / slice | × FISTA-TV | PSNR (dB) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['seconds']:.1f} | {r['ratio']:.1f} | {r['psnr']:.2f} |" for r in rows
    ]
    lines += ["", "![speed](speed.png)", ""] + findings(rows, card_k, prior.engine)
    (DOCS / "speed.md").write_text("\n".join(lines))


def findings(rows: list[dict], k: int, engine: str) -> list[str]:
    """What the table says about each speed-up against the issue's 0.2 dB rule."""
    by = {r["method"]: r for r in rows}
    default = by[f"score, {engine}, K = {k}"]
    out = ["What the table says:", ""]
    fp32, bf16 = by[f"score, torch fp32, K = {k}"], by[f"score, torch bf16, K = {k}"]
    out.append(
        f"- bf16 against fp32 at K = {k}: {bf16['psnr'] - fp32['psnr']:+.2f} dB, "
        f"{1 - bf16['seconds'] / fp32['seconds']:.0%} less time; the workers use it where the "
        "CPU has bf16 units (`SCORERECON_BF16`, unset: `models.registry.bf16_is_fast`)."
    )
    for nfe in NFE_SWEEP:
        row = by[f"score, {engine}, K = {k}, {nfe} NFE"]
        keep = "within" if default["psnr"] - row["psnr"] < 0.2 else "beyond"
        out.append(
            f"- {nfe} NFE at K = {k}: {row['psnr'] - default['psnr']:+.2f} dB against the card's "
            f"100, {row['ratio']:.1f}× FISTA-TV's time ({keep} the 0.2 dB rule)."
        )
    out += [
        "- K = 1 draws no posterior std, so the card's K stays the default; a client may ask "
        "for fewer NFE or samples per job.",
        "",
        "Volumes (a stack per job, TV across slices): docs/benchmarks/volume.md.",
        "",
    ]
    return out


if __name__ == "__main__":
    main()
