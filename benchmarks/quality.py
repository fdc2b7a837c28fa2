"""Reconstruction quality of the bundled priors against the classical methods.

Writes docs/benchmarks/quality.md and its PNGs:

1. Sparse-view CT (10/20/23/45 views) on held-out phantoms (seed 1; the prior trained on
   seed 0): FBP, FISTA-TV, score-based PC and fast samplers; undersampled MRI (4×/8×/24×):
   zero-filled, CS-TV, score-based, when ``mri-default`` is bundled. PSNR/SSIM with data
   range 1 on the model's [0, 1] intensities.
2. Calibration: the fraction of pixels whose error lies within ±2 posterior standard
   deviations (K posterior samples), per task.
3. NFE against PSNR at 23 views for the PC, ALD and fast samplers.
4. Seconds per 128² and 256² slice per sampler step on this CPU, fp32 and bf16 (a `small`
   network; time per NFE does not depend on the weights).

Run: ``python benchmarks/quality.py [--n 4]`` (about 25 minutes on 2 cores with n = 4).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from models.evaluate import evaluate, figures, table  # noqa: E402
from models.inverse import Prior  # noqa: E402
from models.nets.ncsnpp import build  # noqa: E402
from models.phantoms import ct_phantoms, mri_phantoms  # noqa: E402
from models.registry import bundled_models, load_card, score_fn_of  # noqa: E402
from models.sde import VESDE  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
NFE = {"score-pc": 400, "score-fast": 100}


def quality(prior: Prior, task: str, levels: list[int], images, methods, k: int):
    """Rows and example images; the fast sampler draws K samples (the calibration)."""
    rows, examples = [], {}
    for m in methods:
        k_m = k if m == "score-fast" else 1
        r, ex = evaluate(images, task, levels, [m], prior, NFE.get(m, 100), k_m)
        rows += r
        examples.update(ex)
    return rows, examples


def nfe_curve(prior: Prior, images, budgets: list[int]) -> dict:
    curves = {}
    for sampler in ("pc", "ald", "fast"):
        pts = []
        for nfe in budgets:
            r, _ = evaluate(images, "ct-sparse", [23], [f"score-{sampler}"], prior, nfe)
            pts.append((r[0]["nfe"], r[0]["psnr"]))
        curves[sampler] = pts
    return curves


def timing() -> list[dict]:
    rows = []
    for size in (128, 256):
        sde = VESDE(0.01, 50.0)
        net = build("small", sde.sigma)
        for bf16 in (False, True):
            score = score_fn_of(net, sde, bf16=bf16)
            x = torch.randn(1, 1, size, size)
            t = torch.full((1,), 0.5)
            score(x, t)
            t0 = time.perf_counter()
            n = 10
            for _ in range(n):
                score(x, t)
            per = (time.perf_counter() - t0) / n
            rows.append(
                {
                    "size": size,
                    "precision": "bf16" if bf16 else "fp32",
                    "ms_per_nfe": 1000 * per,
                    "s_fast_100": 100 * per,
                    "s_pc_1000": 1000 * per,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4, help="held-out images per task")
    parser.add_argument("--samples", type=int, default=8, help="K for the calibration")
    parser.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200, 400])
    args = parser.parse_args()
    DOCS.mkdir(parents=True, exist_ok=True)
    available = bundled_models()
    lines = [
        "# Reconstruction quality",
        "",
        f"Measured by `python benchmarks/quality.py --n {args.n}` on {platform.machine()} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}). PSNR/SSIM: data range "
        "1 on the model's [0, 1] intensities (CT: (HU + 1000) / 4000), mean ± std over the "
        f"images. NFE: score-pc {NFE['score-pc']}, score-fast {NFE['score-fast']} "
        f"(K = {args.samples} posterior samples, whose mean is scored).",
        "",
    ]
    results: dict = {}
    if "ct-default" in available:
        prior = Prior.load("ct-default")
        card = load_card("ct-default")
        steps = card.get("total_steps", card.get("steps"))
        images = ct_phantoms(args.n, prior.image_size, seed=1)
        levels = [10, 20, 23, 45]
        methods = ["fbp", "fista-tv", "score-pc", "score-fast"]
        rows, ex = quality(prior, "ct-sparse", levels, images, methods, args.samples)
        paths = figures(rows, ex, images, "ct-sparse", DOCS, "sparse-view CT, held-out phantoms")
        lines += [
            f"## Sparse-view CT, `ct-default` ({steps} training steps)",
            "",
            f"{args.n} held-out phantoms (seed 1), parallel beam, noiseless.",
            "",
            table(rows, "ct-sparse"),
            "",
            *[f"![{p.stem}]({p.name})" for p in paths],
            "",
        ]
        results["ct-sparse"] = rows
        curves = nfe_curve(prior, images[:2], args.budgets)
        results["nfe_curve"] = curves
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, pts in curves.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("PSNR (dB), 23 views")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(DOCS / "quality_nfe.png", dpi=110)
        plt.close(fig)
        lines += [
            f"## NFE against PSNR (23 views, {min(2, len(images))} held-out phantoms)",
            "",
            "| sampler | " + " | ".join(f"NFE {p[0]}" for p in curves["fast"]) + " |",
            "|---" * (1 + len(curves["fast"])) + "|",
        ]
        for name, pts in curves.items():
            lines.append(f"| {name} | " + " | ".join(f"{p[1]:.2f} dB ({p[0]})" for p in pts) + " |")
        lines += ["", "![nfe](quality_nfe.png)", ""]
    else:
        lines += ["`ct-default` is not bundled yet: no CT score results.", ""]
    if "mri-default" in available:
        prior = Prior.load("mri-default")
        images = mri_phantoms(args.n, prior.image_size, seed=1)
        methods = ["zero-filled", "cs-tv", "score-pc", "score-fast"]
        rows, ex = quality(prior, "mri", [4, 8, 24], images, methods, args.samples)
        paths = figures(rows, ex, images, "mri", DOCS, "MRI, held-out phantoms")
        lines += [
            "## Undersampled MRI, `mri-default`",
            "",
            table(rows, "mri"),
            "",
            *[f"![{p.stem}]({p.name})" for p in paths],
            "",
        ]
        results["mri"] = rows
    else:
        lines += ["`mri-default` is not bundled yet: no MRI score results.", ""]
    t = timing()
    results["timing"] = t
    lines += [
        "## Time per slice on this CPU (`small` network, batch 1)",
        "",
        "| size | precision | ms / NFE | fast sampler, 100 NFE (s) | PC, 1000 NFE (s) |",
        "|---|---|---|---|---|",
        *[
            f"| {r['size']}² | {r['precision']} | {r['ms_per_nfe']:.0f} "
            f"| {r['s_fast_100']:.1f} | {r['s_pc_1000']:.0f} |"
            for r in t
        ],
        "",
        "Data-consistency steps (projections, CG) add to these; the tables above report the "
        "measured wall time per slice including them.",
        "",
    ]
    (DOCS / "quality.md").write_text("\n".join(lines))
    (DOCS / "quality.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
