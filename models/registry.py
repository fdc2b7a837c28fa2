"""The model registry: a model is a directory with ``weights.safetensors`` and ``card.json``.

Weights are never pickled. The card records the architecture, the SDE and its parameters,
the image size, the intensity normalisation, what the model was trained on, the training
steps and loss curve, and the sha256 of the weights, which is checked on load.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.losses import ncsn_sigmas
from models.nets.ncsn import NCSN
from models.nets.ncsnpp import NCSNpp, NetConfig
from models.nets.patch import PatchPrior
from models.sde import SDE, SDES, VESDE, ScoreFn

WEIGHTS, CARD = "weights.safetensors", "card.json"
BUNDLED = Path(__file__).resolve().parent / "priors"  # the default priors that ship


class ModelError(ValueError):
    """A model directory that is missing, incomplete or corrupt."""


PICKLED = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin")  # never loaded


def check_safetensors(path: Path) -> None:
    """Refuse a weights file that is not safetensors (a pickle, a ``torch.save`` zip) before
    any loader reads it: a safetensors file starts with its header's length (8 bytes, little
    endian) and the JSON header itself."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if len(head) == 9 and head[8:9] == b"{" and size <= path.stat().st_size - 8:
        return
    what = "not a safetensors file"
    if head[:1] == b"\x80":
        what = "a pickle"
    elif head[:2] == b"PK":
        what = "a torch.save zip (pickled)"
    raise ModelError(
        f"{path}: {what}; weights load from safetensors only and are never unpickled "
        "(a pickle can run code): convert it with safetensors.torch.save_file"
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sde_to_dict(sde: SDE) -> dict:
    kind = next(k for k, v in SDES.items() if type(sde) is v)
    params = {k: v for k, v in vars(sde).items() if isinstance(v, int | float)}
    return {"kind": kind, **params}


def sde_from_dict(d: dict) -> SDE:
    params = dict(d)
    return SDES[params.pop("kind")](**params)


def _architecture(net: NCSNpp | NCSN | PatchPrior) -> dict:
    if isinstance(net, NCSN):
        return {"name": "ncsn", "n_sigmas": len(net.sigmas), **net.config.to_dict()}
    if isinstance(net, PatchPrior):
        return {"name": "ncsnpp-patch", "patch_size": net.patch, **net.config.to_dict()}
    return {"name": "ncsnpp", **net.config.to_dict()}


def time_conditioned(net: NCSNpp | NCSN, sde: SDE) -> ScoreFn:
    """The model as s(x, t) (differentiable): a noise-conditional NCSN is queried at σ(t)."""
    if isinstance(getattr(net, "module", net), NCSN):  # also through a DDP wrapper
        if not isinstance(sde, VESDE):
            raise ModelError("a noise-conditional NCSN pairs with a VE SDE only")
        return lambda x, t: net(x, sde.sigma(t))
    return net


def save_model(directory: str | Path, net: NCSNpp, sde: SDE, card: dict) -> Path:
    """Write weights and card atomically (temporary names, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_w = directory / (WEIGHTS + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(tmp_w))
    full = {
        **card,
        "architecture": _architecture(net),
        "sde": sde_to_dict(sde),
        "weights_sha256": sha256_file(tmp_w),
    }
    tmp_c = directory / (CARD + ".tmp")
    tmp_c.write_text(json.dumps(full, indent=2, default=list))
    tmp_w.replace(directory / WEIGHTS)
    tmp_c.replace(directory / CARD)
    return directory


def bundled_models() -> list[str]:
    """Names of the priors shipped with the project (``ct-default``, ``mri-default``)."""
    return sorted(p.parent.name for p in BUNDLED.glob(f"*/{CARD}"))


def resolve(model: str | Path) -> Path:
    """A model directory from a path, or from the name of a bundled prior."""
    path = Path(model)
    if (path / CARD).exists():
        return path
    if isinstance(model, str) and "/" not in model and (BUNDLED / model / CARD).exists():
        return BUNDLED / model
    names = ", ".join(bundled_models()) or "none"
    raise ModelError(
        f"model '{model}': not a model directory (with {CARD}) nor a bundled prior ({names})"
    )


def update_card(model: str | Path, updates: dict) -> Path:
    """Merge ``updates`` into a model's card (atomically); the weights are untouched."""
    directory = resolve(model)
    card = {**load_card(directory), **updates}
    tmp = directory / (CARD + ".tmp")
    tmp.write_text(json.dumps(card, indent=2, default=list))
    tmp.replace(directory / CARD)
    return directory


def load_card(directory: str | Path) -> dict:
    """The model card; a missing, unreadable or malformed card is a :class:`ModelError`."""
    path = resolve(directory) / CARD
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path.parent}: {CARD} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable ({exc}); re-export the model") from None
    if not isinstance(card, dict):
        raise ModelError(f"{path}: not a JSON object; re-export the model")
    return card


def card_modality(card: dict, name: str = "") -> str | None:
    """``ct`` or ``mri``: the card's ``modality``, else the ``ct-``/``mri-`` prefix of its
    name; ``None`` when neither says (such a model is not checked against the spec)."""
    value = str(card.get("modality", "")).lower()
    if value in ("ct", "mri"):
        return value
    for text in (str(card.get("name", "")), name):
        prefix = text.lower().split("-")[0]
        if prefix in ("ct", "mri"):
            return prefix
    return None


def load_model(directory: str | Path, device=None) -> tuple[NCSNpp | NCSN | PatchPrior, SDE, dict]:
    """Load a model (directory or bundled name), verifying the weights' sha256 against the card."""
    directory = resolve(directory)
    card = load_card(directory)
    wpath = directory / WEIGHTS
    if not wpath.exists():
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLED)
        why = f" ({', '.join(pickled)} not loaded: pickles are refused)" if pickled else ""
        raise ModelError(f"{directory}: {WEIGHTS} is missing{why}")
    check_safetensors(wpath)
    if sha256_file(wpath) != card.get("weights_sha256"):
        raise ModelError(f"{directory}: weights do not match the sha256 in {CARD}; re-export")
    sde = sde_from_dict(card["sde"])
    arch = {
        k: v for k, v in card["architecture"].items() if k not in ("name", "n_sigmas", "patch_size")
    }
    for key in ("channel_mult", "attention_levels"):
        arch[key] = tuple(arch[key])
    if card["architecture"].get("name") == "ncsn":
        n = card["architecture"]["n_sigmas"]
        net = NCSN(NetConfig(**arch), ncsn_sigmas(sde, n))
    else:
        sigma_fn = getattr(sde, "sigma", None) if arch.get("embedding") == "fourier" else None
        net = NCSNpp(NetConfig(**arch), sigma_fn)
        if card["architecture"].get("name") == "ncsnpp-patch":
            net = PatchPrior(net, int(card["architecture"]["patch_size"]))
    net.load_state_dict(load_file(str(wpath), device="cpu"))
    net.eval()
    if device is not None:
        net.to(device)
    return net, sde, card


