"""Training a score network with EMA, periodic checkpoints and resume.

``train`` is what the CLI, the admin training job and the tests call: it takes a tensor
data set in the model's [0, 1] range (or a callable giving batches), and reports progress
and honours a cancel check between steps. Checkpoints are safetensors (no pickle): the
network, its EMA copy and the optimiser state flattened to tensors, plus a JSON sidecar.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.losses import ImportanceSampler, dsm_loss
from models.nets.ncsnpp import NCSNpp
from models.sde import SDE

Progress = Callable[[int, int, float], None]


@dataclass
class TrainConfig:
    """Optimisation settings; defaults suit a small CPU prior at 64-128²."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-4
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    weighting: str = "sigma2"
    importance_sampling: bool = False
    checkpoint_every: int = 200
    seed: int = 0
    loss_log_every: int = 10


@dataclass
class TrainResult:
    net: NCSNpp
    ema: NCSNpp
    losses: list[tuple[int, float]]
    step: int


class Cancelled(RuntimeError):
    """Training was asked to stop; the last checkpoint is kept."""


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
    net: NCSNpp,
    sde: SDE,
    data: torch.Tensor,
    config: TrainConfig,
    checkpoint: str | Path | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> TrainResult:
    """Denoising score matching (Eq. 7.7) with Adam, warm-up, clipping and EMA; resumable."""
    gen = torch.Generator().manual_seed(config.seed)
    ema = copy.deepcopy(net)
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    step, losses = 0, []
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        step, losses = load_checkpoint(ckpt, net, ema, opt)
        gen.manual_seed(config.seed + step)  # a resumed run continues with fresh batches
    sampler = ImportanceSampler(sde) if config.importance_sampling else None
    net.train()
    running = 0.0
    while step < config.steps:
        if cancel is not None and cancel():
            if ckpt is not None:
                save_checkpoint(ckpt, net, ema, opt, step, losses)
            raise Cancelled(f"training cancelled at step {step}")
        idx = torch.randint(len(data), (config.batch_size,), generator=gen)
        batch = data[idx]
        for g in opt.param_groups:
            g["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
        loss = dsm_loss(net, sde, batch, config.weighting, sampler, generator=gen)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        opt.step()
        _ema_update(ema, net, config.ema_decay)
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
        if progress is not None:
            progress(step, config.steps, value)
        if ckpt is not None and (step % config.checkpoint_every == 0 or step == config.steps):
            save_checkpoint(ckpt, net, ema, opt, step, losses)
    net.eval()
    ema.eval()
    return TrainResult(net, ema, losses, step)
