import os

import numpy as np
import pytest
import torch

# The suites that skip where their part is missing, by a word of their skip reason. CI names
# those that must run on its machine kind (SCORERECON_REQUIRE_SUITES, .ci/run): a required
# suite that skipped fails the session, so a failed install is not a silent pass.
SUITES = {
    "orthanc": "Orthanc",
    "chromium": "Chromium",
    "dciodvfy": "dciodvfy",
    "bart": "BART",
    "realdata": "real data",
    "onnx": "onnx extra",
    "s3": "boto3",
    "redis": "redis-server missing",
    "postgres": "PostgreSQL missing",
}
_skipped: dict[str, list[str]] = {}


def required_suites() -> list[str]:
    """The suite names in SCORERECON_REQUIRE_SUITES, checked against SUITES."""
    names = os.environ.get("SCORERECON_REQUIRE_SUITES", "").replace(",", " ").split()
    unknown = sorted(set(names) - set(SUITES))
    if unknown:
        raise pytest.UsageError(
            f"SCORERECON_REQUIRE_SUITES names unknown suites {unknown}; known: {sorted(SUITES)}"
        )
    return names


def pytest_configure(config: pytest.Config) -> None:
    required_suites()  # a typo fails at once, not after the run


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        for suite in required_suites():
            if SUITES[suite].lower() in reason.lower():
                _skipped.setdefault(suite, []).append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    for suite, tests in _skipped.items():
        terminalreporter.write_line(
            f"REQUIRED SUITE SKIPPED: {suite} ({len(tests)} tests), e.g. {tests[0]}", red=True
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests import servers

    servers.stop_all()  # the Redis and PostgreSQL this session started, by their pids
    if _skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def smooth_image() -> torch.Tensor:
    """A smooth 64² test image, zero outside the inscribed circle."""
    n = 64
    yy, xx = np.mgrid[0:n, 0:n]
    img = np.exp(-((xx - 25.0) ** 2 + (yy - 35.0) ** 2) / 40) + 0.5 * np.exp(
        -((xx - 40.0) ** 2 + (yy - 22.0) ** 2) / 20
    )
    img *= (xx - 31.5) ** 2 + (yy - 31.5) ** 2 < 28**2
    return torch.tensor(img, dtype=torch.float32)[None, None]
