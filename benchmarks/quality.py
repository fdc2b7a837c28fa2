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

Run: ``python benchmarks/quality.py [--n 4] [--sections ct mri nfe timing]`` (about 25 minutes
on 2 cores with n = 4 for CT); sections not named keep their earlier measurement.
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

from models.default_priors import mni152_slices  # noqa: E402
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


SECTIONS = ("ct", "mri", "nfe", "timing")


def run_ct(args, results: dict) -> None:
    prior = Prior.load("ct-default")
    images = ct_phantoms(args.n, prior.image_size, seed=1)
    methods = ["fbp", "fista-tv", "score-pc", "score-fast"]
    rows, ex = quality(prior, "ct-sparse", [10, 20, 23, 45], images, methods, args.samples)
    figures(rows, ex, images, "ct-sparse", DOCS, "sparse-view CT, held-out phantoms")
    results["ct"] = {"steps": _steps("ct-default"), "n": args.n, "rows": rows}


def run_mri(args, results: dict) -> None:
    prior = Prior.load("mri-default")
    size = prior.image_size
    sets = {
        "phantoms": mri_phantoms(args.n, size, seed=1),
        "mni152": _spread(mni152_slices(size, "val"), args.n),
    }
    methods = ["zero-filled", "cs-tv", "score-pc", "score-fast"]
    out = {"steps": _steps("mri-default"), "n": args.n}
    for name, images in sets.items():
        rows, ex = quality(prior, "mri", [4, 8, 24], images, methods, args.samples)
        figures(rows, ex, images, "mri", DOCS / "mri", f"MRI, held-out {name}")
        for p in ("examples", "quality"):
            (DOCS / "mri" / f"mri_{p}.png").replace(DOCS / f"mri-{name}_{p}.png")
        out[name] = rows
    results["mri"] = out


def run_nfe(args, results: dict) -> None:
    prior = Prior.load("ct-default")
    images = ct_phantoms(2, prior.image_size, seed=1)
    curves = nfe_curve(prior, images, args.budgets)
    results["nfe"] = curves
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


def _steps(name: str) -> int:
    card = load_card(name)
    return int(card.get("total_steps", card.get("steps", 0)))


def _spread(images: torch.Tensor, n: int) -> torch.Tensor:
    """n slices spread evenly over a validation set (all three axes, not n neighbours)."""
    idx = torch.linspace(0, len(images) - 1, n).round().long()
    return images[idx]


def render(results: dict, machine: str) -> list[str]:
    """quality.md from every section measured so far (sections are re-run independently)."""
    lines = [
        "# Reconstruction quality",
        "",
        f"Measured by `python benchmarks/quality.py` on {machine}. PSNR/SSIM: data range 1 on "
        "the model's [0, 1] intensities (CT: (HU + 1000) / 4000), mean ± std over the images. "
        f"NFE: score-pc {NFE['score-pc']}, score-fast {NFE['score-fast']}. The fast sampler "
        "draws K posterior samples as one batch and its mean is scored; ±2σ coverage is the "
        "fraction of pixels whose error lies within ±2 posterior standard deviations.",
        "",
    ]
    if "ct" in results:
        ct = results["ct"]
        lines += [
            f"## Sparse-view CT, `ct-default` ({ct['steps']} training steps)",
            "",
            f"{ct['n']} held-out phantoms (seed 1; the prior trained on seed 0), parallel "
            f"beam, noiseless, K = {results.get('samples', '?')}.",
            "",
            table(ct["rows"], "ct-sparse"),
            "",
            "![examples](ct-sparse_examples.png)",
            "",
            "![quality](ct-sparse_quality.png)",
            "",
        ]
    else:
        lines += ["CT: not measured yet (`--sections ct`).", ""]
    if "nfe" in results:
        curves = results["nfe"]
        lines += [
            "## NFE against PSNR (23 views, 2 held-out phantoms)",
            "",
            "| sampler | "
            + " | ".join(f"budget {i + 1}" for i in range(len(curves["fast"])))
            + " |",
            "|---" * (1 + len(curves["fast"])) + "|",
        ]
        for name, pts in curves.items():
            cells = " | ".join(f"{p[1]:.2f} dB ({p[0]} NFE)" for p in pts)
            lines.append(f"| {name} | {cells} |")
        lines += ["", "![nfe](quality_nfe.png)", ""]
    if "mri" in results:
        mri = results["mri"]
        lines += [f"## Undersampled MRI (equispaced), `mri-default` ({mri['steps']} steps)", ""]
        for name, what in (
            ("phantoms", "held-out MRI phantoms (seed 1)"),
            ("mni152", "MNI152 validation slab (central 10 % of each axis, never trained on)"),
        ):
            lines += [
                f"### {mri['n']} {what}",
                "",
                table(mri[name], "mri"),
                "",
                f"![examples](mri-{name}_examples.png)",
                "",
                f"![quality](mri-{name}_quality.png)",
                "",
            ]
    else:
        lines += ["MRI: not measured yet (`--sections mri`, needs `mri-default`).", ""]
    if "timing" in results:
        lines += [
            "## Time per slice on this CPU (`small` network, batch 1)",
            "",
            "| size | precision | ms / NFE | fast sampler, 100 NFE (s) | PC, 1000 NFE (s) |",
            "|---|---|---|---|---|",
            *[
                f"| {r['size']}² | {r['precision']} | {r['ms_per_nfe']:.0f} "
                f"| {r['s_fast_100']:.1f} | {r['s_pc_1000']:.0f} |"
                for r in results["timing"]
            ],
            "",
            "Data-consistency steps (projections, CG) add to these; the tables above report "
            "the measured wall time per slice including them.",
            "",
        ]
    return lines + coverage_section()


