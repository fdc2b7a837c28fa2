"""``scorerecon`` command line: simulate measurements and run classical baselines."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models import cli_recon, default_priors
from models.baselines import METHODS, reconstruct_baseline
from models.cli_prior import add_commands
from models.io import load_image, load_problems, save_png
from models.metrics import data_residual, psnr, ssim
from models.noise import add_noise
from models.physics import SpecError, from_spec, parse_spec


def _read_spec(path: str):
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise SpecError(f"--spec: cannot read '{path}': {exc.strerror}") from None
    return parse_spec(text)


def simulate(args: argparse.Namespace) -> int:
    """Image + spec → measurement file (and the reference image actually used)."""
    spec = _read_spec(args.spec)
    image = load_image(args.image, spec.image_size)
    op = from_spec(spec)
    with torch.no_grad():
        y = op.forward(image)
    noise_std = args.noise_std if args.noise_std is not None else (spec.noise_std or 0.0)
    y = add_noise(y, noise_std, torch.Generator().manual_seed(args.seed))
    np.save(args.out, y.numpy())
    if args.reference_out:
        np.save(args.reference_out, image.numpy())
    print(f"wrote {args.out} shape={tuple(y.shape)} dtype={y.dtype}")
    return 0


def baseline(args: argparse.Namespace) -> int:
    """Measurement + spec → reconstruction NPY, preview PNG and report.json."""
    spec = _read_spec(args.spec)
    ops, y = load_problems(args.input, spec)
    start = time.perf_counter()
    x = torch.cat([reconstruct_baseline(op, y[i : i + 1], args.method) for i, op in enumerate(ops)])
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "recon.npy", x.numpy())
    save_png(out / "preview.png", x[0, 0])
    report = {
        "method": args.method,
        "seconds": round(seconds, 4),
        "spec": spec.model_dump(exclude_none=True),
        "data_residual": max(
            data_residual(op, x[i : i + 1], y[i : i + 1]) for i, op in enumerate(ops)
        ),
    }
    if args.reference:
        ref = torch.from_numpy(np.load(args.reference, allow_pickle=False)).reshape(x[:1].shape)
        report["psnr"] = psnr(x[0], ref[0])
        report["ssim"] = ssim(x[0], ref[0])
        report["data_range"] = 1.0
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "spec"}))
    return 0


def build_parser(extensions=()) -> argparse.ArgumentParser:
    """The ``scorerecon`` parser; ``extensions`` add commands from outside the core
    (the gateway's ``serve`` and ``keys``) without the core importing them."""
    parser = argparse.ArgumentParser(prog="scorerecon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="simulate a measurement from an image and a spec")
    s.add_argument("--image", required=True, help=".npy, .png or .dcm image")
    s.add_argument("--spec", required=True, help="measurement spec JSON file")
    s.add_argument("--out", required=True, help="measurement .npy to write")
    s.add_argument("--reference-out", help="write the image actually used here (.npy)")
    s.add_argument(
        "--noise-std", type=float, help="Gaussian noise std per real component (overrides the spec)"
    )
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=simulate)
    b = sub.add_parser("baseline", help="reconstruct with a classical method")
    b.add_argument("--input", required=True, help="measurement .npy")
    b.add_argument("--spec", required=True, help="measurement spec JSON file")
    b.add_argument("--method", required=True, choices=sorted(METHODS))
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--reference", help="reference image .npy for PSNR/SSIM")
    b.set_defaults(func=baseline)
    add_commands(sub)
    cli_recon.add_commands(sub)
    default_priors.add_commands(sub)
    for extend in extensions:
        extend(sub)
    return parser


def main(argv: list[str] | None = None, extensions=()) -> int:
    args = build_parser(extensions).parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
