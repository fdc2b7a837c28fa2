"""Training a score network with EMA, periodic checkpoints and resume.

``train`` is what the CLI, the admin training job and the tests call: it takes a tensor
data set in the model's [0, 1] range (or a callable giving batches), and reports progress
and honours a cancel check between steps. Checkpoints are safetensors (no pickle): the
network, its EMA copy and the optimiser state flattened to tensors, plus a JSON sidecar.

Every step draws its randomness from a generator seeded by (seed, step), so a run resumed
from a checkpoint continues bit-identically to one that was never interrupted.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.data import augment
from models.figures import grid, loss_curve
from models.io import save_png
from models.losses import ImportanceSampler, objective_loss
from models.nets.ncsn import NCSN
from models.nets.ncsnpp import NCSNpp
from models.nets.patch import PatchPrior, random_patches
from models.registry import save_model, score_fn_of, time_conditioned
from models.sampling.registry import sample
from models.sde import SDE

Progress = Callable[[int, int, float], None]
OnCheckpoint = Callable[[int, torch.nn.Module, list], None]


@dataclass
class TrainConfig:
    """Optimisation settings; defaults suit a small CPU prior at 64-128²."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-4
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    objective: str = "dsm"  # dsm | likelihood | ssm | ssm-vr | ncsn (losses.objective_loss)
    augment: bool = False  # flips, small rotations/scalings, intensity jitter (data.augment)
    max_zoom: float | None = None  # with augment: half the batch magnified up to this (close-ups)
    low_res: float | None = None  # with augment: half the batch coarsened up to this factor
    ema_warmup: bool = True  # False to fine-tune: the EMA starts at, and stays near, the weights
    bf16: bool = False  # bf16 autocast for forward/backward; weights and Adam stay fp32
    importance_sampling: bool = False
    checkpoint_every: int = 200
    patches_per_image: int = 8  # random crops per image and step, for a patch prior (PaDIS)
    seed: int = 0
    loss_log_every: int = 10


@dataclass
class TrainResult:
    net: NCSNpp
    ema: NCSNpp
    losses: list[tuple[int, float]]
    step: int


def portable_path(path: Path) -> str:
    """A path as a card records it: relative to the project when inside it, else the file's
    name alone, so no card names a folder of the machine that trained it."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return Path(path).name


class Cancelled(RuntimeError):
    """Training was asked to stop; the last checkpoint is kept."""


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): NCCL on GPUs,
    gloo on CPUs. Each rank keeps the same seed, so batches agree across ranks."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return distributed_rank()


def _global_mean(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world
    return float(value)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay warm-up min(decay, (1 + n) / (10 + n)): early averages forget the random
    initialisation quickly instead of dragging it along for ~1/(1 − decay) steps."""
    return min(decay, (1 + step) / (10 + step))


def _ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
            pe.mul_(decay).add_(p.detach(), alpha=1 - decay)


def save_checkpoint(path: Path, net, ema, opt, step: int, losses) -> None:
    tensors = {f"net.{k}": v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.state_dict().items()})
    meta = {"step": step, "losses": losses, "opt_param_groups": opt.state_dict()["param_groups"]}
    for pid, state in opt.state_dict()["state"].items():
        for name, val in state.items():
            if torch.is_tensor(val):
                tensors[f"opt.{pid}.{name}"] = val.detach().contiguous().cpu().reshape(val.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(meta))


def load_checkpoint(path: Path, net, ema, opt) -> tuple[int, list]:
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
    return meta["step"], [tuple(x) for x in meta["losses"]]