def coverage_section() -> list[str]:
    """±2σ coverage on real held-out slices, before and after the σ calibration that
    ``benchmarks/ood.py`` fits on validation slices and stores in the cards."""
    store = DOCS / "ood.json"
    if not store.exists():
        return ["Coverage on real slices: not measured yet (`python benchmarks/ood.py`).", ""]
    lines = [
        "## ±2σ coverage on real held-out slices (`benchmarks/ood.py`)",
        "",
        "Real test slices under the evaluation protocol, each prior's card defaults. The "
        "posterior std reported is c κ(K) s_K: s_K the std of the K samples, κ(K) the "
        "Student-t factor for a further draw given K, c fitted on the validation slices so "
        "that 95 % of the object's pixels lie within ±2 std (models.inverse.calibrated_std).",
        "",
        "| prior | task | K | c | object: before | object: after | all pixels: before "
        "| all pixels: after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in json.loads(store.read_text()):
        cov = a["coverage_test"]
        lines.append(
            f"| {a['prior']} | {a['task']} | {a['samples']} | {a['std_scale']:.3f} "
            f"| {100 * cov['object']['before']:.1f} % | {100 * cov['object']['after']:.1f} % "
            f"| {100 * cov['all']['before']:.1f} % | {100 * cov['all']['after']:.1f} % |"
        )
    return [*lines, "", "Details and the out-of-distribution scores: [ood.md](ood.md).", ""]


def write_page() -> None:
    """quality.md again from quality.json (after another script measured a section)."""
    store = DOCS / "quality.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    machine = results.get("machine", f"{platform.machine()}, torch {torch.__version__}")
    write(render(results, machine))


def write(lines: list[str]) -> None:
    """quality.md from its rendered ``lines``, with the headline of the real slices
    (benchmarks/quality_real.py) kept at the top."""
    (DOCS / "quality.md").write_text("\n".join(lines))
    real = DOCS / "quality_real.json"
    if real.exists():
        from quality_real import headline

        headline(json.loads(real.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4, help="held-out images per task")
    parser.add_argument("--samples", type=int, default=8, help="K for the calibration")
    parser.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="re-measure only these; the others are kept from docs/benchmarks/quality.json",
    )
    args = parser.parse_args()
    DOCS.mkdir(parents=True, exist_ok=True)
    store = DOCS / "quality.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    results["samples"] = args.samples
    available = bundled_models()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    results["machine"] = machine
    for section in args.sections:
        needs = "mri-default" if section == "mri" else "ct-default"
        if section != "timing" and needs not in available:
            print(f"skipping {section}: {needs} is not bundled")
            continue
        {"ct": run_ct, "mri": run_mri, "nfe": run_nfe}.get(section, _run_timing)(args, results)
        store.write_text(json.dumps(results, indent=2, default=str))
    lines = render(results, machine)
    write(lines)
    print("\n".join(lines))


def _run_timing(args, results: dict) -> None:
    results["timing"] = timing()


if __name__ == "__main__":
    main()
