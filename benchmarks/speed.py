"""Seconds per slice on this CPU: the score reconstruction's engines and solver against FISTA-TV.

Real held-out CT slices at 128² (the protocol's grid twice as fine, 23 views, Gaussian noise
0.5 %), reconstructed by FISTA-TV (its weight tuned on 2 validation slices) and by
ct-default with the fast sampler at the card's settings (its NFE and warm start), under
each engine:

* torch fp32, torch with bf16 autocast (what the workers run where the CPU has bf16 units,
  models.registry.bf16_is_fast), ONNX Runtime fp32 (models/onnx_score.py);
* K = 1 posterior sample and the card's K (posterior mean);
* the solver: the card's warm start against the previous default (from noise, 100 NFE),
  and half the card's NFE, on the workers' engine;
* 256² (``--sizes 128 256``): the same slices on a 256² grid (from a 512² one), FISTA-TV
  tuned there, and the 128² prior applied as its card says and the other ways (patch-wise,
  whole, whole with windowed attention: models/nets/patch.py), and with K = 2.

Each row: seconds per slice (after one warm-up run), PSNR, and the ratio to FISTA-TV's time
at the same size. One run, one machine, in one process, so the rows compare.

Run: ``python benchmarks/speed.py [--slices 2] [--sizes 128 256]``.
Writes docs/benchmarks/speed.{md,json,png}.
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

from models.inverse import Prior, ReconConfig, reconstruct  # noqa: E402
from models.metrics import psnr  # noqa: E402
from models.onnx_score import available  # noqa: E402
from models.protocol import classical, fine_slices, simulate, tune_classical  # noqa: E402
from models.registry import bf16_is_fast, bf16_speedup, cpu_key  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
MODEL, TASK, VIEWS, NOISE = "ct-default", "ct-sparse", 23, "gaussian:0.005"
CG_FEWER = 3  # a row with this many CG iterations per data-consistency step (the card: 5)


def timed(fn, repeats: int = 1):
    """(result, seconds per call) after one warm-up call."""
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - t) / repeats


APPLICATIONS = {  # a 128² prior on a larger image (benchmarks/larger_images.py)
    "patch-wise": (True, False),
    "whole": (False, False),
    "whole, windowed attention": (False, True),
}


def application(config: ReconConfig) -> tuple[bool, bool]:
    return (config.patch_wise, config.windowed_attention and not config.patch_wise)


def method(engine: str, k: int, cg: int, card_cg: int) -> str:
    """A score row's name: engine, K, and the CG iterations a step where not the card's."""
    return f"score, {engine}, K = {k}" + ("" if cg == card_cg else f", {cg} CG iterations a step")


def application_name(config: ReconConfig) -> str:
    return next(n for n, a in APPLICATIONS.items() if a == application(config))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=2, help="test slices (seconds averaged)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument(
        "--render", action="store_true", help="rewrite the doc from speed.json, measuring nothing"
    )
    args = parser.parse_args()
    if args.render:
        result = json.loads((DOCS / "speed.json").read_text())
        write_docs(result, ReconConfig.for_prior(Prior.load(MODEL), "ct"))
        return
    rows: list[dict] = []
    defaults: dict[int, dict] = {}  # K and CG iterations a user gets at each size
    default = ReconConfig.for_prior(Prior.load(MODEL), "ct")  # what a user gets
    card_k, card_nfe = default.samples, default.n_steps * default.nfe_per_step()
    for size in args.sizes:
        val = simulate(fine_slices("ct", "val", size, 2), TASK, VIEWS, NOISE, seed=1)
        weight, _ = tune_classical(val, "ct")
        test = simulate(fine_slices("ct", "test", size, args.slices), TASK, VIEWS, NOISE, 2)

        def measure(name: str, solve, is_default: bool = False, test=test, size=size) -> None:
            seconds, scores = [], []
            for i in range(len(test.y)):
                image, sec = timed(lambda i=i: solve(i))
                seconds.append(sec)
                scores.append(psnr(image.clamp(0, 1), test.reference[i]))
            row = {"size": size, "method": name, "seconds": statistics.fmean(seconds)}
            row["default"] = is_default  # what the workers run at this size
            rows.append(row | {"psnr": statistics.fmean(scores)})
            print(
                f"  {size}² {name}: {row['seconds']:.1f} s, {rows[-1]['psnr']:.2f} dB", flush=True
            )

        def score(prior: Prior, config: ReconConfig, k: int, test=test):
            return lambda i: reconstruct(
                test.operator, test.y[i : i + 1], prior, config, k, i
            ).mean[0]

        def one(i: int, test=test, weight=weight):
            return classical(
                type(test)(test.operator, test.y[i : i + 1], test.reference, test.noise),
                "ct",
                weight,
            )[0]

        measure(f"FISTA-TV (weight {weight})", one)
        engines = [("torch fp32", {}), ("torch bf16", {"bf16": True})]
        if available() and size == 128:
            engines.append(("ONNX Runtime fp32", {"backend": "onnx"}))
        if size != 128:  # engines compared once; at other sizes the workers' engine only
            engines = [(e, kw) for e, kw in engines if kw.get("bf16", False) == bf16_is_fast()]
        # What a user gets at this size: the card's K and CG iterations, or its ``larger``
        # values above the prior's size (benchmarks/larger_images.py chose them against the
        # time floor on validation slices).
        here = ReconConfig.for_prior(Prior.load(MODEL), "ct", operator=test.operator)
        defaults[size] = {"samples": here.samples, "cg_iters": here.cg_iters}
        k_here = here.samples
        for label, kw in engines:
            prior = Prior.load(MODEL, **kw)
            config = ReconConfig.for_prior(prior, "ct", operator=test.operator)
            workers = kw.get("bf16", False) == bf16_is_fast() and "backend" not in kw
            for k in sorted({1, k_here}) if size == 128 else (k_here,):
                name = method(label, k, config.cg_iters, default.cg_iters)
                measure(name, score(prior, config, k), workers and k == k_here)
            if size != 128:  # the other applications of the 128² prior than the card's
                for name, (patch_wise, windowed) in APPLICATIONS.items():
                    if (patch_wise, windowed) == application(config):
                        continue
                    other = ReconConfig.for_prior(prior, "ct", operator=test.operator)
                    other.patch_wise, other.windowed_attention = patch_wise, windowed
                    name = f"{method(label, k_here, other.cg_iters, default.cg_iters)}, {name}"
                    measure(name, score(prior, other, k_here))
                # The card's values at its trained size, and 2 samples: the cost ∝ K.
                more = {(card_k, default.cg_iters), (2, config.cg_iters)}
                for k, cg in sorted(more - {(k_here, config.cg_iters)}, reverse=True):
                    other = ReconConfig.for_prior(prior, "ct", operator=test.operator)
                    other.cg_iters = cg
                    measure(method(label, k, cg, -1), score(prior, other, k))
        # The solver's share, on the workers' engine: the previous default (from noise,
        # 100 NFE), half the card's NFE, fewer CG iterations in each map step.
        prior = Prior.load(MODEL, bf16=bf16_is_fast())
        if size != 128:
            continue
        for label, start, nfe in (
            ("from noise, 100 NFE", 1.0, 100),
            (f"start {default.start:g}, {card_nfe // 2} NFE", default.start, card_nfe // 2),
        ):
            config = ReconConfig.for_prior(prior, "ct", nfe=nfe)
            config.start = start
            measure(f"score, {prior.engine}, K = {card_k}, {label}", score(prior, config, card_k))
        config = ReconConfig.for_prior(prior, "ct")
        config.cg_iters = CG_FEWER
        measure(method(prior.engine, card_k, CG_FEWER, -1), score(prior, config, card_k))
    for row in rows:
        tv = next(r for r in rows if r["size"] == row["size"] and r["method"].startswith("FISTA"))
        row["ratio"] = row["seconds"] / tv["seconds"]
    machine = f"{platform.machine()} ({cpu_key()})"
    result = {
        "machine": machine,
        "slices": args.slices,
        "card": {"nfe": card_nfe, "start": default.start, "samples": card_k},
        "defaults_by_size": defaults,
        "bf16_speedup_probe": bf16_speedup(),
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
    }
    (DOCS / "speed.json").write_text(json.dumps(result, indent=2))
    write_docs(result, default)


def write_docs(result: dict, default: ReconConfig) -> None:
    """speed.png and speed.md from a run's results (``--render``: the stored ones)."""
    rows, machine, card = result["rows"], result["machine"], result["card"]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1))
    labels = [f"{r['size']}²: {r['method']}" for r in rows][::-1]
    ax.barh(labels, [r["seconds"] for r in rows][::-1])
    ax.set_xlabel("seconds per slice")
    ax.set_title(f"{machine}: score reconstruction vs FISTA-TV")
    fig.tight_layout()
    fig.savefig(DOCS / "speed.png", dpi=90)
    engine = next(r for r in rows if r["size"] == 128 and r["default"])["method"].split(", ")[1]
    per_size = "; ".join(
        f"{size}²: K = {d['samples']}, {d['cg_iters']} CG iterations a step"
        for size, d in result["defaults_by_size"].items()
    )
    lines = [
        "# Speed: seconds per slice on this CPU",
        "",
        f"Measured by `python benchmarks/speed.py` on {machine} ({result['date']}): "
        f"{result['slices']} real held-out CT test slice(s) at each size, {VIEWS} views, "
        f"Gaussian noise 0.5 %, simulated on a grid twice as fine; `{MODEL}` with the fast "
        f"sampler at its card's settings ({card['nfe']} NFE, warm start {default.start:g}, "
        f"K = {card['samples']}), "
        "FISTA-TV with its weight tuned on 2 validation slices at the same size. Seconds per "
        "slice after one warm-up run; ratio to FISTA-TV's time at that size. The workers run "
        "the network in bf16 where a probe measures it at least 1.2× faster than fp32 on the "
        f"CPU (`models.registry.bf16_speedup`; here {result['bf16_speedup_probe']:.2f}×, so "
        f"{engine}). Above 128² the 128² prior is applied "
        f"{application_name(default)} as its card says, with the card's K and CG iterations "
        f"for larger images ({per_size}: both chosen by "
        "benchmarks/larger_images.py on validation slices), and the other ways in the rows "
        "so named.",
        "",
        "| size | method | s / slice | × FISTA-TV | PSNR (dB) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['size']}² | {r['method']}{' **(default)**' if r['default'] else ''} | "
        f"{r['seconds']:.1f} | {r['ratio']:.1f} | "
        f"{r['psnr']:.2f} |"
        for r in rows
    ]
    lines += ["", "![speed](speed.png)", ""]
    lines += findings(rows, result["card"]["samples"], engine, default, result["card"]["nfe"])
    (DOCS / "speed.md").write_text("\n".join(lines))


