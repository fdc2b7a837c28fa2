"""Fair use of the workers (issue 17): what a job costs, and step-level fair sharing.

A job's cost is NFE × samples × slices × pixels: the pixels the score network processes
(models.inverse.network_pixels: an image padded to the prior's size, or the tiles of a
larger one, not rows × cols), so the run time on a given worker up to a constant. The
gateway refuses a job whose cost is over ``max_job_cost`` (422) and a submission that would
take its owner's queued and running cost over ``max_owner_cost`` (429).

:class:`FairShare` lets the embedded executor share its ``embedded_workers`` slots among
owners step by step: a job of another owner waits at most one step of a running job, not
the whole job. With Celery the same end is served by per-owner admission to the broker
(``workers.lifecycle.admit``).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Score evaluations per step of the admin sampling endpoint's samplers (corrector and
# predictor for PC and ancestral, Heun's two for the ODE, ALD's three Langevin steps).
NFE_PER_STEP = {"pc": 2, "ancestral": 2, "ode": 2, "ald": 3}


def job_cost(nfe: int, samples: int, slices: int, pixels: int) -> int:
    """NFE × samples × slices × pixels."""
    return nfe * samples * slices * pixels


def sampling_nfe(sampler: str, steps: int) -> int:
    """Score evaluations of ``steps`` steps of an admin sampling job's sampler."""
    return steps * NFE_PER_STEP.get(sampler, 1)


@dataclass(frozen=True)
class Factor:
    """One factor of a job's cost as the client gave it: its request field, value, smallest
    allowed value, score evaluations per unit (NFE per step for sampling steps), where the
    field is not what it counts, a name for it (the slices of a measurement), and a count
    the job adds to the field's value that the client cannot lower (the solves of a TV
    weight chosen by hold-out beside the K samples)."""

    field: str
    value: int
    minimum: int = 1
    unit: int = 1
    label: str = ""
    extra: int = 0

    def name(self) -> str:
        return f"{self.label} ({self.field})" if self.label else self.field

    @property
    def count(self) -> int:
        return self.value + self.extra


def over_cost(limit: int, pixels: int, factors: list[Factor]) -> tuple[str, str] | None:
    """None if the job's cost is within ``limit``; else (field, explanation) naming the
    first factor that, lowered alone, brings it within the limit, and its largest value."""
    cost = pixels * math.prod(f.count * f.unit for f in factors)
    if cost <= limit:
        return None
    fixes = []
    for f in factors:
        rest = cost // (f.count * f.unit)
        best = limit // (rest * f.unit) - f.extra
        if best >= f.minimum:
            fixes.append((f, best))
    terms = [
        (
            f"({f.label or f.field} + {f.extra} hold-out solves)"
            if f.extra
            else f.label or f.field,
            f.count,
        )
        for f in factors
    ]
    terms += [("NFE per step", f.unit) for f in factors if f.unit != 1]
    terms.append(("pixels the network evaluates", pixels))
    detail = (
        f"this job costs {' × '.join(n for n, _ in terms)} = "
        f"{' × '.join(f'{v:,}' for _, v in terms)} = {cost:,} pixel evaluations of the score "
        f"network, over the limit of {limit:,} per job (SCORERECON_MAX_JOB_COST); "
    )
    if fixes:
        detail += "lower " + ", or ".join(f"{f.name()} to at most {best:,}" for f, best in fixes)
        return fixes[0][0].field, detail
    detail += "even the smallest values are over it: send fewer or smaller slices per request"
    return factors[0].field, detail


@dataclass(eq=False)
class _Entry:
    job_id: str
    owner: str
    kind: str
    state: str  # waiting (not started), active (holds a slot), paused, leaving (cancelled)
    seq: int  # arrival, or the moment it paused: ties go to who waited longest
    since: float = 0.0  # when it last became active
    started: bool = False
    cancelled: bool = False


