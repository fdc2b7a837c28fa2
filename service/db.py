"""The durable job store: jobs, API keys and the audit trail (SQLAlchemy 2).

SQLite by default, PostgreSQL in deployment; the schema is created and evolved by the
Alembic migrations in ``service/migrations``. Job state changes only by compare-and-set
(:meth:`JobStore.transition`), so two workers, or a worker and a cancelling client, can
never both win.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    aliased,
    mapped_column,
    sessionmaker,
)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")
BATCH_SLICES = 4  # slices of a stack a worker solves in one batch (× K posterior samples)
# Kinds that run on the `gpu` queue: they have a cost and wait for their owner's turn.
ADMITTED = ("reconstruction", "sampling")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key", name="uq_owner_idem"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # reconstruction sampling training export slab
    owner: Mapped[str] = mapped_column(String(128), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    phase: Mapped[str] = mapped_column(String(32), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    spec: Mapped[dict] = mapped_column(JSON, default=dict)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    result_keys: Mapped[list] = mapped_column(JSON, default=list)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # NFE × samples × slices × pixels (service.fairness.job_cost); 0 for training and export.
    cost: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # When the job's message went to the broker (Celery); None while it waits its turn.
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # A reconstruction's out-of-distribution verdict (models.ood.summary); None otherwise.
    ood: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    scopes: Mapped[str] = mapped_column(String(256))
    hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditEntry(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now, index=True)
    key_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    outcome: Mapped[str] = mapped_column(String(256))


def new_id() -> str:
    return uuid.uuid4().hex


def slab_ranges(slices: int, batch: int, slab_slices: int) -> list[tuple[int, int]]:
    """[start, stop) of each slab: ``slab_slices`` rounded up to whole batches, so that a
    slab's batches are those of the unsplit job and its images the same (0: no split)."""
    if slab_slices <= 0 or slices <= slab_slices:
        return [(0, slices)]
    size = -(-slab_slices // batch) * batch
    return [(s, min(s + size, slices)) for s in range(0, slices, size)]


def slab_id(job_id: str, start: int) -> str:
    """The id of the part of a volume job that reconstructs slices ``start``… (derived, so
    splitting a job twice creates its parts once)."""
    return uuid.uuid5(uuid.NAMESPACE_OID, f"scorerecon/{job_id}/slab/{start}").hex


def auto_export_id(job_id: str, destination: str) -> str:
    """The id of a reconstruction's automatic export: derived, so it is created once."""
    return uuid.uuid5(uuid.NAMESPACE_OID, f"scorerecon/{job_id}/export/{destination}").hex


class JobStore:
    """Sessions on one database, and the few operations every component needs."""

    def __init__(self, url: str):
        kwargs = (
            {"connect_args": {"check_same_thread": False, "timeout": 30}}
            if url.startswith("sqlite")
            else {"pool_pre_ping": True}
        )
        # hide_parameters: SQL logging and database errors never show bound values (key
        # hashes, patient attributes in job params).
        self.engine = create_engine(url, hide_parameters=True, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as s, s.begin():
            yield s

    def ping(self) -> bool:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return True

    def get(self, job_id: str) -> Job | None:
        with self.sessions() as s:
            return s.get(Job, job_id)

    def add_export(self, source: Job, destination: str, job_id: str | None = None) -> str:
        """Queue an export of ``source``'s series to ``destination``; returns the export
        job's id. With ``job_id`` given, adding it twice is harmless (the first one stays)."""
        export_id = job_id or new_id()
        params = {"destination": destination, "source_job": source.id}
        if not self._add_internal(export_id, "export", source, params) and job_id is None:
            raise IntegrityError("duplicate export id", None, Exception(export_id))
        return export_id

    def add_slabs(self, volume: Job, ranges: list[tuple[int, int]]) -> list[str]:
        """The parts of a volume job, one ``slab`` job per slice range [start, stop), each
        run by whichever worker takes it; returns the ids of the parts created now (those
        that exist already are left alone)."""
        created = []
        for start, stop in ranges:
            part = slab_id(volume.id, start)
            params = {"volume": volume.id, "start": start, "stop": stop}
            if self._add_internal(part, "slab", volume, params):
                created.append(part)
        return created

    def _add_internal(self, job_id: str, kind: str, parent: Job, params: dict) -> bool:
        """A queued job that a job creates (an export, a slab), owned as its parent; False
        if ``job_id`` exists already."""
        try:
            with self.session() as s:
                s.add(
                    Job(
                        id=job_id,
                        kind=kind,
                        owner=parent.owner,
                        spec={},
                        model=parent.model,
                        params=params,
                        result_keys=[],
                    )
                )
        except IntegrityError:
            return False
        return True

    def get_many(self, job_ids: list[str]) -> list[Job | None]:
        """The jobs of ``job_ids`` in one query, in that order (None where absent)."""
        with self.sessions() as s:
            found = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(job_ids)))}
        return [found.get(i) for i in job_ids]

    def transition(
        self,
        job_id: str,
        from_states: Iterable[str],
        to: str,
        expect: dict | None = None,
        **fields,
    ) -> bool:
        """Compare-and-set: move the job to ``to`` only if it is in one of ``from_states``
        (and its columns equal ``expect``); True for the one caller that won."""
        conditions = [Job.id == job_id, Job.state.in_(tuple(from_states))]
        for column, value in (expect or {}).items():
            col = getattr(Job, column)
            conditions.append(col.is_(None) if value is None else col == value)
        with self.session() as s:
            res = s.execute(update(Job).where(*conditions).values(state=to, **fields))
            return res.rowcount == 1

    def set_fields(self, job_id: str, **fields) -> None:
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(**fields))

    def audit(self, action: str, outcome: str, key_id=None, owner=None, job_id=None) -> None:
        with self.session() as s:
            s.add(
                AuditEntry(
                    action=action, outcome=outcome, key_id=key_id, owner=owner, job_id=job_id
                )
            )

    def owner_load(self, owner: str) -> tuple[int, int]:
        """(queued jobs, cost of queued and running jobs) of one owner: what the per-owner
        caps of a submission compare with."""
        with self.sessions() as s:
            queued = s.scalar(
                select(func.count()).where(
                    Job.owner == owner, Job.state == "queued", Job.kind != "slab"
                )
            )
            cost = s.scalar(
                select(func.coalesce(func.sum(Job.cost), 0)).where(
                    Job.owner == owner, Job.state.in_(("queued", "running"))
                )
            )
        return int(queued or 0), int(cost or 0)

    def admit(self, job_id: str, owner: str, slots: int) -> bool:
        """Mark a held job sent (``sent_at``) if its owner has fewer than ``slots`` jobs sent
        or running; True for the one caller that may send its message. One statement
        (compare-and-set), with the owner's advisory lock on PostgreSQL so that two
        dispatchers cannot both take the owner's last slot."""
        other = aliased(Job)
        in_flight = (
            select(func.count())
            .select_from(other)
            .where(
                other.owner == owner,
                other.kind.in_(ADMITTED),
                or_(
                    other.state == "running",
                    and_(other.state == "queued", other.sent_at.is_not(None)),
                ),
            )
            .scalar_subquery()
        )
        with self.session() as s:
            if s.get_bind().dialect.name == "postgresql":
                s.execute(select(func.pg_advisory_xact_lock(func.hashtext(owner))))
            res = s.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.owner == owner,
                    Job.state == "queued",
                    Job.sent_at.is_(None),
                    in_flight < slots,
                )
                .values(sent_at=now())
            )
            return res.rowcount == 1

    def count_by_state(self, slabs: bool = False) -> dict[str, int]:
        """Jobs by state: those the clients submitted, or with ``slabs`` the parts of split
        volumes (``slab`` jobs, which no client sees and a volume's one job stands for)."""
        kind = Job.kind == "slab" if slabs else Job.kind != "slab"
        with self.sessions() as s:
            rows = s.execute(select(Job.state, func.count()).where(kind).group_by(Job.state)).all()
        return {state: 0 for state in STATES} | {r[0]: r[1] for r in rows}

    def durations(self) -> dict[tuple[str, str], tuple[float, int]]:
        """(kind, state) -> (total seconds, count) over finished jobs that started."""
        with self.sessions() as s:
            rows = s.execute(
                select(Job.kind, Job.state, Job.started_at, Job.finished_at).where(
                    Job.state.in_(FINAL), Job.started_at.is_not(None), Job.finished_at.is_not(None)
                )
            ).all()
        out: dict[tuple[str, str], tuple[float, int]] = {}
        for kind, state, start, end in rows:
            total, n = out.get((kind, state), (0.0, 0))
            out[(kind, state)] = (total + max(0.0, (end - start).total_seconds()), n + 1)
        return out


def _sqlite_pragmas(conn, _record) -> None:
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
