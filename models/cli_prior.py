"""``scorerecon train`` / ``sample`` / ``likelihood``: the score-prior commands."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.data import load_dataset, scan, to_unit
from models.figures import grid
from models.io import fit_square, save_png
from models.likelihood import bits_per_dim, log_likelihood
from models.losses import OBJECTIVES
from models.nets.ncsnpp import build
from models.registry import load_model, score_fn_of, time_conditioned
from models.sampling.registry import SAMPLERS, sample
from models.sde import SDES, VESDE, sigma_max_from_data
from models.training import TrainConfig, fit_prior, init_distributed


def load_folder(directory: str | Path, size: int, axes: tuple[int, ...] = (0,)) -> torch.Tensor:
    """Every slice of every volume in a folder (DICOM, NIfTI, NPY, PNG) as (N, 1, size, size)."""
    ds = load_dataset(directory, size, axes, val_fraction=0.0)
    print(ds.report.summary())
    return ds.train


def _sde_for(kind: str, data: torch.Tensor):
    if kind == "ve":
        return VESDE(0.01, max(1.0, sigma_max_from_data(data)))
    return SDES[kind]()


def cmd_train(args: argparse.Namespace) -> int:
    rank, world = init_distributed()  # data parallel when launched by torchrun
    axes = tuple(int(a) for a in args.axes.split(","))
    ds = load_dataset(args.data, args.image_size, axes, args.val_fraction, args.seed)
    if rank == 0:
        print(ds.report.summary())
        print(f"{len(ds.train)} training / {len(ds.val)} validation slices")
    data = ds.train
    sde = _sde_for(args.sde, data)
    ve = args.sde == "ve"
    net = build(
        args.preset,
        sde.sigma if ve else None,
        **({} if ve else {"embedding": "positional", "scale_by_sigma": False}),
    )
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        objective=args.objective,
        importance_sampling=args.objective == "likelihood",
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        augment=args.augment,
        bf16=args.bf16,
    )
    card = {
        "name": Path(args.out).name,
        "image_size": args.image_size,
        "intensity": "[0, 1]; CT: (HU + 1000) / 4000",
        "training_data": {
            "directory": str(args.data),
            "train_volumes": ds.train_volumes,
            "validation_volumes": ds.val_volumes,
            "skipped_files": len(ds.report.skipped),
            "axes": list(axes),
            "augmentation": args.augment,
        },
        "n_images": len(data),
    }
    bar = tqdm(total=cfg.steps, desc="train", unit="step", disable=rank != 0)

    def progress(step: int, total: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4g}")
        bar.refresh()

    fit_prior(
        data, args.out, sde, net, cfg, card, args.resume, preview=args.preview, progress=progress
    )
    bar.close()
    if rank == 0:
        print(f"model written to {args.out} ({world} process{'es' if world > 1 else ''})")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    net, sde, card = load_model(args.model)
    size = card["image_size"]
    gen = torch.Generator().manual_seed(args.seed)
    bar = tqdm(desc=f"sample ({args.sampler})", unit="step")

    def progress(i: int, n: int) -> None:
        bar.total = n
        bar.n = i
        bar.refresh()

    res = sample(
        args.sampler,
        sde,
        score_fn_of(net, sde),
        (args.n, 1, size, size),
        args.steps,
        generator=gen,
        progress=progress,
    )
    bar.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(out, grid(res.samples))
    np.save(out.with_suffix(".npy"), res.samples.numpy())
    print(json.dumps({"samples": args.n, "nfe": res.nfe, "grid": str(out)}))
    return 0


def cmd_likelihood(args: argparse.Namespace) -> int:
    net, sde, card = load_model(args.model)
    data = load_folder(args.data, card["image_size"])
    gen = torch.Generator().manual_seed(args.seed)
    # The divergence needs gradients through the network, so no inference mode here.
    logp = log_likelihood(sde, time_conditioned(net.eval(), sde), data, args.steps, generator=gen)
    bpd = bits_per_dim(logp, data[0].numel())
    stderr = float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    print(json.dumps({"bits_per_dim": float(bpd.mean()), "stderr": stderr, "n": len(bpd)}))
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    report = scan(args.dir)
    print(report.summary())
    if report.volumes:
        picks = []
        for vol in report.volumes[:16]:
            unit = to_unit(vol)
            picks.append(fit_square(unit[len(unit) // 2].astype(np.float64), 128))
        out = Path(args.montage)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_png(out, grid(np.stack(picks)))
        print(f"montage of the middle slice of each volume: {out}")
    return 0 if report.volumes else 1


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from models import realdata

    only = [s for s in (args.only or "").split(",") if s] or None
    result = realdata.fetch(args.dest, only, say=lambda s: print(s, file=sys.stderr))
    print(result.summary())
    if result.failed:
        print(
            f"warning: {len(result.failed)} source(s) could not be fetched (see above); "
            "the others are usable",
            file=sys.stderr,
        )
    return 0 if result.fetched else 1


def add_commands(sub) -> None:
    from models.realdata import SOURCES, data_dir

    d = sub.add_parser("data", help="inspect or fetch training data").add_subparsers(
        dest="data_cmd"
    )
    di = d.add_parser("inspect", help="list the series/volumes in a folder and write a montage")
    di.add_argument("dir")
    di.add_argument("--montage", default="montage.png")
    di.set_defaults(func=cmd_data_inspect)
    df = d.add_parser(
        "fetch",
        help="fetch the real CT/MR sources from Debian packages (docs/data.md)",
        description="Download (apt-get download), unpack (dpkg-deb -x) and convert the real "
        "CT/MR sources into DEST: <split>/<ct|mr|complex>/ files and sources.json. A source "
        "that cannot be had is reported and the others go on; the exit status is 1 only if "
        "nothing could be fetched.",
    )
    df.add_argument(
        "--dest",
        help=f"folder to write (default: $SCORERECON_REALDATA, else {data_dir()})",
    )
    df.add_argument("--only", help="comma-separated sources: " + ",".join(s.name for s in SOURCES))
    df.set_defaults(func=cmd_data_fetch)
    t = sub.add_parser("train", help="train a score prior on a folder of images")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True, help="model directory to write")
    t.add_argument("--preset", default="small", choices=["tiny", "small", "paper"])
    t.add_argument("--image-size", type=int, default=128)
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--objective", default="dsm", choices=OBJECTIVES)
    t.add_argument("--checkpoint-every", type=int, default=200)
    t.add_argument("--preview", type=int, default=4, help="samples drawn at each checkpoint")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--axes", default="0", help="slice volumes along these axes, e.g. 0,1,2")
    t.add_argument("--val-fraction", type=float, default=0.1, help="volumes held out")
    t.add_argument("--augment", action="store_true", help="flips, rotations, scalings, gain")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay fp32)")
    t.add_argument("--sde", default="ve", choices=sorted(SDES))
    t.add_argument("--resume", action="store_true")
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("sample", help="generate samples from a prior")
    s.add_argument("--model", required=True, help="model directory or bundled prior name")
    s.add_argument("--n", type=int, default=16)
    s.add_argument("--sampler", default="pc", choices=SAMPLERS)
    s.add_argument("--steps", type=int, default=500)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="grid PNG (samples also written as .npy)")
    s.set_defaults(func=cmd_sample)
    lk = sub.add_parser("likelihood", help="bits/dim of a folder of images under a prior")
    lk.add_argument("--model", required=True)
    lk.add_argument("--data", required=True)
    lk.add_argument("--steps", type=int, default=100)
    lk.add_argument("--seed", type=int, default=0)
    lk.set_defaults(func=cmd_likelihood)
