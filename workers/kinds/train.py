"""Admin training jobs: a prior trained on a registered folder, an uploaded dataset or series
retrieved from a PACS.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from models.inverse import (
    Cancelled,
)
from service.db import (
    JobStore,
)
from service.results import ResultStore
from workers.kinds import register
from workers.runner import cancel_check, progress_writer, succeed

log = logging.getLogger(__name__)


def _training_data(job, jobs: JobStore, settings) -> Path:
    """The folder to train on: registered, uploaded (a dataset), or retrieved from a PACS
    into a folder of the job's own (kept, so a retried job does not fetch twice)."""
    from service.settings import Settings

    p = job.params
    if "data_dir" in p:
        return Path(p["data_dir"])
    settings = settings or Settings()
    if "dataset" in p:
        return settings.home / "datasets" / p["dataset"]
    from service.pacs import Destination, PermanentError, TransientError, retrieve

    out = settings.home / "datasets" / f"pacs-{job.id}"
    done = out / ".retrieved.json"
    if not done.exists():
        src = p["pacs"]
        try:
            dest = Destination.from_settings(src["destination"], settings.pacs)
            report = retrieve(
                dest,
                src["query"],
                int(src.get("limit", 100)),
                out,
                progress_writer(job, jobs, "retrieving"),
            )
        except PermanentError as exc:
            raise ValueError(str(exc)) from None
        except TransientError as exc:
            raise OSError(str(exc)) from None
        if report["instances"] == 0:
            raise ValueError(f"the PACS query {src['query']} matched no instances")
        done.write_text(json.dumps(report))
    return out


@register("training")
def _train(
    job, jobs: JobStore, results: ResultStore, models_dir: Path, settings=None, enqueue=None
) -> str:
    """Admin training: a prior trained on a registered server-side folder; the new model
    appears under ``models_dir`` (and in GET /v1/models) when it is written."""
    from models.data import load_dataset
    from models.nets.ncsnpp import build
    from models.sde import VESDE, sigma_max_from_data
    from models.training import Cancelled as TrainCancelled
    from models.training import TrainConfig, fit_prior

    p = job.params
    size = int(p.get("image_size", 128))
    data_dir = _training_data(job, jobs, settings)
    ds = load_dataset(data_dir, size, tuple(p.get("axes", [0])), float(p.get("val_fraction", 0.1)))
    sde = VESDE(0.01, max(1.0, sigma_max_from_data(ds.train)))
    net = build(p.get("preset", "small"), sde.sigma)
    cfg = TrainConfig(
        steps=int(p.get("steps", 1000)),
        batch_size=int(p.get("batch_size", 8)),
        objective=p.get("objective", "dsm"),
        augment=bool(p.get("augment", False)),
        checkpoint_every=int(p.get("checkpoint_every", 200)),
    )
    card = {
        "name": p["model_id"],
        "image_size": size,
        "intensity": "[0, 1]; CT: (HU + 1000) / 4000; MR: magnitude / 99.5th percentile",
        "training_data": {
            "directory": str(data_dir),
            "source": {k: p[k] for k in ("data_dir", "dataset", "pacs") if k in p},
            "train_volumes": ds.train_volumes,
            "validation_volumes": ds.val_volumes,
            "skipped_files": len(ds.report.skipped),
        },
        "n_images": len(ds.train),
        "trained_by_job": job.id,
    }
    out = models_dir / p["model_id"]
    cancel = cancel_check(job, jobs)
    try:
        fit_prior(
            ds.train,
            out,
            sde,
            net,
            cfg,
            card,
            resume=True,
            preview=int(p.get("preview", 4)),
            progress=progress_writer(job, jobs, "training"),
            cancel=cancel,
        )
    except TrainCancelled as exc:
        raise Cancelled(str(exc)) from None
    report = {"model": p["model_id"], "steps": cfg.steps, "n_images": len(ds.train)}
    return succeed(job, jobs, results, report, [])
