"""Model pages for the bundled priors: docs/models/<name>.md with pictures.

For each bundled prior: a grid of samples (PC sampler) beside validation images it never
saw, the training loss curve written during training, and the denoising score-matching
loss on the validation images at several noise levels σ (per pixel,
E‖σ s(x + σz, σ) + z‖² / D: 1 for a score of zero, 0 for a perfect one), plus the card's
data, licences, normalisation, SDE, network and training record.

Run: ``python benchmarks/priors.py [--n 16] [--steps 250] [--names mri-default]``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from models.default_priors import RECIPES
from models.figures import grid
from models.io import save_png
from models.registry import bundled_models, load_model, resolve, score_fn_of
from models.sampling.registry import sample

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models"


def dsm_at_sigmas(score, sde, images: torch.Tensor, sigmas: list[float]) -> list[float]:
    g = torch.Generator().manual_seed(0)
    out = []
    for sigma in sigmas:
        s = torch.full((len(images),), sigma)
        t = sde.t_of_sigma(s)
        z = torch.randn(images.shape, generator=g)
        pred = score(images + sigma * z, t)
        out.append(float((sigma * pred + z).pow(2).flatten(1).sum(1).mean() / images[0].numel()))
    return out


def validation_sets(name: str, card: dict, size: int, n: int) -> dict[str, torch.Tensor]:
    """The held-out images to show and score: the real validation slabs first (when
    fetched, models/realdata.py), then the recipe's own validation data."""
    from models.realdata import available, real_slices

    out: dict[str, torch.Tensor] = {}
    modality = {"ct": "ct", "mri": "mr"}.get(str(card.get("modality")), "")
    if modality and available():
        real = torch.from_numpy(real_slices(modality, "val", size))[:, None]
        if len(real):
            out[f"real {modality.upper()} val slabs"] = real[
                torch.linspace(0, len(real) - 1, min(n, len(real))).round().long()
            ]
    if name in RECIPES:
        out["recipe val (phantoms / template)"] = RECIPES[name].training_data("val")[:n]
    return out


def _minutes(card: dict) -> str:
    seconds = card.get("wall_time_s_total", card.get("wall_time_s_this_run"))
    return f"{float(seconds) / 60:.0f} min" if seconds is not None else "unknown"


def _held_out(entry: dict) -> str:
    split = entry.get("split")
    if not split:
        return "validation seed / slab, see files"
    return "; ".join(
        f"{k} " + ", ".join(f"[{a}, {b})" for a, b in v) for k, v in split.items() if k != "train"
    )


def page(name: str, n: int, steps: int) -> str:
    net, sde, card = load_model(name)
    score = score_fn_of(net, sde, bf16=True)
    size = card["image_size"]
    vals = validation_sets(name, card, size, n)
    bar = tqdm(total=steps, desc=f"{name} samples", unit="step")
    res = sample(
        "pc",
        sde,
        score,
        (n, 1, size, size),
        steps,
        generator=torch.Generator().manual_seed(0),
        progress=lambda i, total: bar.update(1),
    )
    bar.close()
    cols = math.ceil(math.sqrt(n))
    save_png(DOCS / f"{name}_samples.png", grid(res.samples, cols))
    save_png(resolve(name) / "samples.png", grid(res.samples, cols))  # shown by the console
    lines = [f"# `{name}`", ""]
    steps_total = card.get("total_steps", card.get("steps"))
    lines += [
        f"- image size {size}², intensity: {card.get('intensity')}",
        f"- SDE: {json.dumps(card['sde'])} (σ_max by {card.get('sigma_max_rule', 'the card')})",
        f"- network: {card['architecture']['name']} "
        f"{json.dumps({k: v for k, v in card['architecture'].items() if k != 'name'})}",
        f"- training: {steps_total} steps in total, {_minutes(card)} of wall time "
        f"({card.get('steps')} steps and {card.get('wall_time_s_this_run')} s in the last run), "
        f"objective {card.get('objective')}, "
        f"batch {card.get('train_config', {}).get('batch_size')}, final loss "
        f"{card.get('final_loss'):.4g}"
        if card.get("final_loss") is not None
        else "",
        f"- weights sha256 `{card['weights_sha256']}`",
        "",
        "## Training data",
        "",
        "| source | files | held out (slices) | licence |",
        "|---|---|---|---|",
        *[
            f"| {d['source']} | {d['files']} | {_held_out(d)} | {d['licence']} |"
            for d in card.get("training_data", [])
            if isinstance(d, dict)
        ],
        "",
        f"## Samples (PC sampler, {steps} steps, NFE {res.nfe})",
        "",
        f"![samples]({name}_samples.png)",
        "",
    ]
    if vals:
        first = next(iter(vals.values()))
        save_png(DOCS / f"{name}_validation.png", grid(first, cols))
        sigmas = [0.01, 0.05, 0.2, 1.0, 5.0, float(sde.sigma_max)]
        lines += [
            f"## Validation images (never trained on): {next(iter(vals))}",
            "",
            "Samples above, held-out slices here:",
            "",
            f"![validation]({name}_validation.png)",
            "",
            "## Denoising score-matching loss on the validation images",
            "",
            "E‖σ s(x + σz, σ) + z‖² / D per pixel (1 = a zero score):",
            "",
            "| validation set (images) | " + " | ".join(f"σ = {s:g}" for s in sigmas) + " |",
            "|---" * (1 + len(sigmas)) + "|",
        ]
        for label, images in vals.items():
            losses = dsm_at_sigmas(score, sde, images, sigmas)
            lines.append(
                f"| {label} ({len(images)}) | " + " | ".join(f"{v:.4f}" for v in losses) + " |"
            )
        lines.append("")
    lines += ["## Loss curve", "", f"![loss]({name}_loss.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--names", nargs="+", default=bundled_models(), choices=bundled_models())
    args = parser.parse_args()
    DOCS.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        text = page(name, args.n, args.steps)
        (DOCS / f"{name}.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