def train(
    net: NCSNpp | NCSN,
    sde: SDE,
    data: torch.Tensor,
    config: TrainConfig,
    checkpoint: str | Path | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    on_checkpoint: OnCheckpoint | None = None,
) -> TrainResult:
    """Score matching (``config.objective``) with Adam, warm-up, clipping and EMA; resumable.

    ``on_checkpoint(step, ema, losses)`` runs after each checkpoint is written (the CLI
    draws the loss curve and a sample grid there).
    """
    gen = torch.Generator()
    ema = copy.deepcopy(net)
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    step, losses = 0, []
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        step, losses = load_checkpoint(ckpt, net, ema, opt)
    sampler = ImportanceSampler(sde) if config.importance_sampling else None
    rank, world = distributed_rank()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must divide among {world} processes")
    trained = net
    patches = isinstance(net, PatchPrior)
    if patches and world > 1:
        raise ValueError("a patch prior trains in one process (no data parallelism yet)")
    if world > 1:
        # Every rank draws the same global batch and noise, keeps its shard, and DDP
        # averages the gradients: the update equals one process on the whole batch.
        trained = torch.nn.parallel.DistributedDataParallel(net)
    # The NCSN objective conditions on σ directly; every other objective on t.
    model = trained if config.objective == "ncsn" else time_conditioned(trained, sde)
    lead = rank == 0
    net.train()
    running = 0.0
    while step < config.steps:
        if cancel is not None and cancel():
            if ckpt is not None and lead:
                save_checkpoint(ckpt, net, ema, opt, step, losses)
                if on_checkpoint is not None:
                    on_checkpoint(step, ema, losses)
            raise Cancelled(f"training cancelled at step {step}")
        gen.manual_seed(config.seed * 1_000_003 + step)
        idx = torch.randint(len(data), (config.batch_size,), generator=gen)
        batch = data[idx]
        if config.augment:
            batch = augment(batch, gen, max_zoom=config.max_zoom, low_res=config.low_res)
        score_fn = model
        if patches:
            batch, pos = random_patches(batch, net.patch, config.patches_per_image, gen)
            score_fn = lambda x, t, pos=pos: net.patch_score(x, pos, t)  # noqa: E731
        for g in opt.param_groups:
            g["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
        with torch.autocast(batch.device.type, torch.bfloat16, enabled=config.bf16):
            loss = objective_loss(
                score_fn, sde, batch, config.objective, sampler, generator=gen, shard=(rank, world)
            ).float()
        value = _global_mean(loss.detach(), world)
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        opt.step()
        decay = ema_decay_at(step, config.ema_decay) if config.ema_warmup else config.ema_decay
        _ema_update(ema, net, decay)
        step += 1
        running += value
        if step % config.loss_log_every == 0 or step == config.steps:
            n = (
                config.loss_log_every
                if step % config.loss_log_every == 0
                else step % config.loss_log_every
            )
            losses.append((step, running / n))
            running = 0.0
        if progress is not None and lead:
            progress(step, config.steps, value)
        if (
            ckpt is not None
            and lead
            and (step % config.checkpoint_every == 0 or step == config.steps)
        ):
            save_checkpoint(ckpt, net, ema, opt, step, losses)
            if on_checkpoint is not None:
                on_checkpoint(step, ema, losses)
                net.train()
    net.eval()
    ema.eval()
    return TrainResult(net, ema, losses, step)


def fit_prior(
    data: torch.Tensor,
    out: str | Path,
    sde: SDE,
    net: NCSNpp | NCSN,
    config: TrainConfig,
    card: dict,
    resume: bool = True,
    checkpoint: str | Path | None = None,
    preview: int = 4,
    preview_steps: int = 100,
    figures: str | Path | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train and keep ``out`` a usable model directory throughout.

    At every checkpoint the EMA weights are exported with their card (so a long run can be
    used, or shipped, before it ends), and ``loss.png`` plus a ``preview``-sample grid drawn
    with the PC sampler are written to ``figures`` (default: ``out``). The resumable training
    state lives in ``checkpoint`` (default ``out/checkpoint.safetensors``); without
    ``resume`` it is discarded first.
    """
    out = Path(out)
    figures = Path(figures) if figures else out
    ckpt = Path(checkpoint) if checkpoint else out / "checkpoint.safetensors"
    if not resume and ckpt.exists():
        ckpt.unlink()
    name = card.get("name", out.name)
    start = time.monotonic()

    def export(step: int, ema: torch.nn.Module, losses: list) -> None:
        tail = [v for _, v in losses[-10:]]
        full = {
            **card,
            "steps": step,
            "total_steps": card.get("steps_before_run", 0) + step,
            "objective": config.objective,
            "train_config": dict(vars(config)),
            "final_loss": sum(tail) / len(tail) if tail else None,
            "loss_curve": losses,
            "weights": "ema",
            "wall_time_s_this_run": round(time.monotonic() - start, 1),
            "wall_time_s_total": round(
                card.get("wall_time_s_before_run", 0.0) + time.monotonic() - start, 1
            ),
            "loss_curve_png": portable_path(figures / f"{name}_loss.png"),
            "sample_grid_png": portable_path(figures / f"{name}_samples.png"),
        }
        save_model(out, ema, sde, full)
        loss_curve({config.objective: losses}, figures / f"{name}_loss.png", f"{name}: loss")
        if preview:
            size = card["image_size"]
            gen = torch.Generator().manual_seed(0)
            res = sample(
                "pc",
                sde,
                score_fn_of(ema, sde),
                (preview, 1, size, size),
                preview_steps,
                generator=gen,
            )
            save_png(figures / f"{name}_samples.png", grid(res.samples))
            ema.to(memory_format=torch.contiguous_format)

    result = train(net, sde, data, config, ckpt, progress, cancel, on_checkpoint=export)
    return result
