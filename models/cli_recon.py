"""``scorerecon reconstruct``: score-based reconstruction of a measurement file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.baselines import baseline_name, reconstruct_baseline
from models.figures import preview
from models.inverse import (
    DEFAULT_NFE,
    DEFAULT_SAMPLER,
    METHODS,
    RECON_SAMPLERS,
    Prior,
    ReconConfig,
    merge,
    reconstruct,
)
from models.io import load_problems, save_png
from models.metrics import psnr, ssim
from models.ood import summary as ood_summary
from models.physics import needs_data, parse_spec
from models.physics.ct import remove_metal_trace


def cmd_reconstruct(args: argparse.Namespace) -> int:
    spec = parse_spec(Path(args.spec).read_bytes())
    ops, y = load_problems(args.input, spec)
    op = ops[0]
    base = torch.cat(
        [reconstruct_baseline(o, y[i : i + 1], baseline_name(o)) for i, o in enumerate(ops)]
    )
    metal = None
    if spec.metal_threshold_hu is not None or args.metal_mask:
        given = (
            torch.from_numpy(np.load(args.metal_mask, allow_pickle=False)).bool()
            if args.metal_mask
            else None
        )
        op, y, metal = remove_metal_trace(op, y, given, spec.metal_threshold_hu)
    prior = Prior.load(args.model, bf16=args.bf16)
    config = ReconConfig.for_prior(prior, spec.modality, args.sampler, args.nfe, op)
    config.method = args.method
    for key in ("lam", "snr", "rho"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    total = config.n_steps * config.nfe_per_step()
    bar = tqdm(total=total, desc=f"reconstruct ({config.sampler})", unit="NFE")

    def progress(i: int, n: int) -> None:
        bar.n = i
        bar.refresh()

    if not needs_data(spec):
        rec = reconstruct(op, y, prior, config, args.samples, args.seed, spec.noise_std, progress)
    else:  # coil maps per slice: one solve each
        parts = [
            reconstruct(o, y[i : i + 1], prior, config, args.samples, args.seed + i, spec.noise_std)
            for i, o in enumerate(tqdm(ops, desc="slices", unit="slice"))
        ]
        rec = merge(parts)
    bar.close()
    if rec.diverged is not None:
        print(f"error: the reconstruction diverged ({rec.diverged})", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if metal is not None:
        np.save(out / "metal_mask.npy", metal.numpy())
    np.save(out / "recon.npy", rec.mean.numpy())
    np.save(out / "std.npy", rec.std.numpy())
    if rec.phase is not None:
        np.save(out / "phase.npy", rec.phase.numpy())
    unit = (rec.provenance.get("intensity_scale") or [1.0])[0]
    image, std_scale = preview(rec.mean[0], rec.std[0], base[0], unit)
    save_png(out / "preview.png", image)
    report = {
        "nfe": rec.nfe,
        "seconds": round(rec.seconds, 3),
        "residual": rec.residual,
        "noise_std_used": rec.noise_std_used,
        "warnings": rec.warnings,
        "ood": ood_summary(rec.ood),
        "provenance": {**rec.provenance, "spec": spec.model_dump(exclude_none=True)},
        "preview": "reconstruction | posterior std (scaled to its max "
        f"{std_scale:.4g}) | {baseline_name(op)}",
    }
    if args.reference:
        ref = torch.from_numpy(np.load(args.reference, allow_pickle=False)).float()
        ref = ref.reshape(rec.mean[:1].shape)
        report |= {
            "psnr": psnr(rec.mean[0], ref[0]),
            "ssim": ssim(rec.mean[0], ref[0]),
            "baseline_psnr": psnr(base[0].clamp(0, 1), ref[0]),
            "data_range": 1.0,
        }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "provenance"}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models.data import load_dataset
    from models.evaluate import evaluate, figures, table
    from models.phantoms import ct_phantoms, mri_phantoms

    prior = Prior.load(args.model, bf16=args.bf16) if args.model else None
    size = prior.image_size if prior else args.image_size
    if args.data:
        images = load_dataset(args.data, size, val_fraction=0.0).train
    elif args.task.startswith("ct"):
        images = ct_phantoms(args.n, size, seed=args.phantom_seed)
    else:
        images = mri_phantoms(args.n, size, seed=args.phantom_seed)
    images = images[: args.n]
    levels = [int(v) for v in (args.views if args.task.startswith("ct") else args.accel).split(",")]
    methods = args.methods.split(",")
    rows, examples = evaluate(
        images, args.task, levels, methods, prior, args.nfe, args.samples, args.seed, args.noise_std
    )
    out = Path(args.out)
    source = args.data or f"{len(images)} phantoms (seed {args.phantom_seed})"
    title = f"{args.task} on {source}, model {prior.name if prior else '-'}"
    paths = figures(rows, examples, images, args.task, out, title)
    md = f"# {title}\n\n{table(rows, args.task)}\n\n" + "".join(
        f"![{p.stem}]({p.name})\n\n" for p in paths
    )
    (out / f"{args.task}.md").write_text(md)
    (out / f"{args.task}.json").write_text(json.dumps(rows, indent=2))
    print(md)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from models.registry import update_card
    from models.tuning import tune, validation_images

    prior = Prior.load(args.model)
    modality = "ct" if args.task.startswith("ct") else "mri"
    images = validation_images(modality, prior.image_size, args.n, args.data)
    best = tune(
        prior,
        images,
        args.task,
        args.level,
        args.sampler,
        args.nfe,
        args.trials,
        args.seed,
        args.noise,
    )
    best["data"] = args.data
    recon = {**(prior.card.get("recon") or {})}
    current = recon.get(modality) or {}
    if current and current.get("sampler", DEFAULT_SAMPLER) != args.sampler:
        # The card's default sampler stays; this one's values are kept beside it.
        others = {**(current.get("samplers") or {}), args.sampler: best}
        recon[modality] = {**current, "samplers": others}
    else:
        recon[modality] = {**best, "samplers": current.get("samplers") or {}}
    path = update_card(args.model, {"recon": recon})
    print(json.dumps({"modality": modality, **best, "card": str(path)}))
    return 0


def add_commands(sub) -> None:
    t = sub.add_parser("tune", help="tune λ and r by Bayesian optimisation; saved in the card")
    t.add_argument("--model", required=True)
    t.add_argument(
        "--task", default="ct-sparse", choices=("ct-sparse", "ct-fan", "mri", "mri-random")
    )
    t.add_argument("--level", type=int, default=23, help="views (CT) or acceleration (MRI)")
    t.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=RECON_SAMPLERS)
    t.add_argument("--trials", type=int, default=20)
    t.add_argument("--n", type=int, default=4, help="validation images")
    t.add_argument("--nfe", type=int, default=DEFAULT_NFE)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--data",
        default="real",
        choices=("real", "phantoms"),
        help="validation slabs of the fetched real data (scorerecon data fetch), or phantoms",
    )
    t.add_argument("--noise", help="poisson:<I0>, gaussian:<fraction> (CT), complex:<std> (MRI)")
    t.set_defaults(func=cmd_tune)
    e = sub.add_parser("evaluate", help="compare score-based and classical reconstructions")
    e.add_argument("--model", help="bundled prior name or model directory")
    e.add_argument("--data", help="folder of images (default: held-out phantoms)")
    e.add_argument(
        "--task", default="ct-sparse", choices=("ct-sparse", "ct-fan", "mri", "mri-random")
    )
    e.add_argument("--views", default="10,20,23,45")
    e.add_argument("--accel", default="4,8,24")
    e.add_argument("--methods", default="fbp,fista-tv,score-pc,score-fast")
    e.add_argument("--n", type=int, default=8, help="images to evaluate")
    e.add_argument("--nfe", type=int, default=200)
    e.add_argument("--samples", type=int, default=1)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--noise-std", type=float, default=0.0)
    e.add_argument("--image-size", type=int, default=128, help="without --model")
    e.add_argument("--phantom-seed", type=int, default=1, help="1: never trained on")
    e.add_argument("--bf16", action="store_true")
    e.add_argument("--out", default="out/evaluate")
    e.set_defaults(func=cmd_evaluate)
    r = sub.add_parser("reconstruct", help="score-based reconstruction of a measurement")
    r.add_argument("--input", required=True, help="measurement .npy")
    r.add_argument("--spec", required=True, help="measurement spec JSON file")
    r.add_argument("--model", default="ct-default", help="bundled prior name or model directory")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument(
        "--sampler", choices=RECON_SAMPLERS, help=f"default: the card's, else {DEFAULT_SAMPLER}"
    )
    r.add_argument("--method", default="auto", choices=("auto", *METHODS))
    r.add_argument(
        "--nfe",
        type=int,
        help=f"spend about this many network evaluations (default: the card's, else {DEFAULT_NFE})",
    )
    r.add_argument(
        "--samples", type=int, default=None, help="posterior samples K (default: the card's)"
    )
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--lam", type=float, help="λ of the proximal step (default: tuned or 1)")
    r.add_argument("--snr", type=float, help="corrector signal-to-noise ratio r")
    r.add_argument("--rho", type=float, help="map step: the estimate's error scale ρ")
    r.add_argument("--bf16", action="store_true", help="bf16 autocast for the network")
    r.add_argument("--reference", help="reference image .npy for PSNR/SSIM")
    r.add_argument("--metal-mask", help="boolean image .npy: metal artifact removal")
    r.set_defaults(func=cmd_reconstruct)
