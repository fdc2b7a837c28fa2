"""The score network run by ONNX Runtime: the same s(x, t) as :func:`models.registry.score_fn_of`,
another engine, for CPU inference where it is faster (issue 22).

:func:`export` writes the network's graph (inputs ``x`` (B, C, H, W) and ``t`` (B,), batch
and image size dynamic) to an ``.onnx`` file; :func:`onnx_score_fn` loads one into an
``InferenceSession`` and returns a score function with the torch path's signature, so every
sampler takes either. Inference only: there is no autograd through ONNX Runtime, so
likelihood computation and training keep the torch path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.sde import ScoreFn


def available() -> bool:
    """Whether ONNX export and ONNX Runtime are installed (the ``onnx`` extra)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export(net: torch.nn.Module, path: str | Path, image_size: int, channels: int = 1) -> Path:
    """The network ``s(x, t)`` as an ONNX graph at ``path`` (opset 17), traced at
    ``image_size`` with the batch and image axes left dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = net.eval()
    x = torch.randn(2, channels, image_size, image_size)
    t = torch.full((2,), 0.5)
    axes = {"x": {0: "batch", 2: "rows", 3: "cols"}, "t": {0: "batch"}, "score": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(
            net,
            (x, t),
            str(path),
            input_names=["x", "t"],
            output_names=["score"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return path


def onnx_score_fn(path: str | Path, threads: int | None = None) -> ScoreFn:
    """A score function s(x, t) → float32 tensor computed by ONNX Runtime on the CPU from the
    graph at ``path``; ``threads``: intra-op threads (default: torch's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        feed = {
            "x": np.ascontiguousarray(x.detach().float().cpu().numpy()),
            "t": np.ascontiguousarray(t.detach().cpu().numpy()),
        }
        (out,) = session.run(["score"], feed)
        return torch.from_numpy(out).to(x.device)

    return score
