"""Which prior wins on real data no model saw: (a) whole-image NCSN++, (b) PaDIS patch prior,
(c) the whole-image prior adapted to each measurement at test time (models/adapt.py).

Under the evaluation protocol (models/protocol.py): held-out real slices (the ``test`` slabs
of models/realdata.py), measured on a grid twice as fine (no inverse crime), realistic
noise; CT 23 parallel views with Gaussian noise of 0.5 % of the sinogram's maximum, MRI 8×
equispaced with complex noise of std 0.01 and a smooth phase. Every method is tuned on the
``val`` slabs only: the TV weight of FISTA-TV / CS-TV by grid, each prior's ρ and η (fast
sampler, 100 NFE) by a small grid; (c) uses (a)'s. Per slice: PSNR / SSIM (data range 1) and
seconds; per prior: training steps and minutes from its card.

Run: ``python benchmarks/priors_compare.py [--n 5] [--n-val 2] [--tasks ct mri]
[--ct-whole DIR] [--ct-patch DIR] [--mri-whole DIR] [--mri-patch DIR]``; by default (a) is
the bundled prior and (b) the patch prior kept in models/candidates/. A candidate directory
that does not exist is left out and the table says so. Writes
docs/benchmarks/priors_compare.{md,json} and priors_compare_<task>.png.
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

from models.adapt import adapt_prior  # noqa: E402
from models.inverse import Prior, ReconConfig, reconstruct  # noqa: E402
from models.metrics import psnr, ssim  # noqa: E402
from models.protocol import (  # noqa: E402
    CLASSICAL,
    Simulated,
    classical,
    fine_slices,
    simulate,
    tune_classical,
)
from models.registry import BUNDLED, load_model  # noqa: E402
from models.tuning import grid_search  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ROOT / "models" / "candidates"  # priors that were compared and did not ship
DOCS = ROOT / "docs" / "benchmarks"
TASKS = {"ct": ("ct-sparse", 23, "gaussian:0.005"), "mri": ("mri", 8, "complex:0.01")}
GRID = {"rho": (0.3, 1.0), "eta": (0.5, 0.85)}
NFE = 100
TTA = {"steps": 40, "sigma_floor": 0.1, "lr": 1e-3}  # models/adapt.py
LABELS = {
    "bundled": "shipped prior",
    "whole": "(a) whole-image",
    "patch": "(b) patch (PaDIS)",
    "tta": "(c) whole + test-time adaptation",
}


def candidates(args: argparse.Namespace, modality: str) -> dict[str, Path]:
    """The shipped prior, (a) the whole-image candidate (default: models/candidates/
    <modality>-whole, else the shipped prior) and (b) the patch prior."""
    bundled = BUNDLED / {"ct": "ct-default", "mri": "mri-default"}[modality]
    kept = CANDIDATES / f"{modality}-whole"
    whole = getattr(args, f"{modality}_whole") or (kept if kept.exists() else bundled)
    patch = getattr(args, f"{modality}_patch") or CANDIDATES / f"{modality}-patch"
    out = {"bundled": bundled, "whole": Path(whole), "patch": Path(patch)}
    if out["whole"].resolve() == bundled.resolve():
        del out["bundled"]  # (a) is what ships
    return out


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _slice(sim: Simulated, i: int) -> Simulated:
    return Simulated(sim.operator, sim.y[i : i + 1], sim.reference[i : i + 1], sim.noise)


def _recon(prior: Prior, sim: Simulated, config: ReconConfig, i: int) -> torch.Tensor:
    return reconstruct(sim.operator, sim.y[i : i + 1], prior, config, 1, i).mean[0].clamp(0, 1)


def _metrics(x: torch.Tensor, ref: torch.Tensor, seconds: float) -> list[float]:
    return [psnr(x, ref), ssim(x, ref), seconds]


def run(name: str, paths: dict[str, Path], n: int, n_val: int) -> dict:
    task, level, noise = TASKS[name]
    modality = name
    present = {k: p for k, p in paths.items() if (p / "card.json").exists()}
    missing = sorted(set(paths) - set(present))
    priors = {k: Prior.load(str(p)) for k, p in present.items()}
    size = next(iter(priors.values())).image_size
    val = simulate(fine_slices(modality, "val", size, n_val), task, level, noise, seed=1)
    weight, _ = tune_classical(val, modality)
    configs, info = {}, {}
    for key, prior in priors.items():
        best = grid_search(prior, val, GRID, NFE)
        configs[key] = ReconConfig(sampler="fast", n_steps=NFE, rho=best["rho"], eta=best["eta"])
        card = prior.card
        info[key] = {
            "path": _shown(paths[key]),
            "architecture": card["architecture"]["name"],
            "patch_size": card["architecture"].get("patch_size"),
            "steps": card.get("total_steps", card.get("steps")),
            "train_minutes": round(float(card.get("wall_time_s_total", 0.0)) / 60, 1),
            "sha256": card.get("weights_sha256", "")[:12],
            "val_psnr": round(best["psnr"], 2),
            "rho": best["rho"],
            "eta": best["eta"],
        }
    whole_net = load_model(str(present["whole"]))[0] if "whole" in present else None
    if whole_net is not None:
        configs["tta"] = configs["whole"]
        info["tta"] = {**info["whole"], "adaptation": TTA}
    test = simulate(fine_slices(modality, "test", size, n), task, level, noise, seed=2)
    strong = CLASSICAL[modality]
    rows, examples = [], []
    for i in range(len(test.y)):
        ref = test.reference[i]
        t0 = time.perf_counter()
        c = classical(_slice(test, i), modality, weight)
        row = {"slice": i, strong: _metrics(c[0], ref, time.perf_counter() - t0)}
        images = {"reference": ref, strong: c[0]}
        for key, prior in priors.items():
            t0 = time.perf_counter()
            x = _recon(prior, test, configs[key], i)
            row[key] = _metrics(x, ref, time.perf_counter() - t0)
            images[key] = x
        if whole_net is not None:
            t0 = time.perf_counter()
            adapted = adapt_prior(whole_net, priors["whole"], c, **TTA, seed=i)
            x = _recon(adapted, test, configs["tta"], i)
            row["tta"] = _metrics(x, ref, time.perf_counter() - t0 + row[strong][2])
            images["tta"] = x
        rows.append(row)
        print(f"  {name} slice {i}: " + _line(row, strong), flush=True)
        if i < 3:
            examples.append(images)
    figure(name, examples)
    return {
        "task": task,
        "level": level,
        "noise": noise,
        "classical": strong,
        "classical_weight": weight,
        "priors": info,
        "missing": {k: str(paths[k]) for k in missing},
        "rows": rows,
        "n_val": n_val,
        "date": time.strftime("%Y-%m-%d"),
    }


def _line(row: dict, strong: str) -> str:
    return ", ".join(f"{k} {v[0]:.2f}" for k, v in row.items() if k != "slice") + (
        f" (classical {strong})"
    )


def figure(name: str, examples: list[dict]) -> None:
    cols = list(examples[0])
    fig, axes = plt.subplots(
        len(examples), len(cols), figsize=(2.4 * len(cols), 2.6 * len(examples)), squeeze=False
    )
    for r, images in enumerate(examples):
        for c, key in enumerate(cols):
            img = images[key]
            ax = axes[r, c]
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            title = LABELS.get(key, key).split(" ", 1)[-1] if key in LABELS else key
            if key != "reference":
                title += f" {psnr(img, images['reference']):.1f} dB"
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(DOCS / f"priors_compare_{name}.png", dpi=90)
    plt.close(fig)


def render(results: dict, machine: str) -> str:
    lines = [
        "# Priors compared on held-out real data",
        "",
        f"Measured by `python benchmarks/priors_compare.py` on {machine}: (a) the whole-image",
        "NCSN++ trained on real slices and phantoms with augmentation, (b) a PaDIS patch prior",
        "(32² patches with their positions, the whole-image score assembled from a randomly",
        "shifted partition of the zero-padded image; `models/nets/patch.py`), (c) (a) adapted",
        "to each measurement before sampling (`models/adapt.py`). Real test slices no model",
        "saw, measured on a grid twice as fine, realistic noise; every method tuned on the",
        "validation slabs only; 100 NFE with the fast sampler; PSNR / SSIM with data range 1.",
        "The seconds of (c) include its classical reconstruction and its adaptation. Where (a)",
        "is a candidate that did not ship, the shipped prior is measured beside it.",
        "",
    ]
    for name, r in results.items():
        strong = r["classical"]
        keys = [k for k in ("bundled", "whole", "patch", "tta") if k in r["priors"]]
        lines += [
            f"## {name}: {r['task']} at {r['level']}, noise {r['noise']} ({r['date']})",
            "",
            f"{strong} weight {r['classical_weight']} (tuned on {r['n_val']} validation slices).",
            "",
            "| prior | model | steps | training min | ρ / η (val) | val PSNR |",
            "|---|---|---|---|---|---|",
        ]
        for k in keys:
            p = r["priors"][k]
            arch = p["architecture"] + (f" P={p['patch_size']}" if p.get("patch_size") else "")
            lines.append(
                f"| {LABELS[k]} | `{p['path']}` ({arch}, {p['sha256']}) | {p['steps']} "
                f"| {p['train_minutes']} | {p['rho']} / {p['eta']} | {p['val_psnr']:.2f} |"
            )
        for k, path in r.get("missing", {}).items():
            lines.append(f"| {LABELS[k]} | not measured: no model at `{path}` | | | | |")
        head = " | ".join(LABELS[k] for k in keys)
        lines += [
            "",
            f"| slice | {strong} | {head} | best − {strong} (dB) |",
            "|---|---|" + "---|" * len(keys) + "---|",
        ]
        for row in r["rows"]:
            cells = " | ".join(f"{row[k][0]:.2f} / {row[k][1]:.3f}" for k in keys)
            best = max(row[k][0] for k in keys)
            lines.append(
                f"| {row['slice']} | {row[strong][0]:.2f} / {row[strong][1]:.3f} | {cells} "
                f"| {best - row[strong][0]:+.2f} |"
            )
        mean = {k: statistics.fmean(row[k][0] for row in r["rows"]) for k in [strong, *keys]}
        secs = {k: statistics.fmean(row[k][2] for row in r["rows"]) for k in [strong, *keys]}
        lines.append(
            f"| mean | {mean[strong]:.2f} | "
            + " | ".join(f"{mean[k]:.2f} ({mean[k] - mean[strong]:+.2f})" for k in keys)
            + " | |"
        )
        lines.append(
            f"| s / slice | {secs[strong]:.1f} | "
            + " | ".join(f"{secs[k]:.1f}" for k in keys)
            + " | |"
        )
        below = {k: sum(row[k][0] < row[strong][0] for row in r["rows"]) for k in keys}
        lines += [
            "",
            "Slices below "
            + strong
            + ": "
            + ", ".join(f"{LABELS[k]} {below[k]} of {len(r['rows'])}" for k in keys)
            + ".",
            "",
            f"![{name}](priors_compare_{name}.png)",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5, help="test slices per task")
    parser.add_argument("--n-val", type=int, default=2, help="validation slices for tuning")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    for modality in TASKS:
        for kind in ("whole", "patch"):
            parser.add_argument(f"--{modality}-{kind}", type=Path, default=None)
    args = parser.parse_args()
    store = DOCS / "priors_compare.json"
    results: dict = {}
    for name in args.tasks:
        result = run(name, candidates(args, name), args.n, args.n_val)
        # Re-read before writing: one process per task may run side by side.
        results = json.loads(store.read_text()) if store.exists() else {}
        results[name] = result
        store.write_text(json.dumps(results, indent=2))
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    (DOCS / "priors_compare.md").write_text(render(results, machine))


if __name__ == "__main__":
    main()
