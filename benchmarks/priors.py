"""Model pages for the bundled priors: docs/models/<name>.md with pictures.

For each bundled prior: a grid of samples (PC sampler) beside validation images it never
saw, the training loss curve written during training, and the denoising score-matching
loss on the validation images at several noise levels σ (per pixel,
E‖σ s(x + σz, σ) + z‖² / D: 1 for a score of zero, 0 for a perfect one), plus the card's
data, licences, normalisation, SDE, network and training record.

Run: ``python benchmarks/priors.py [--n 16] [--steps 250]``.
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


def page(name: str, n: int, steps: int) -> str:
    net, sde, card = load_model(name)
    score = score_fn_of(net, sde, bf16=True)
    size = card["image_size"]
    val = RECIPES[name].training_data("val")[:n] if name in RECIPES else None
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
        f"- training: {steps_total} steps in total ({card.get('steps')} in the last run, "
        f"{card.get('wall_time_s_this_run')} s wall time), objective {card.get('objective')}, "
        f"batch {card.get('train_config', {}).get('batch_size')}, final loss "
        f"{card.get('final_loss'):.4g}"
        if card.get("final_loss") is not None
        else "",
        f"- weights sha256 `{card['weights_sha256']}`",
        "",
        "## Training data",
        "",
        "| source | files | licence |",
        "|---|---|---|",
        *[
            f"| {d['source']} | {d['files']} | {d['licence']} |"
            for d in card.get("training_data", [])
            if isinstance(d, dict)
        ],
        "",
        f"## Samples (PC sampler, {steps} steps, NFE {res.nfe})",
        "",
        f"![samples]({name}_samples.png)",
        "",
    ]
    if val is not None:
        save_png(DOCS / f"{name}_validation.png", grid(val, cols))
        sigmas = [0.01, 0.05, 0.2, 1.0, 5.0, float(sde.sigma_max)]
        losses = dsm_at_sigmas(score, sde, val, sigmas)
        lines += [
            "## Validation images (never trained on)",
            "",
            f"![validation]({name}_validation.png)",
            "",
            "## Denoising score-matching loss on the validation images",
            "",
            "E‖σ s(x + σz, σ) + z‖² / D per pixel (1 = a zero score):",
            "",
            "| σ | " + " | ".join(f"{s:g}" for s in sigmas) + " |",
            "|---" * (1 + len(sigmas)) + "|",
            "| loss | " + " | ".join(f"{v:.4f}" for v in losses) + " |",
            "",
        ]
    lines += ["## Loss curve", "", f"![loss]({name}_loss.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", type=int, default=250)
    args = parser.parse_args()
    DOCS.mkdir(parents=True, exist_ok=True)
    for name in bundled_models():
        text = page(name, args.n, args.steps)
        (DOCS / f"{name}.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
