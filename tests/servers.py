"""Throwaway Redis and PostgreSQL servers for the tests, started on free loopback ports in
a temporary directory the first time a test needs one, and stopped by the pid they were
started with when the session ends (never by name).

The tests never touch a server they did not start: a machine's own Redis or PostgreSQL is
used only when named by ``SCORERECON_TEST_REDIS_URL`` (``redis://host:port``, no database
number: the tests choose theirs) or ``SCORERECON_TEST_DATABASE_URL`` (a PostgreSQL server
``postgresql+psycopg://user@host:port/`` where that user may create databases).

``make test`` installs ``redis-server`` and ``postgresql`` where they are missing
(scripts/install-deb.sh); without them the tests that need one skip, saying so.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

REDIS_ENV, DATABASE_ENV = "SCORERECON_TEST_REDIS_URL", "SCORERECON_TEST_DATABASE_URL"
_started: list[subprocess.Popen] = []
_root = Path(tempfile.mkdtemp(prefix="scorerecon-test-servers-"))


class Unavailable(RuntimeError):
    """The server cannot be started here (its package is not installed)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ready, proc: subprocess.Popen, what: str, log: Path, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > end:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} did not start:\n{tail}")
        time.sleep(0.05)


def start_redis(directory: Path | None = None, port: int | None = None) -> subprocess.Popen:
    """A redis-server of our own on loopback (no persistence unless ``directory`` says
    where); the caller stops it with :func:`stop`."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise Unavailable("redis-server missing: install it (make test does)")
    port = port or free_port()
    directory = directory or Path(tempfile.mkdtemp(dir=_root, prefix="redis-"))
    log = directory / "redis.log"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
        + ["--save", "", "--appendonly", "no", "--logfile", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    proc.port = port  # type: ignore[attr-defined]
    proc.stop_signal = signal.SIGTERM  # type: ignore[attr-defined]

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    _wait(answers, proc, "redis-server", log)
    return proc


def _or_skip(start):
    """Under pytest, a server that cannot be started here skips the test, saying why."""
    try:
        return start()
    except Unavailable as exc:
        import pytest

        pytest.skip(str(exc))


@cache
def redis_url() -> str:
    """``redis://127.0.0.1:<port>`` of the session's own Redis (or SCORERECON_TEST_REDIS_URL);
    append ``/<db>``."""
    if url := os.environ.get(REDIS_ENV):
        return url.rstrip("/")
    proc = _or_skip(start_redis)
    _started.append(proc)
    return f"redis://127.0.0.1:{proc.port}"  # type: ignore[attr-defined]


def _postgres_binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise Unavailable("PostgreSQL missing: install the postgresql package (make test does)")
    return found


@cache
def database_url() -> str:
    """``postgresql+psycopg://postgres@127.0.0.1:<port>/`` of the session's own PostgreSQL
    (or SCORERECON_TEST_DATABASE_URL); append a database name."""
    if url := os.environ.get(DATABASE_ENV):
        return url.rstrip("/") + "/"
    return _or_skip(start_postgres)


def start_postgres() -> str:
    """A PostgreSQL cluster of our own (initdb, then the server in the foreground, so its
    pid is the one we stop); its URL."""
    initdb, postgres = _postgres_binary("initdb"), _postgres_binary("postgres")
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: its own system user runs it
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise Unavailable("running as root, and no 'postgres' user to run PostgreSQL") from None
        as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    data = Path(tempfile.mkdtemp(dir=_root, prefix="pg-"))
    if as_user:
        os.chmod(_root, 0o755)
        os.chown(data, user.pw_uid, user.pw_gid)
    log = data / "server.log"
    subprocess.run(
        [*as_user, initdb, "-D", str(data / "db"), "-U", "postgres", "-A", "trust"]
        + ["-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        [*as_user, postgres, "-D", str(data / "db"), "-p", str(port), "-k", str(data)]
        + ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"]
        + ["-c", "full_page_writes=off", "-c", "synchronous_commit=off"],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),  # noqa: SIM115 - the server's own, closed with it
        start_new_session=True,
    )
    proc.stop_signal = signal.SIGINT  # type: ignore[attr-defined]  # fast shutdown
    _started.append(proc)
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/"

    def answers() -> bool:
        import psycopg

        try:
            psycopg.connect(conninfo("postgres", url), connect_timeout=1).close()
            return True
        except psycopg.OperationalError:
            return False

    _wait(answers, proc, "PostgreSQL", log)
    return url


def conninfo(dbname: str, base: str | None = None) -> str:
    """A psycopg connection string for ``dbname`` on the session's PostgreSQL."""
    parts = urlsplit(base or database_url())
    user = parts.username or "postgres"
    return f"host={parts.hostname} port={parts.port or 5432} user={user} dbname={dbname}"


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """Stop a server we started, by its process group (SIGKILL after ``grace`` s)."""
    if proc.poll() is None:
        os.killpg(proc.pid, getattr(proc, "stop_signal", signal.SIGTERM))
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def stop_all() -> None:
    """Stop every server this session started, then remove their directory."""
    while _started:
        stop(_started.pop())
    redis_url.cache_clear()
    database_url.cache_clear()
    shutil.rmtree(_root, ignore_errors=True)


atexit.register(stop_all)
