"""The reliability and security suite: real processes on loopback, attacked.

Counts are small in CI; ``SCORERECON_RELIABILITY_FULL=1`` (set by
``benchmarks/reliability.py``) runs the full counts of the report. Every test records what
it tried and what came of it through the ``record`` fixture; with
``SCORERECON_RELIABILITY_REPORT=FILE`` the records are appended to FILE as JSON lines, from
which the benchmark writes ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest

from tests.service.conftest import _drop_postgres_db, _postgres_db

FULL = os.environ.get("SCORERECON_RELIABILITY_FULL") == "1"


def count(ci: int, full: int) -> int:
    """The number of repetitions: ``ci`` in the test suite, ``full`` for the report."""
    return full if FULL else ci


@pytest.fixture
def record() -> Callable[..., None]:
    """``record(area, attack, tried, lost=0, duplicated=0, five_xx=0, outcome="")``."""
    path = os.environ.get("SCORERECON_RELIABILITY_REPORT")

    def write(
        area: str,
        attack: str,
        tried: int,
        *,
        lost: int = 0,
        duplicated: int = 0,
        five_xx: int = 0,
        outcome: str = "",
        **extra,
    ) -> None:
        row = {
            "area": area,
            "attack": attack,
            "tried": tried,
            "lost": lost,
            "duplicated": duplicated,
            "five_xx": five_xx,
            "outcome": outcome,
            **extra,
        }
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")

    return write


@pytest.fixture
def database():
    """A throwaway PostgreSQL database (the deployment's database, not SQLite)."""
    name = _postgres_db()
    yield name
    _drop_postgres_db(name)