def bf16_is_fast(device: str = "cpu") -> bool:
    """Whether bf16 autocast speeds the score network up here: a GPU with bf16 units, or a
    CPU on which :func:`bf16_speedup` measures at least :data:`BF16_MIN_SPEEDUP`.

    Measured rather than read from the CPU's flags, because the flags do not tell: on a Xeon
    with AVX-512 BF16 and no AMX a 128² slice took 21.2 s in bf16 against 15.5 s in fp32,
    on an AMX Xeon 10.0 s against 15.7 s, and on an AMD EPYC with AVX-512 BF16 and no AMX
    the network's forward pass took 0.21 s against 0.34 s (docs/benchmarks/speed.md)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bf16_speedup() >= BF16_MIN_SPEEDUP


BF16_MIN_SPEEDUP = 1.2  # below this the measured gain is within run-to-run noise


def cpu_key() -> str:
    """What the probe's result depends on: the CPU model, its thread count and torch."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
        model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in info.splitlines()
                if ln.startswith("model name")
            ),
            "",
        )
    except OSError:
        model = ""
    return (
        f"{model or 'unknown cpu'} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    )


@functools.cache
def bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of a block shaped like the score network's (3×3
    convolutions, GroupNorm, SiLU, 64 channels at 64², batch 4) on this CPU.

    Measured once per machine (about a second) and kept in the temporary directory, keyed
    by :func:`cpu_key`, so that every worker on a machine makes the same choice: the first
    process measures under a file lock, the others wait for it and read its result."""
    cache = Path(tempfile.gettempdir()) / "scorerecon-bf16-probe.json"
    key = cpu_key()
    try:
        lock = open(cache.with_suffix(".lock"), "a")
    except OSError:
        return _measure_bf16_speedup()  # an unwritable temporary directory: this process only
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
        known = known if isinstance(known, dict) else {}
        if isinstance(known.get(key), (int, float)):
            return float(known[key])
        speedup = _measure_bf16_speedup()
        try:
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known | {key: speedup}, indent=1))
            tmp.replace(cache)
        except OSError:
            pass
        return speedup


def _measure_bf16_speedup() -> float:
    block = torch.nn.Sequential(
        *[
            m
            for _ in range(3)
            for m in (
                torch.nn.Conv2d(64, 64, 3, padding=1),
                torch.nn.GroupNorm(16, 64),
                torch.nn.SiLU(),
            )
        ]
    ).eval()
    x = torch.randn(4, 64, 64, 64)

    def seconds(bf16: bool) -> float:
        best = float("inf")
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            block(x)  # warm-up: oneDNN picks and caches its kernels
            for _ in range(5):
                start = time.perf_counter()
                block(x)
                best = min(best, time.perf_counter() - start)
        return best

    return seconds(False) / seconds(True)


def score_fn_of(
    net: NCSNpp | NCSN, sde: SDE | None = None, channels_last: bool = True, bf16: bool = False
) -> ScoreFn:
    """The network as a score function s(x, t) for sampling: inference mode, optionally
    channels-last memory layout and bf16 autocast (faster where :func:`bf16_is_fast`,
    and on GPUs); outputs are returned in float32. ``sde`` is needed for an NCSN.
    """
    net.eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = time_conditioned(net, sde) if sde is not None else net

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            return model(x, t).float().contiguous()

    return score
