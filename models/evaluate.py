"""Evaluation harness: score-based vs classical reconstructions over measurement levels.

``evaluate(images, task, levels, methods, prior)`` simulates each task at each level (views
for CT, acceleration for MRI), reconstructs every image with every method, and returns one
row per (method, level) with mean ± std PSNR and SSIM (data range 1, the model's [0, 1]
intensities), NFE and seconds per slice. ``figures`` draws reconstructions side by side
(in the style of Fig. 8.4) and quality against the number of measurements (Fig. 8.5).

Methods are the classical ones of :mod:`models.baselines` by name, and ``score-<sampler>``
(``score-pc``, ``score-fast``, ``score-ald``, ``score-em``) for the score-based solver.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from models.baselines import METHODS as BASELINES  # noqa: E402
from models.baselines import reconstruct_baseline  # noqa: E402
from models.inverse import RECON_SAMPLERS, Prior, ReconConfig, reconstruct, steps_for_nfe  # noqa: E402
from models.metrics import psnr, ssim  # noqa: E402
from models.noise import add_noise  # noqa: E402
from models.physics import from_spec  # noqa: E402

TASKS = ("ct-sparse", "ct-fan", "mri", "mri-random")


def task_spec(task: str, level: int, size: int, noise_std: float = 0.0) -> dict:
    """The measurement spec of a task at a level (views for CT, acceleration for MRI)."""
    if task == "ct-sparse":
        return {"modality": "ct", "image_size": size, "n_views": level, "noise_std": noise_std}
    if task == "ct-fan":
        return {
            "modality": "ct",
            "image_size": size,
            "n_views": level,
            "geometry": "fan",
            # A clinical-like magnification of 1.6 at the project's pixel scale.
            "source_distance": 5.0 * size,
            "detector_distance": 3.0 * size,
            "noise_std": noise_std,
        }
    if task in ("mri", "mri-random"):
        kind = "equispaced" if task == "mri" else "random"
        return {
            "modality": "mri",
            "image_size": size,
            # fastMRI's centre fractions (0.08 at 4×, 0.04 at 8×), narrower beyond so the
            # mask still reaches its acceleration.
            "mask": {
                "kind": kind,
                "acceleration": level,
                "center_fraction": min(0.08, 0.32 / level),
            },
            "noise_std": noise_std,
        }
    raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")


@dataclass
class Row:
    method: str
    level: int
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    nfe: int = 0
    coverage: list[float] = field(default_factory=list)  # |error| ≤ 2 std, score methods

    def summary(self) -> dict:
        def ms(v: list[float]) -> tuple[float, float]:
            return (statistics.fmean(v), statistics.pstdev(v)) if v else (float("nan"),) * 2

        (p, ps), (s, ss) = ms(self.psnr), ms(self.ssim)
        out = {
            "method": self.method,
            "level": self.level,
            "psnr": p,
            "psnr_std": ps,
            "ssim": s,
            "ssim_std": ss,
            "nfe": self.nfe,
            "seconds_per_slice": statistics.fmean(self.seconds) if self.seconds else 0.0,
            "n": len(self.psnr),
        }
        if self.coverage:
            out["coverage_2std"] = statistics.fmean(self.coverage)
        return out


def evaluate(
    images: torch.Tensor,
    task: str,
    levels: list[int],
    methods: list[str],
    prior: Prior | None = None,
    nfe: int = 200,
    n_samples: int = 1,
    seed: int = 0,
    noise_std: float = 0.0,
    configure: Callable[[ReconConfig], None] | None = None,
    keep: int = 1,
) -> tuple[list[dict], dict]:
    """Rows of results, and the first ``keep`` reconstructions per (method, level) for figures."""
    for m in methods:
        if m.startswith("score-"):
            if m[6:] not in RECON_SAMPLERS:
                raise ValueError(f"method {m!r}: score samplers are {', '.join(RECON_SAMPLERS)}")
            if prior is None:
                raise ValueError(f"method {m!r} needs --model")
        elif m not in BASELINES:
            raise ValueError(f"method {m!r}: choose score-<sampler> or one of {sorted(BASELINES)}")
    size = images.shape[-1]
    rows, examples = [], {}
    gen = torch.Generator().manual_seed(seed)
    for level in levels:
        op = from_spec(task_spec(task, level, size, noise_std))
        with torch.no_grad():
            ys = op.forward(images)
        ys = add_noise(ys, noise_std, gen)
        for method in methods:
            row = Row(method, level)
            for i in range(len(images)):
                y, ref = ys[i : i + 1], images[i : i + 1]
                t0 = time.perf_counter()
                std = None
                if method.startswith("score-"):
                    cfg = ReconConfig(sampler=method[6:])
                    if configure is not None:
                        configure(cfg)
                    cfg.n_steps = steps_for_nfe(cfg, nfe)
                    rec = reconstruct(op, y, prior, cfg, n_samples, seed + i, noise_std)
                    x, std, row.nfe = rec.mean, rec.std, rec.nfe
                else:
                    x = reconstruct_baseline(op, y, method)
                row.seconds.append(time.perf_counter() - t0)
                x = x.real.clamp(0, 1) if not x.is_complex() else x.abs().clamp(0, 1)
                row.psnr.append(psnr(x[0], ref[0]))
                row.ssim.append(ssim(x[0], ref[0]))
                if std is not None and n_samples > 1:
                    inside = (x - ref).abs() <= 2 * std
                    row.coverage.append(float(inside.float().mean()))
                if i < keep:
                    examples[(method, level, i)] = x[0, 0]
            rows.append(row.summary())
    return rows, examples


def figures(
    rows: list[dict],
    examples: dict,
    images: torch.Tensor,
    task: str,
    out: str | Path,
    title: str = "",
) -> list[Path]:
    """Reconstructions side by side (one row per level) and PSNR/SSIM against the level."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    levels = sorted({r["level"] for r in rows})
    unit = "views" if task.startswith("ct") else "acceleration"
    fig, axes = plt.subplots(
        len(levels),
        len(methods) + 1,
        figsize=(2.2 * (len(methods) + 1), 2.3 * len(levels)),
        squeeze=False,
    )
    for li, level in enumerate(levels):
        axes[li, 0].imshow(images[0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[li, 0].set_title("reference" if li == 0 else "")
        axes[li, 0].set_ylabel(f"{level} {unit}")
        for mi, m in enumerate(methods):
            ax = axes[li, mi + 1]
            if (m, level, 0) in examples:
                ax.imshow(examples[(m, level, 0)].numpy(), cmap="gray", vmin=0, vmax=1)
            r = next(r for r in rows if r["method"] == m and r["level"] == level)
            ax.set_title(f"{m}\n{r['psnr']:.1f} dB / {r['ssim']:.3f}", fontsize=8)
        for ax in axes[li]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    side = out / f"{task}_examples.png"
    fig.savefig(side, dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for m in methods:
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["level"])
        for ax, key in zip(axes, ("psnr", "ssim"), strict=True):
            ax.errorbar(
                [r["level"] for r in rs],
                [r[key] for r in rs],
                [r[f"{key}_std"] for r in rs],
                marker="o",
                capsize=3,
                label=m,
            )
    for ax, key in zip(axes, ("PSNR (dB)", "SSIM"), strict=True):
        ax.set_xlabel(unit)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    curve = out / f"{task}_quality.png"
    fig.savefig(curve, dpi=110)
    plt.close(fig)
    return [side, curve]


def table(rows: list[dict], task: str) -> str:
    """A Markdown table of the rows."""
    unit = "views" if task.startswith("ct") else "acceleration"
    has_cov = any("coverage_2std" in r for r in rows)
    head = f"| method | {unit} | PSNR (dB) | SSIM | NFE | s / slice |" + (
        " ±2σ coverage |" if has_cov else ""
    )
    sep = "|---" * (6 + has_cov) + "|"
    lines = [head, sep]
    for r in rows:
        cov = (
            f" {100 * r['coverage_2std']:.1f} % |"
            if "coverage_2std" in r
            else (" — |" if has_cov else "")
        )
        lines.append(
            f"| {r['method']} | {r['level']} | {r['psnr']:.2f} ± {r['psnr_std']:.2f} "
            f"| {r['ssim']:.3f} ± {r['ssim_std']:.3f} | {r['nfe'] or '—'} "
            f"| {r['seconds_per_slice']:.2f} |{cov}"
        )
    return "\n".join(lines)
