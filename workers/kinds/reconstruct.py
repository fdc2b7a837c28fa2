"""Reconstruction jobs: a stack of slices solved by the core (``models.inverse``), its
classical baseline, the report and the result files; a volume of more than the site's
``slab_slices`` is split into ``slab`` jobs that any workers run, and the slab that ends
last assembles the volume (:func:`settle`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.baselines import baseline_name, reconstruct_baseline
from models.figures import preview
from models.inverse import (
    ReconConfig,
    Reconstruction,
    centre_columns,
    merge,
    reconstruct,
)
from models.io import save_png
from models.ood import summary as ood_summary
from models.physics import needs_data, parse_spec, slice_problems
from models.physics.ct import remove_metal_trace
from service.db import (
    BATCH_SLICES,
    FINAL,
    JobStore,
    now,
    slab_id,
    slab_ranges,
)
from service.results import ResultStore
from workers.kinds import register
from workers.runner import (
    CANCEL_POLL_S,
    Throttle,
    cancel_check,
    load_prior,
    put_npy,
    resolve_model,
    succeed,
)

log = logging.getLogger(__name__)


# A slab's arrays, kept until the volume is assembled (its report.json stays).
SLAB_ARRAYS = ("slab.npz", "slab.json")


@register("reconstruction")
def _reconstruct(
    job, jobs: JobStore, results: ResultStore, models_dir: Path, settings=None, enqueue=None
) -> str:
    """A reconstruction job: the whole stack here, or, for a volume of more than the site's
    ``slab_slices``, its slabs as ``slab`` jobs that any workers run (:func:`_split`)."""
    spec = parse_spec(job.spec)
    y = measurement(job, results)
    slabs = job.params.get("slabs") or slab_ranges(
        len(y), _batch(job, spec), getattr(settings, "slab_slices", 0)
    )
    if len(slabs) > 1:
        return _split(job, jobs, results, [tuple(r) for r in slabs], enqueue)
    progress = _stack_progress(job, jobs, len(y))
    solved = solve(
        job, jobs, results, models_dir, settings, y, 0, cancel_check(job, jobs), progress
    )
    return store_reconstruction(job, jobs, results, *solved)


def measurement(job, results: ResultStore) -> torch.Tensor:
    return torch.from_numpy(
        np.load(io.BytesIO(results.get(job.id, "measurement.npy")), allow_pickle=False)
    )


def _batch(job, spec) -> int:
    """Slices per batch: 1 for per-slice problems (coil maps from each slice's data)."""
    return 1 if needs_data(spec) else max(1, int(job.params.get("batch_slices", BATCH_SLICES)))


def solve(
    job,
    jobs: JobStore,
    results: ResultStore,
    models_dir: Path,
    settings,
    y: torch.Tensor,
    first: int,
    cancel: Callable[[], bool],
    progress: Callable[[int, int], None],
) -> tuple[Reconstruction, torch.Tensor, dict]:
    """Reconstruct ``y``, slices ``first``… of ``job``'s measurement (the index fixes each
    slice's random stream): the core's result, the classical baseline, and how it was done
    (for the report)."""
    spec, params = parse_spec(job.spec), job.params
    # One operator for the stack, or one per slice (maps and whitening from its own data).
    noise, coil_noise = None, None
    if needs_data(spec):
        coil_noise = "oversampled readout" if y.shape[-2] == 2 * spec.shape[0] else "readout ends"
        if results.exists(job.id, "noise.npy"):
            noise = torch.from_numpy(
                np.load(io.BytesIO(results.get(job.id, "noise.npy")), allow_pickle=False)
            )
            coil_noise = f"noise scan ({noise.shape[-1]} samples per coil)"
    ops, y = slice_problems(spec, y, noise)
    op = ops[0]
    expected = tuple(op.measurement_shape())
    if y.ndim != len(expected) + 1 or tuple(y.shape[1:]) != expected:
        raise ValueError(f"stored measurement {tuple(y.shape)} does not match the spec {expected}")
    base = torch.cat(
        [reconstruct_baseline(o, y[i : i + 1], baseline_name(o)) for i, o in enumerate(ops)]
    )
    if spec.metal_threshold_hu is not None:
        op, y, _ = remove_metal_trace(op, y, threshold_hu=spec.metal_threshold_hu)
        ops = [op] * len(y)
    prior = load_prior(resolve_model(job.model, models_dir), getattr(settings, "bf16", None))
    config = ReconConfig.for_prior(
        prior, spec.modality, params.get("sampler"), params.get("nfe"), ops[0]
    )
    # The stack runs in batches of ``batch_slices`` (× K samples each), in slice order;
    # progress counts steps over all batches.
    k = int(params.get("samples") or config.samples)  # none named: the card's default
    per = _batch(job, spec)
    chunks = list(range(0, y.shape[0], per))
    parts = []
    for c, start in enumerate(chunks):

        def chunk_progress(step: int, total: int, c: int = c) -> None:
            progress(c * total + step, len(chunks) * total)

        part = reconstruct(
            ops[start],
            y[start : start + per],
            prior,
            config,
            k,
            int(params.get("seed", 0)) + first + start,
            spec.noise_std,
            chunk_progress,
            cancel,
        )
        if part.diverged is not None:
            # Never a success: a diverged result would be exported and read as an image.
            raise ValueError(f"the reconstruction diverged ({part.diverged})")
        parts.append(part)
    info = {
        "baseline": baseline_name(op),
        "batch_slices": per,
        "steps": config.n_steps * config.nfe_per_step() * len(chunks),
    }
    if coil_noise is not None:  # where the coil noise covariance for pre-whitening came from
        info["coil_noise_source"] = coil_noise
    return merge(parts), base, info


def store_reconstruction(
    job, jobs: JobStore, results: ResultStore, rec: Reconstruction, base: torch.Tensor, info: dict
) -> str:
    """Store a reconstruction's arrays, preview and report.json, and succeed the job; an
    MR image solved on more encoded columns than its header displays is cropped, centred,
    to them (``display_columns``, fastMRI's reconSpace)."""
    # Compare-and-set: a second assembler of a volume must not touch a finished job.
    jobs.transition(job.id, ["running"], "running", phase="storing")
    columns = job.params.get("display_columns")
    if columns and columns < rec.mean.shape[-1]:
        info = {**info, "reconstructed_columns": int(rec.mean.shape[-1])}
        rec, base = rec.centre_columns(columns), centre_columns(base, columns)
    put_npy(results, job.id, "recon.npy", rec.mean.numpy())
    put_npy(results, job.id, "std.npy", rec.std.numpy())
    put_npy(results, job.id, "baseline.npy", base.numpy())
    if rec.phase is not None:  # MR images are complex: their phase, in radians
        put_npy(results, job.id, "phase.npy", rec.phase.numpy())
    unit = (rec.provenance.get("intensity_scale") or [1.0])[0]
    image, scale = preview(rec.mean[0], rec.std[0], base[0], unit)
    buf = io.BytesIO()
    save_png(buf, image)
    results.put(job.id, "preview.png", buf.getvalue())
    report = {
        "nfe": rec.nfe,
        "seconds": round(rec.seconds, 3),
        "residual": rec.residual,
        "slices": int(rec.mean.shape[0]),
        "noise_std_used": rec.noise_std_used,
        "noise_std_source": rec.provenance["noise_std_source"],
        "warnings": rec.warnings,
        "provenance": {**rec.provenance, "spec": job.spec, "batch_slices": info["batch_slices"]},
        "preview": f"reconstruction | posterior std (max {scale:.4g}) | {info['baseline']}",
        "baseline": info["baseline"],
        "ood": ood_summary(rec.ood),
    }
    for key in ("coil_noise_source", "slabs", "reconstructed_columns"):
        if key in info:
            report[key] = info[key]
    fields = {"progress_step": info["steps"], "progress_total": info["steps"]}
    fields["ood"] = report["ood"]
    keys = ["recon.npy", "std.npy", "baseline.npy", "preview.png"]
    keys += ["phase.npy"] if rec.phase is not None else []
    return succeed(job, jobs, results, report, keys, **fields)


def _sampling_phase(done: float, slices: int) -> str:
    """The phase a stack shows while it samples: how many of its slices are done."""
    return f"sampling {int(done + 1e-6)}/{slices} slices" if slices > 1 else "sampling"


def _stack_progress(job, jobs: JobStore, slices: int) -> Callable[[int, int], None]:
    """Progress of a stack solved here: steps over all its batches, slices done (a slice is
    done when its batch's share of the steps is; the batches have equal step counts)."""
    tick = Throttle()

    def progress(step: int, total: int, *_: object) -> None:
        if tick.due(step == total):
            phase = _sampling_phase(slices * step / max(total, 1), slices)
            jobs.set_fields(
                job.id, progress_step=step, progress_total=total, phase=phase, heartbeat_at=now()
            )

    return progress


# Volumes split into slabs (issue 22): one job to the client, its parts run by any workers.


def _split(job, jobs: JobStore, results: ResultStore, slabs: list[tuple[int, int]], enqueue) -> str:
    """Record the volume's slabs, create a ``slab`` job for each (once: their ids derive
    from the volume's) and queue the new ones; the volume then waits, ``running``, while its
    parts run, and the part that finishes last assembles it (:func:`settle`). Idempotent,
    so a volume run again after a crash picks up where it was."""
    if job.params.get("slabs") != [list(r) for r in slabs]:
        jobs.set_fields(job.id, params={**job.params, "slabs": [list(r) for r in slabs]})
    jobs.set_fields(job.id, phase=_sampling_phase(0, slabs[-1][1]), heartbeat_at=now())
    volume = jobs.get(job.id)
    for part in jobs.add_slabs(volume, slabs):
        if enqueue is not None:  # else the sweep sends it
            enqueue(part, "slab")
    return settle(job.id, jobs, results)


def volume_parts(jobs: JobStore, volume) -> list:
    return jobs.get_many([slab_id(volume.id, start) for start, _ in volume.params["slabs"]])


@register("slab")
def _slab(
    job, jobs: JobStore, results: ResultStore, models_dir: Path, settings=None, enqueue=None
) -> str:
    """One slab of a volume: its slices solved as the unsplit job would solve them (same
    batches, same random streams), stored as ``slab.npz`` + ``slab.json`` for assembly."""
    volume = jobs.get(job.params["volume"])
    if volume is None or volume.state != "running":
        jobs.transition(job.id, ["running"], "cancelled", finished_at=now(), phase="cancelled")
        return "cancelled"
    start, stop = job.params["start"], job.params["stop"]
    y = measurement(volume, results)[start:stop]
    own, check = cancel_check(job, jobs), Throttle(CANCEL_POLL_S)

    def cancel() -> bool:
        if own():
            return True
        if not check.due():
            return False
        current = jobs.get(volume.id)
        return current is None or current.cancel_requested or current.state != "running"

    progress = _slab_progress(job, volume, jobs)
    rec, base, info = solve(volume, jobs, results, models_dir, settings, y, start, cancel, progress)
    arrays = {"mean": rec.mean.numpy(), "std": rec.std.numpy(), "baseline": base.numpy()}
    if rec.phase is not None:
        arrays["phase"] = rec.phase.numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    results.put(job.id, "slab.npz", buf.getvalue())
    meta = {
        "nfe": rec.nfe,
        "seconds": rec.seconds,
        "residual": rec.residual,
        "provenance": rec.provenance,
        "noise_std_used": rec.noise_std_used,
        "warnings": rec.warnings,
        "ood": rec.ood,
        "info": info,
    }
    results.put(job.id, "slab.json", json.dumps(meta).encode())
    steps = info["steps"]
    return succeed(
        job,
        jobs,
        results,
        {"slices": [start, stop], "worker": f"{socket.gethostname()}:{os.getpid()}"},
        list(SLAB_ARRAYS),
        progress_step=steps,
        progress_total=steps,
    )


def _slab_progress(job, volume, jobs: JobStore) -> Callable[[int, int], None]:
    """A slab's progress, and its volume's: steps summed over the parts (a part not started
    counted at this one's steps per slice), slices done, and the volume's heartbeat."""
    tick = Throttle()
    slices = volume.params["slabs"][-1][1]
    mine = job.params["stop"] - job.params["start"]

    def progress(step: int, total: int, *_: object) -> None:
        if not tick.due(step == total):
            return
        jobs.set_fields(job.id, progress_step=step, progress_total=total, heartbeat_at=now())
        done_steps = all_steps = done_slices = 0.0
        found = volume_parts(jobs, volume)
        for (start, stop), part in zip(volume.params["slabs"], found, strict=True):
            n = stop - start
            if part is None or not part.progress_total:
                all_steps += total * n / mine
                continue
            fraction = part.progress_step / part.progress_total
            done_steps += part.progress_step
            all_steps += part.progress_total
            done_slices += n * fraction
        jobs.set_fields(
            volume.id,
            progress_step=int(done_steps),
            progress_total=int(all_steps),
            phase=_sampling_phase(done_slices, slices),
            heartbeat_at=now(),
        )

    return progress


def settle(volume_id: str, jobs: JobStore, results: ResultStore) -> str:
    """After a part of a volume ends: the volume fails with the first failed part, is
    cancelled with a cancelled one, or, once every part has succeeded, is assembled from
    them as the unsplit job would have stored it, and the parts' arrays are deleted. Returns
    the volume's state ('waiting' while parts run); safe to call from any number of workers
    at once: the volume's final transition is a compare-and-set, only its winner deletes the
    parts' arrays, and a reader who finds them gone finds the volume assembled."""
    volume = jobs.get(volume_id)
    if volume is None or volume.state != "running":
        return "skipped"
    parts = volume_parts(jobs, volume)
    missing = [
        start for (start, _), p in zip(volume.params["slabs"], parts, strict=True) if p is None
    ]
    if missing:  # the volume's worker died while it created them: the sweep's re-run does
        return "waiting"
    bad = next((p for p in parts if p.state in ("failed", "cancelled")), None)
    if bad is not None or volume.cancel_requested:
        for p in parts:
            if p.state not in FINAL:
                jobs.set_fields(p.id, cancel_requested=True)
        if volume.cancel_requested or (bad is not None and bad.state == "cancelled"):
            jobs.transition(
                volume_id, ["running"], "cancelled", finished_at=now(), phase="cancelled"
            )
            return "cancelled"
        start, stop = bad.params["start"], bad.params["stop"]
        jobs.transition(
            volume_id,
            ["running"],
            "failed",
            finished_at=now(),
            phase="failed",
            error=f"slices {start}-{stop - 1}: {bad.error}",
        )
        return "failed"
    if any(p.state != "succeeded" for p in parts):
        return "waiting"
    try:
        recs, bases, meta = _read_parts(parts, results)
    except FileNotFoundError:
        now_state = getattr(jobs.get(volume_id), "state", None)
        if now_state != "running":  # another worker assembled it and removed the parts' arrays
            return "skipped"
        raise
    steps = sum(m["info"]["steps"] for m in meta)
    info = {**meta[-1]["info"], "steps": steps, "slabs": volume.params["slabs"]}
    state = store_reconstruction(volume, jobs, results, merge(recs), torch.cat(bases), info)
    if state == "succeeded":  # the one assembly that won: the parts' arrays are spent
        for p in parts:  # each part's report (which worker, how long) stays for the audit
            results.delete(p.id, names=SLAB_ARRAYS)
    return state


def _read_parts(parts: list, results: ResultStore) -> tuple[list, list, list[dict]]:
    """Each part's stored reconstruction, baseline and metadata (``slab.npz``, ``slab.json``)."""
    recs, bases, metas = [], [], []
    for p in parts:
        arrays = np.load(io.BytesIO(results.get(p.id, "slab.npz")), allow_pickle=False)
        meta = json.loads(results.get(p.id, "slab.json"))
        mean = torch.from_numpy(arrays["mean"])
        recs.append(
            Reconstruction(
                mean=mean,
                std=torch.from_numpy(arrays["std"]),
                samples=mean[:, :0],
                nfe=meta["nfe"],
                residual=meta["residual"],
                seconds=meta["seconds"],
                provenance=meta["provenance"],
                noise_std_used=meta["noise_std_used"],
                phase=torch.from_numpy(arrays["phase"]) if "phase" in arrays.files else None,
                warnings=meta["warnings"],
                ood=meta.get("ood", []),
            )
        )
        bases.append(torch.from_numpy(arrays["baseline"]))
        metas.append(meta)
    return recs, bases, metas
