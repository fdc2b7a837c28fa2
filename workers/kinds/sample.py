"""Admin sampling jobs: unconditional samples from a prior."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch

from models.io import save_png
from service.db import (
    JobStore,
)
from service.results import ResultStore
from workers.kinds import register
from workers.runner import (
    cancel_check,
    load_prior,
    progress_writer,
    put_npy,
    resolve_model,
    succeed,
)

log = logging.getLogger(__name__)


@register("sampling")
def _sample(
    job, jobs: JobStore, results: ResultStore, models_dir: Path, settings=None, enqueue=None
) -> str:
    """Admin sampling: n samples from a prior with a named sampler; NPY and a grid PNG."""
    from models.figures import grid
    from models.sampling.registry import sample

    params = job.params
    prior = load_prior(resolve_model(job.model, models_dir), getattr(settings, "bf16", None))
    n, size = int(params.get("n", 16)), prior.image_size
    gen = torch.Generator().manual_seed(int(params.get("seed", 0)))
    res = sample(
        params.get("sampler", "pc"),
        prior.sde,
        prior.score_fn,
        (n, 1, size, size),
        int(params.get("steps", 500)),
        generator=gen,
        progress=progress_writer(job, jobs, "sampling"),
        cancel=cancel_check(job, jobs),
    )
    put_npy(results, job.id, "samples.npy", res.samples.numpy())
    buf = io.BytesIO()
    save_png(buf, grid(res.samples))
    results.put(job.id, "preview.png", buf.getvalue())
    report = {"nfe": res.nfe, "n": n, "sampler": params.get("sampler", "pc"), "model": job.model}
    return succeed(job, jobs, results, report, ["samples.npy", "preview.png"])