class FairShare:
    """Step-level fair sharing of ``slots`` workers among owners.

    A job runs only while it holds a slot. At each step (its cancel check, through
    :meth:`checkpoint`) a running job gives its slot up when an owner who has used the
    workers less is waiting, and waits for its turn. A free slot goes to the waiting owner
    with the least use (slot-seconds, decaying with half-life ``halflife_s``; ties to who
    waited longest): to that owner's paused job first, else its oldest queued one, which
    ``start(job_id, kind)`` runs. So a light owner's job starts within one step of a heavy
    owner's, and runs until its owner has caught up; owners that are all busy take turns
    step by step; one owner's jobs run in the order they came.
    """

    def __init__(
        self,
        slots: int,
        start: Callable[[str, str], None],
        halflife_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.slots, self._start, self._halflife, self._clock = slots, start, halflife_s, clock
        self._cond = threading.Condition()
        self._jobs: dict[str, _Entry] = {}
        self._usage: dict[str, tuple[float, float]] = {}  # owner → (slot-seconds, as of)
        self._active = 0
        self._seq = itertools.count()

    # -- what the executor calls ------------------------------------------------------
    def add(self, job_id: str, owner: str, kind: str) -> bool:
        """Queue a job (False if it is already here)."""
        with self._cond:
            if job_id in self._jobs:
                return False
            self._jobs[job_id] = _Entry(job_id, owner, kind, "waiting", next(self._seq))
            starts = self._grant()
        self._launch(starts)
        return True

    def checkpoint(self, job_id: str, on_wait: Callable[[], bool] | None = None) -> bool:
        """At a step of a running job: give the slot up if a lighter owner waits, and wait
        for the turn (calling ``on_wait`` every 5 s meanwhile: a heartbeat that answers
        whether the job was cancelled). True if the job has been cancelled."""
        starts: list[_Entry] = []
        with self._cond:
            e = self._jobs.get(job_id)
            if e is None or e.cancelled:
                return e is not None
            if e.state == "active" and self._lighter_waits(e):
                self._charge(e)
                e.state, e.seq = "paused", next(self._seq)
                self._active -= 1
                starts = self._grant()
        self._launch(starts)
        waited = self._clock()
        while True:
            with self._cond:
                if e.cancelled or e.state != "paused":
                    return e.cancelled
                self._cond.wait(timeout=1.0)
            if on_wait is not None and self._clock() - waited >= 5.0:
                waited = self._clock()
                try:
                    if on_wait():
                        self.cancel(job_id)
                except Exception:  # noqa: BLE001 - a heartbeat may fail; the turn still comes
                    log.exception("job %s: heartbeat while waiting failed", job_id)

    def cancel(self, job_id: str) -> None:
        """A job not started is dropped; a started one is told at its next step (or now, if
        it waits for its turn: it then finishes without a slot)."""
        with self._cond:
            e = self._jobs.get(job_id)
            if e is None:
                return
            if e.state == "waiting":
                del self._jobs[job_id]
                return
            e.cancelled = True
            if e.state == "paused":
                e.state = "leaving"
            self._cond.notify_all()

    def done(self, job_id: str) -> None:
        """The job's thread has finished with it."""
        with self._cond:
            e = self._jobs.pop(job_id, None)
            if e is not None and e.state == "active":
                self._charge(e)
                self._active -= 1
            starts = self._grant()
            self._cond.notify_all()
        self._launch(starts)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running here; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs, timeout)

    def snapshot(self) -> dict[str, str]:
        """job id → state, for tests and debugging."""
        with self._cond:
            return {j: e.state for j, e in self._jobs.items()}

    # -- inside the lock ----------------------------------------------------------------
    def _use(self, owner: str, now: float) -> float:
        value, at = self._usage.get(owner, (0.0, now))
        used = value * 0.5 ** ((now - at) / self._halflife)
        return used + sum(
            now - e.since for e in self._jobs.values() if e.owner == owner and e.state == "active"
        )

    def _charge(self, e: _Entry) -> None:
        now = self._clock()
        value, at = self._usage.get(e.owner, (0.0, now))
        self._usage[e.owner] = (value * 0.5 ** ((now - at) / self._halflife) + now - e.since, now)

    def _lighter_waits(self, e: _Entry) -> bool:
        now = self._clock()
        waiting = {c.owner for c in self._jobs.values() if c.state in ("waiting", "paused")}
        waiting.discard(e.owner)
        if not waiting:
            return False
        mine = self._use(e.owner, now)
        return any(self._use(o, now) < mine for o in waiting)

    def _grant(self) -> list[_Entry]:
        """Fill free slots; returns the jobs to start (outside the lock)."""
        starts = []
        while self._active < self.slots:
            e = self._next()
            if e is None:
                break
            e.state, e.since = "active", self._clock()
            self._active += 1
            if e.started:
                self._cond.notify_all()
            else:
                e.started = True
                starts.append(e)
        return starts

    def _next(self) -> _Entry | None:
        now = self._clock()
        best: dict[str, _Entry] = {}  # per owner: its paused job first, else its oldest
        first: dict[str, int] = {}  # per owner: since when it has waited
        for e in self._jobs.values():
            if e.state not in ("waiting", "paused"):
                continue
            b = best.get(e.owner)
            if b is None or (e.state != "paused", e.seq) < (b.state != "paused", b.seq):
                best[e.owner] = e
            first[e.owner] = min(first.get(e.owner, e.seq), e.seq)
        if not best:
            return None
        owner = min(best, key=lambda o: (self._use(o, now), first[o]))
        return best[owner]

    def _launch(self, starts: list[_Entry]) -> None:
        for e in starts:
            try:
                self._start(e.job_id, e.kind)
            except Exception:  # noqa: BLE001 - e.g. no thread could be started
                log.exception("job %s could not be started; it stays queued", e.job_id)
                self.done(e.job_id)