def findings(rows: list[dict], k: int, engine: str, default: ReconConfig, nfe: int) -> list[str]:
    """What the table says about each speed-up against the issue's 0.2 dB rule."""
    by = {(r["size"], r["method"]): r for r in rows}
    card = next(r for r in rows if r["size"] == 128 and r["default"])
    out = ["What the table says:", ""]
    fp32, bf16 = by[128, f"score, torch fp32, K = {k}"], by[128, f"score, torch bf16, K = {k}"]
    out.append(
        f"- bf16 against fp32 at K = {k}: {bf16['psnr'] - fp32['psnr']:+.2f} dB, "
        f"{1 - bf16['seconds'] / fp32['seconds']:.0%} less time; the workers use it where the "
        "probe measures it faster (`SCORERECON_BF16`, unset: `models.registry.bf16_is_fast`)."
    )
    onnx = by.get((128, f"score, ONNX Runtime fp32, K = {k}"))
    if onnx is not None:
        out.append(
            f"- ONNX Runtime against torch fp32 at K = {k}: "
            f"{1 - onnx['seconds'] / fp32['seconds']:.0%} less time; "
            f"{onnx['seconds'] / bf16['seconds']:.2f}× torch bf16's time. The workers run "
            "torch (the ONNX graph is fixed to the global attention it was traced with)."
        )
    single = by.get((128, f"score, {engine}, K = 1"))
    if single is not None:
        out.append(
            f"- Batching: the K = {k} posterior samples go through the network together, one "
            f"forward pass a step, so they cost {card['seconds'] / single['seconds']:.1f}× one "
            f"sample's time, not {k}× ({card['psnr'] - single['psnr']:+.2f} dB for their "
            "mean, and a posterior std); the workers batch a volume's slices the same way."
        )
    noise = by[128, f"score, {engine}, K = {k}, from noise, 100 NFE"]
    out.append(
        f"- The warm start (start {default.start:g}, {nfe} NFE) against the previous default "
        f"(from noise, 100 NFE): {card['psnr'] - noise['psnr']:+.2f} dB, "
        f"{noise['seconds'] / card['seconds']:.1f}× faster "
        f"({'within' if noise['psnr'] - card['psnr'] < 0.2 else 'beyond'} the 0.2 dB rule)."
    )
    half = by[128, f"score, {engine}, K = {k}, start {default.start:g}, {nfe // 2} NFE"]
    out.append(
        f"- {nfe // 2} NFE at the same start: {half['psnr'] - card['psnr']:+.2f} dB against the "
        f"card's {nfe}, {half['ratio']:.1f}× FISTA-TV's time "
        f"({'within' if card['psnr'] - half['psnr'] < 0.2 else 'beyond'} the 0.2 dB rule)."
    )
    cg = by.get((128, method(engine, k, CG_FEWER, -1)))
    if cg is not None:
        out.append(
            f"- {CG_FEWER} CG iterations per data-consistency step instead of "
            f"{default.cg_iters}: {cg['psnr'] - card['psnr']:+.2f} dB, "
            f"{1 - cg['seconds'] / card['seconds']:.0%} less time (the card keeps "
            f"{default.cg_iters} at its trained size; benchmarks/larger_images.py chooses K "
            "and CG iterations for larger images on validation slices)."
        )
    tv128 = next(r for (s, m), r in by.items() if s == 128 and m.startswith("FISTA"))
    out.append(
        f"- The default reconstruction at 128²: {card['ratio']:.1f}× FISTA-TV's time per slice "
        f"(aim ≤ 1×, floor ≤ 3×), {card['psnr'] - tv128['psnr']:+.2f} dB."
    )
    for size in sorted({r["size"] for r in rows} - {128}):
        mine = next((r for r in rows if r["size"] == size and r["default"]), None)
        tv = next(r for (s, m), r in by.items() if s == size and m.startswith("FISTA"))
        if mine is None:
            continue
        out.append(
            f"- The default reconstruction at {size}² ({mine['method'].split(', ', 2)[-1]}): "
            f"{mine['ratio']:.1f}× FISTA-TV's time (aim ≤ 1×, floor ≤ 3×), "
            f"{mine['psnr'] - tv['psnr']:+.2f} dB."
        )
        for other in rows:
            if other["size"] != size or other is mine or other is tv:
                continue
            out.append(
                f"- At {size}², {other['method'].split(', ', 2)[-1]} instead: "
                f"{other['psnr'] - mine['psnr']:+.2f} dB, "
                f"{other['seconds'] / mine['seconds']:.2f}× the time, "
                f"{other['ratio']:.1f}× FISTA-TV's (floor ≤ 3×)."
            )
    out += [
        "- K = 1 draws no posterior std, so the card's K stays the default; a client may ask "
        "for fewer NFE or samples per job.",
        "",
    ]
    return out + volumes()


