"""Training the priors that ship with the project (``models/priors/<name>/``).

``scorerecon train-default ct-default --hours 2`` trains (or continues training) a bundled
prior in the background-friendly way the CPU budget requires: the exact training state is
checkpointed under ``runs/<name>/`` every few minutes and a run stopped by ``--hours``, by
Ctrl-C or by a crash resumes from it; at every checkpoint the EMA weights, the card, the loss
curve and a sample grid are refreshed, so the shipped prior is always the latest usable one.
Where no checkpoint exists (a fresh clone) but the bundled prior does, training warm-starts
from the bundled weights with a fresh optimiser, and the card's step count adds up.

Training data (DESIGN.md, Data): CT uses the procedural phantoms of :mod:`models.phantoms`
(thorax, abdomen and head); MRI uses the MNI152 T1 template that nilearn ships, sliced along
all three axes and augmented, mixed with MRI phantoms. Each recipe also names its validation
data (never trained on). ``--real-data`` adds the train split of the real CT / MR that
``scorerecon data fetch`` takes from Debian packages (:mod:`models.realdata`: a head CT and
the Colin27 T1), repeated to about ``REAL_FRACTION`` of the training set, and records their
packages and licences in the card.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from models.io import HUMapping
from models.nets.ncsnpp import build
from models.nets.patch import PatchPrior, from_whole_image
from models.phantoms import ct_phantoms, mri_phantoms
from models.registry import BUNDLED, CARD, WEIGHTS, load_card, load_model
from models.sde import VESDE, sigma_max_from_data
from models.training import Cancelled, TrainConfig, fit_prior

ROOT = Path(__file__).resolve().parent.parent


def _ct_data(n: int, size: int, split: str) -> torch.Tensor:
    # Training phantoms come from seed 0; validation from seed 1, so no slice is shared.
    return ct_phantoms(n, size, seed=0 if split == "train" else 1, progress=split == "train")


MNI_SLAB = (0.45, 0.55)  # held-out fraction of each axis for validation, with a guard gap
MNI_GAP = 0.03


def mni152_slices(size: int, split: str) -> torch.Tensor:
    """Slices of nilearn's MNI152 T1 template (1 mm, skull-stripped) along all three axes.

    One template cannot be split by volume, so validation is the central slab
    ``MNI_SLAB`` of each axis and training keeps only slices at least ``MNI_GAP`` of the
    axis away from it (no neighbouring slices on both sides of the split).
    """
    import nilearn
    from nilearn.datasets import load_mni152_template

    from models.data import Volume, slices, to_unit
    from models.io import fit_square

    img = load_mni152_template(resolution=1)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    vol = np.ascontiguousarray(np.transpose(data, (2, 1, 0))[:, ::-1, :])
    unit = to_unit(Volume(f"nilearn {nilearn.__version__} MNI152", "nifti", "MR", vol, (1, 1, 1)))
    out = []
    for axis in range(3):
        stack = slices(unit, axis)
        n = len(stack)
        lo, hi = int(MNI_SLAB[0] * n), int(MNI_SLAB[1] * n)
        gap = int(MNI_GAP * n)
        for i, sl in enumerate(stack):
            held = lo <= i < hi
            near = lo - gap <= i < hi + gap
            if (split == "val") != held or (split == "train" and near):
                continue
            if float((sl > 0.05).mean()) < 0.05:
                continue
            out.append(fit_square(np.ascontiguousarray(sl, dtype=np.float64), size))
    return torch.from_numpy(np.stack(out).astype(np.float32))[:, None]


def _mri_data(n: int, size: int, split: str) -> torch.Tensor:
    """MNI152 slices (repeated to half of the set; augmentation varies them) + MRI phantoms."""
    mni = mni152_slices(size, split)
    if split == "val":
        return torch.cat([mni, mri_phantoms(len(mni), size, seed=1)])
    reps = max(1, (n // 2) // len(mni))
    phantoms = mri_phantoms(n - reps * len(mni), size, seed=0, progress=True)
    return torch.cat([mni.repeat(reps, 1, 1, 1), phantoms])


ARCHS = ("whole", "patch")
PATCH_SIZE = 32  # of a patch prior at 128² (PaDIS uses ~1/4.5 of the image side)
REAL_FRACTION = 0.25  # share of the training set that the real slices are repeated to


@dataclass(frozen=True)
class PriorRecipe:
    """What a bundled prior is trained on and how."""

    name: str
    image_size: int
    n_train: int
    preset: str
    intensity: str
    data: list[dict]
    make_data: Callable[[int, int, str], torch.Tensor]
    modality: str  # of the real data (models/realdata.py) that ``real=True`` adds
    augment: bool = False

    def training_data(
        self, split: str = "train", real: bool = False, real_fraction: float = REAL_FRACTION
    ) -> torch.Tensor:
        """The recipe's data of ``split``; with ``real``, the fetched real slices of the same
        split (models/realdata.py, ``scorerecon data fetch``) are added, repeated in the
        training set to about ``real_fraction`` of it."""
        n = self.n_train if split == "train" else 256
        if not real:
            return self.make_data(n, self.image_size, split)
        extra = real_training_slices(self.modality, split, self.image_size)
        if split != "train":
            return torch.cat([self.make_data(n, self.image_size, split), extra])
        if not 0 < real_fraction < 1:
            raise ValueError("real_fraction must be in (0, 1)")
        reps = max(1, round(real_fraction * n / max(len(extra), 1)))
        base = self.make_data(max(1, n - reps * len(extra)), self.image_size, split)
        return torch.cat([extra.repeat(reps, 1, 1, 1), base])


def real_training_slices(modality: str, split: str, size: int) -> torch.Tensor:
    """The real slices of ``split`` (models/realdata.py) as (N, 1, size, size); a clear error
    when they have not been fetched."""
    from models.realdata import real_slices

    arr = real_slices(modality, split, size)
    if len(arr) == 0:
        raise ValueError(f"no real {modality} slices in the {split} split of the fetched data")
    return torch.from_numpy(arr)[:, None]


HU = HUMapping()
RECIPES = {
    "ct-default": PriorRecipe(
        name="ct-default",
        image_size=128,
        n_train=20_000,
        preset="small",
        intensity=f"x = clip((HU - ({HU.hu_air:g})) / ({HU.hu_max:g} - ({HU.hu_air:g})), 0, 1)",
        data=[
            {
                "source": "models/phantoms.py: ct_phantoms(kinds=thorax, abdomen, head)",
                "files": "none (generated procedurally at training time; train seed 0, "
                "validation seed 1)",
                "licence": "project code (same licence as scorerecon)",
            }
        ],
        make_data=_ct_data,
        modality="ct",
    ),
    "mri-default": PriorRecipe(
        name="mri-default",
        image_size=128,
        n_train=12_000,
        preset="small",
        intensity="magnitude / 99.5th percentile of the volume's foreground, clipped to [0, 1]",
        data=[
            {
                "source": "nilearn.datasets.load_mni152_template(resolution=1), sliced along "
                "all three axes, central 10 % slab of each axis held out for validation",
                "files": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                "licence": "MNI ICBM 2009a template, (c) 1993-2009 Louis Collins, McConnell "
                "Brain Imaging Centre, MNI, McGill University: use, copy, modify and distribute "
                "with the copyright notice (as redistributed by nilearn, BSD-3-Clause)",
            },
            {
                "source": "models/phantoms.py: mri_phantoms(contrast=mixed), T1/T2-like brains",
                "files": "none (generated procedurally; train seed 0, validation seed 1)",
                "licence": "project code (same licence as scorerecon)",
            },
        ],
        make_data=_mri_data,
        modality="mr",
        augment=True,
    ),
}


CARRIED = ("recon",)  # card sections a continued run keeps (the solver's tuned values)


def train_default(
    name: str,
    steps: int,
    hours: float | None = None,
    batch_size: int = 8,
    lr: float = 2e-4,
    checkpoint_every: int = 250,
    bf16: bool = False,
    runs: Path = ROOT / "runs",
    out: Path = BUNDLED,
    figures: Path = ROOT / "docs" / "models",
    real_data: bool = False,
    arch: str = "whole",
    model_dir: Path | None = None,
    patch_size: int = PATCH_SIZE,
    max_zoom: float | None = None,
    low_res: float | None = None,
) -> int:
    """Train ``name`` until ``steps`` (total, this run's) or ``hours`` of wall time; with
    ``real_data``, on the recipe's data plus the train split of the fetched real data.

    ``arch="patch"`` trains a PaDIS patch prior (models/nets/patch.py) instead of the
    whole-image network; a new one warm-starts from the bundled whole-image weights.
    ``model_dir`` (default: the bundled ``models/priors/<name>``) is where the model goes; a
    candidate trained elsewhere keeps its checkpoint in ``runs/<its folder name>`` and its
    figures beside it, so the shipped prior is untouched until it is chosen. ``max_zoom``
    adds close-ups to the augmentation, ``low_res`` coarse noisy scans
    (:func:`models.data.augment`). A run warm-started from shipped weights fine-tunes them:
    its EMA starts at those weights at its full decay instead of forgetting them at once.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if bf16:
        from models.registry import bf16_is_fast

        if not bf16_is_fast():
            print(
                "warning: bf16 measures no faster than fp32 on this machine (no bf16 units; "
                "a training step can take 30x longer): leave out --bf16"
            )
    recipe = RECIPES[name]
    bundled = model_dir is None
    model_dir = out / name if model_dir is None else Path(model_dir)
    if not bundled:
        figures = model_dir
    if (model_dir / CARD).exists():
        held = load_card(model_dir).get("architecture", {}).get("name")
        kind = "patch" if held == "ncsnpp-patch" else "whole"
        if kind != arch:
            raise ValueError(
                f"{model_dir} holds a {kind} prior; train it with --arch {kind}, or pass "
                f"--out with a new folder for a {arch} prior"
            )
    if real_data:
        from models.realdata import real_slices, training_report, training_sources

        print(training_report("train", recipe.modality))
        if len(real_slices(recipe.modality, "train", recipe.image_size)) == 0:
            print(f"no real {recipe.modality} train slices: training on the recipe's data only")
            real_data = False
    data = recipe.training_data("train", real=real_data)
    sources = list(recipe.data)
    if real_data:
        sources += [
            e | {"share": f"repeated to ~{REAL_FRACTION:.0%} of the training set"}
            for e in training_sources("train", recipe.modality)
        ]
    ckpt = runs / model_dir.name / "checkpoint.safetensors"
    previous_steps, previous_wall, carried = 0, 0.0, {}
    if (model_dir / "card.json").exists():
        card = load_card(model_dir)
        # The solver's tuned values carry over to the continued weights, so a candidate is
        # compared at the settings of the prior it came from; an OOD calibration, which
        # belongs to the weights it was fitted with, does not (rerun benchmarks/ood.py).
        carried = {key: card[key] for key in CARRIED if key in card}
        sde = VESDE(card["sde"]["sigma_min"], card["sde"]["sigma_max"], card["sde"]["N"])
        previous_wall = float(card.get("wall_time_s_total", card.get("wall_time_s_this_run", 0)))
        # Resuming this lineage, steps continue from the checkpoint; without one (a fresh
        # clone) training warm-starts from the shipped weights and counts on from them.
        key = "steps_before_run" if ckpt.exists() else "total_steps"
        previous_steps = int(card.get(key, 0))
    elif arch == "patch" and (out / name / CARD).exists():
        # A new patch prior starts from the whole-image prior: its SDE, weights and history.
        whole, sde, card = load_model(out / name)
        previous_steps = int(card.get("total_steps", 0))
        previous_wall = float(card.get("wall_time_s_total", 0.0))
    else:
        sde = VESDE(0.01, sigma_max_from_data(data))
    net = build(recipe.preset, sde.sigma)
    if arch == "patch":
        if not (model_dir / WEIGHTS).exists() and not ckpt.exists() and previous_steps:
            net = from_whole_image(whole)
            print(f"patch prior warm-started from the whole-image {name} ({previous_steps} steps)")
        else:
            net = from_whole_image(net)
        net = PatchPrior(net, patch_size)
    if not ckpt.exists() and (model_dir / WEIGHTS).exists():
        net.load_state_dict(load_file(str(model_dir / WEIGHTS)))
        print(f"warm start from {model_dir} ({previous_steps} steps)")
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        checkpoint_every=checkpoint_every,
        warmup=100 if previous_steps == 0 else 20,
        augment=recipe.augment or real_data or max_zoom is not None or low_res is not None,
        max_zoom=max_zoom,
        low_res=low_res,
        ema_warmup=previous_steps == 0,
        bf16=bf16,
    )
    card = {
        "name": name,
        "modality": "ct" if recipe.modality == "ct" else "mri",
        "image_size": recipe.image_size,
        "intensity": recipe.intensity,
        "training_data": sources,
        "n_images": len(data),
        "steps_before_run": previous_steps,
        "wall_time_s_before_run": previous_wall,
        "sigma_max_rule": "NCSNv2 technique 1: max pairwise Euclidean distance of training data",
        **carried,
    }
    deadline = time.monotonic() + hours * 3600 if hours else None
    bar = tqdm(total=steps, desc=f"train {name}", unit="step")

    def progress(step: int, total: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4g}")
        bar.refresh()

    def cancel() -> bool:
        return deadline is not None and time.monotonic() > deadline

    try:
        fit_prior(
            data,
            model_dir,
            sde,
            net,
            cfg,
            card,
            checkpoint=ckpt,
            figures=figures,
            progress=progress,
            cancel=cancel,
        )
    except Cancelled as exc:
        print(f"stopped: {exc}; resume with the same command")
    bar.close()
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("train-default", help="train or continue a bundled default prior")
    p.add_argument("name", choices=sorted(RECIPES))
    p.add_argument("--steps", type=int, default=20_000, help="steps of this run (resumable)")
    p.add_argument("--hours", type=float, default=None, help="stop after this wall time")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (~1.8x faster on CPU)")
    p.add_argument(
        "--real-data",
        action="store_true",
        help="add the train split of the fetched real data (scorerecon data fetch)",
    )
    p.add_argument(
        "--arch",
        choices=ARCHS,
        default="whole",
        help="whole-image NCSN++ or a PaDIS patch prior (warm-started from the whole-image one)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="model directory to train (default: the bundled models/priors/NAME); a candidate "
        "trained elsewhere leaves the shipped prior untouched",
    )
    p.add_argument("--patch-size", type=int, default=PATCH_SIZE)
    p.add_argument(
        "--max-zoom",
        type=float,
        default=None,
        help="augment half of each batch with close-ups magnified up to this factor",
    )
    p.add_argument(
        "--low-res",
        type=float,
        default=None,
        help="augment half of each batch with coarse noisy scans, coarsened up to this factor",
    )
    p.add_argument("--lr", type=float, default=2e-4, help="Adam's learning rate")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    return train_default(
        args.name,
        args.steps,
        args.hours,
        args.batch_size,
        lr=args.lr,
        bf16=args.bf16,
        real_data=args.real_data,
        arch=args.arch,
        model_dir=args.out,
        patch_size=args.patch_size,
        max_zoom=args.max_zoom,
        low_res=args.low_res,
    )
