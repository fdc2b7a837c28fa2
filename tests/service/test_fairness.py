"""Fair use (issue 17): the embedded executor's step-level fair share, per-owner admission to
the broker (on SQLite and PostgreSQL), and the cost of a job."""

from __future__ import annotations

import threading
import time

from service.db import Job, JobStore, new_id, now
from service.fairness import Factor, FairShare, job_cost, over_cost
from service.migrate import upgrade
from workers.lifecycle import admit, sweep


class Steps:
    """Jobs as threads that take ``steps[job]`` steps of ``step_s`` each, passing the fair
    share's checkpoint before every step; ``log`` records (job, time) per step."""

    def __init__(self, slots: int, step_s: float = 0.005):
        self.fair = FairShare(slots, self.start)
        self.step_s, self.steps, self.log = step_s, {}, []
        self.cancelled: list[str] = []
        self.lock = threading.Lock()

    def start(self, job_id: str, kind: str) -> None:
        threading.Thread(target=self.run, args=(job_id,), daemon=True).start()

    def run(self, job_id: str) -> None:
        try:
            for _ in range(self.steps[job_id]):
                if self.fair.checkpoint(job_id):
                    self.cancelled.append(job_id)
                    return
                with self.lock:
                    self.log.append((job_id, time.monotonic()))
                time.sleep(self.step_s)
        finally:
            self.fair.done(job_id)

    def add(self, job_id: str, owner: str, steps: int) -> None:
        self.steps[job_id] = steps
        self.fair.add(job_id, owner, "reconstruction")

    def count(self, job_id: str, after: float = 0.0, before: float = float("inf")) -> int:
        with self.lock:
            return sum(1 for j, t in self.log if j == job_id and after < t < before)

    def until(self, cond, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end, "timed out"
            time.sleep(0.002)


def test_a_light_owner_waits_at_most_one_step_of_a_heavy_owner():
    s = Steps(slots=1)
    s.add("a", "alice", 2000)
    s.until(lambda: s.count("a") >= 40)
    added = time.monotonic()
    s.add("b", "bob", 20)
    s.until(lambda: s.count("b") == 20)
    b_last = max(t for j, t in s.log if j == "b")
    assert s.count("a", added, b_last) <= 1  # the step alice was in when bob came
    s.fair.cancel("a")
    assert s.fair.wait_idle(10) and s.cancelled == ["a"]


def test_busy_owners_take_turns_step_by_step_and_one_owners_jobs_keep_their_order():
    s = Steps(slots=1)
    s.add("a1", "alice", 30)
    s.add("a2", "alice", 5)
    s.add("b1", "bob", 30)
    assert s.fair.wait_idle(30)
    order = [j for j, _ in s.log]
    assert order.index("a2") > max(i for i, j in enumerate(order) if j == "a1")  # FIFO
    both = order[: order.index("a2")]  # while a1 and b1 both ran
    owners = [j[0] for j in both if j in ("a1", "b1")]
    runs, longest = 1, 1
    for x, y in zip(owners, owners[1:], strict=False):
        runs = runs + 1 if x == y else 1
        longest = max(longest, runs)
    # Turns of a few steps (use is measured in slot-seconds: on a loaded machine a step
    # can take longer than the next), never whole jobs of 30 steps.
    assert longest <= 6, owners


def test_two_slots_serve_two_owners_at_once():
    s = Steps(slots=2)
    s.add("a1", "alice", 200)
    s.add("a2", "alice", 200)
    s.until(lambda: s.count("a1") > 5 and s.count("a2") > 5)  # one owner may use both
    s.add("b", "bob", 10)
    s.until(lambda: s.count("b") == 10)
    assert s.fair.snapshot()["a1"] in ("active", "paused")
    for j in ("a1", "a2"):
        s.fair.cancel(j)
    assert s.fair.wait_idle(10)


def test_cancel_drops_a_waiting_job_and_stops_a_paused_or_running_one_at_once():
    s = Steps(slots=1, step_s=0.05)
    s.add("a", "alice", 1000)
    s.until(lambda: s.count("a") >= 10)  # alice has used 0.5 s
    s.add("b", "bob", 1000)
    s.until(lambda: s.fair.snapshot().get("a") == "paused")
    s.add("c", "carol", 5)  # waits: bob holds the only slot
    s.fair.cancel("c")
    assert "c" not in s.fair.snapshot()
    t0 = time.monotonic()
    s.fair.cancel("a")  # paused: leaves at once, without a slot
    s.until(lambda: "a" in s.cancelled, timeout=2)
    assert time.monotonic() - t0 < 0.5 and s.count("a", t0) == 0
    t1 = time.monotonic()
    s.fair.cancel("b")  # running: stops before its next step
    assert s.fair.wait_idle(2) and s.count("b", t1) <= 1
    assert set(s.cancelled) == {"a", "b"} and s.count("c") == 0


def test_job_cost_and_the_refusal_naming_the_field_and_its_maximum():
    from service.settings import Settings

    limit, pixels = Settings().max_job_cost, 128 * 128
    fits = [Factor("nfe", 1000, 2), Factor("samples", 8), Factor("measurement", 1)]
    assert over_cost(limit, pixels, fits) is None  # the defaults, with room
    assert job_cost(1000, 8, 1, pixels) * 2 <= limit
    field, detail = over_cost(limit, pixels, [Factor("nfe", 5000, 2), Factor("samples", 64)])
    assert field == "nfe" and "at most 286" in detail and "SCORERECON_MAX_JOB_COST" in detail
    assert job_cost(286, 64, 1, pixels) <= limit < job_cost(287, 64, 1, pixels)


def test_the_per_job_limit_counts_the_hold_out_solves_the_client_cannot_lower():
    """A TV weight chosen by hold-out adds a single-sample solve per candidate to the K
    samples (models/holdout.py): the limit counts them, and the fix it names for
    ``samples`` leaves room for them."""
    pixels, nfe = 128 * 128, 50
    factors = [Factor("nfe", nfe), Factor("samples", 4, extra=2), Factor("measurement", 1)]
    limit = job_cost(nfe, 5, 1, pixels)  # room for 5 solves, not 4 + 2
    field, detail = over_cost(limit, pixels, factors)
    assert field == "nfe" and "(samples + 2 hold-out solves)" in detail and "50 × 6 × 1" in detail
    assert "lower" in detail and "samples to at most 3" in detail
    assert over_cost(limit, pixels, [Factor("nfe", nfe), Factor("samples", 3, extra=2)]) is None
    assert over_cost(job_cost(nfe, 2, 1, pixels), pixels, factors)[1].count("samples to") == 0


def _job(store: JobStore, owner: str, kind: str = "reconstruction", **fields) -> str:
    job_id = new_id()
    fields = {"spec": {}, "params": {}, "result_keys": [], **fields}
    with store.session() as s:
        s.add(Job(id=job_id, kind=kind, owner=owner, **fields))
    time.sleep(0.002)  # distinct created_at: the order of arrival
    return job_id


def test_admission_sends_round_robin_by_owner_within_each_owners_slots(db_url):
    upgrade(db_url)
    store = JobStore(db_url)
    a = [_job(store, "alice") for _ in range(3)]
    b = [_job(store, "bob") for _ in range(2)]
    train = _job(store, "alice", "training")
    sent: list[str] = []
    assert admit(store, sent.append, owner_slots=1) == 3
    assert sent == [a[0], b[0], train]  # one each; training is not limited
    assert admit(store, sent.append, owner_slots=1) == 0  # no free slot
    store.transition(a[0], ["queued"], "running")
    assert admit(store, sent.append, owner_slots=1) == 0  # running still holds it
    store.transition(a[0], ["running"], "succeeded")
    assert admit(store, sent.append, owner_slots=1, owners=["alice"]) == 1
    assert sent[-1] == a[1]
    assert admit(store, sent.append, owner_slots=2) == 2  # a wider slot lets more through
    assert sent[-2:] == [a[2], b[1]]
    # A message sent long ago (lost with the broker) is sent again by the sweep, once.
    store.set_fields(b[1], sent_at=now().replace(year=2000))
    report = sweep(store, sent.append, 60, 60, owner_slots=1)
    assert report == {"requeued": 1, "orphaned": 0, "exports": 0, "admitted": 0}
    assert sent[-1] == b[1]
    assert sweep(store, sent.append, 60, 60, owner_slots=1)["requeued"] == 0
    store.engine.dispose()


def test_concurrent_dispatchers_never_exceed_an_owners_slots(db_url):
    upgrade(db_url)
    store = JobStore(db_url)
    ids = [_job(store, "alice") for _ in range(8)]
    won: list[str] = []
    barrier = threading.Barrier(len(ids))

    def race(job_id: str) -> None:
        barrier.wait()
        if store.admit(job_id, "alice", 2):
            won.append(job_id)

    threads = [threading.Thread(target=race, args=(j,)) for j in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 2, won
    store.engine.dispose()


def test_admin_sampling_defaults_fit_the_cap():
    """The sampling endpoint's (and the console form's) defaults: 16 samples, 500 PC steps."""
    from service.fairness import sampling_nfe
    from service.schemas import SamplingRequest
    from service.settings import Settings

    d = SamplingRequest(model="ct-default")
    cost = job_cost(sampling_nfe(d.sampler, d.steps), d.n, 1, 128 * 128)
    assert (d.sampler, d.steps, d.n) == ("pc", 500, 16) and cost <= Settings().max_job_cost


def test_the_sweep_recreates_an_export_lost_between_success_and_its_creation(db_url):
    """A worker that dies after marking a reconstruction succeeded but before queuing its
    automatic export leaves no export; the sweep creates it (once) and sends it."""
    from service.db import auto_export_id

    upgrade(db_url)
    store = JobStore(db_url)
    lost = _job(store, "alice", params={"export_to": "pacs"})
    plain = _job(store, "alice")
    for job_id in (lost, plain):
        store.transition(job_id, ["queued"], "running")
        store.transition(job_id, ["running"], "succeeded", finished_at=now())
    sent: list[str] = []
    report = sweep(store, sent.append, 60, 60)
    export_id = auto_export_id(lost, "pacs")
    assert report["exports"] == 1 and sent == [export_id]
    export = store.get(export_id)
    assert export.kind == "export" and export.state == "queued" and export.owner == "alice"
    assert export.params == {"destination": "pacs", "source_job": lost}
    assert sweep(store, sent.append, 60, 60)["exports"] == 0  # never a second one
    store.engine.dispose()