def volumes() -> list[str]:
    """The volume measurements, read from their own benchmarks' results (each names its
    date and machine): a 64-slice volume through the gateway, and TV across slices."""
    out = ["## Volumes", ""]
    gateway, ztv = DOCS / "volume_gateway.json", DOCS / "volume.json"
    if gateway.exists():
        g = json.loads(gateway.read_text())
        tv, score = g["rows"][0], g["rows"][-1]
        out += [
            f"- **{g['slices']} slices through the gateway as one job** "
            f"(`benchmarks/volume_gateway.py`, {g['date']}, {g['workers']} Celery workers, "
            f"slabs of {g['slab_slices']}): {score['seconds_per_slice']:.1f} s a slice "
            f"against FISTA-TV's {tv['seconds_per_slice']:.1f} s, {score['psnr']:.2f} dB "
            f"against {tv['psnr']:.2f} dB, z-difference error {score['z_error']:.4f} against "
            f"{tv['z_error']:.4f}; one DICOM series of {max(g['dicom'].values())} instances "
            "per output, progress in slices done (docs/benchmarks/volume_gateway.md, with "
            "its sagittal picture).",
        ]
    if ztv.exists():
        z = json.loads(ztv.read_text())
        rows = {r["method"]: r for r in z["rows"]}
        alone, coupled = rows["score, slice by slice"], rows["score + z-TV"]
        out += [
            f"- **z-consistency** (`benchmarks/volume.py`, {z['date']}, {z['slices']} "
            f"contiguous test slices): TV across slices (λ_z {z['lambda_z']:.4g}, chosen on "
            f"validation) {coupled['psnr'] - alone['psnr']:+.2f} dB and z-difference error "
            f"{alone['z_error']:.4f} → {coupled['z_error']:.4f}, at "
            f"{coupled['seconds_per_slice'] / alone['seconds_per_slice']:.1f}× the time; off "
            "by default (docs/benchmarks/volume.md).",
        ]
    return out + [""]


if __name__ == "__main__":
    main()
