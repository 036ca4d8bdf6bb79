"""Fixtures of the test suite; the helpers live in ``support/harness.py``.

``unit/`` runs in-process (milliseconds); ``e2e/`` starts real fpy3 processes and
talks to them over real sockets, TLS and independent clients.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SUPPORT_DIR = Path(__file__).resolve().parent / "support"
if str(SUPPORT_DIR) not in sys.path:
    sys.path.insert(0, str(SUPPORT_DIR))

from harness import (  # noqa: E402
    Server,
    ServerFactory,
    clean_env,
    fpy3_command,
    mkdir,
    msquic_unavailable,
)


@pytest.fixture(scope="module", params=["ngtcp2", "msquic"])
def quic_engine(request) -> str:
    """The QUIC engine of this module's HTTP/3 servers. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("quic_engine")``: its tests run once per engine."""
    if request.param == "msquic" and (reason := msquic_unavailable()):
        pytest.skip(reason)
    return request.param


def _engine_of(request) -> str:
    """The module's engine when it runs per engine, else ngtcp2 (never "auto", which
    would follow whatever libmsquic this machine has)."""
    if "quic_engine" in request.fixturenames:
        return request.getfixturevalue("quic_engine")
    return "ngtcp2"


@pytest.fixture
def start_server(tmp_path, request):
    counter = iter(range(1000))
    factory = ServerFactory(lambda: mkdir(tmp_path / f"srv{next(counter)}"), _engine_of(request))
    yield factory
    factory.cleanup()


@pytest.fixture(scope="module")
def module_server_factory(tmp_path_factory):
    # Module-wide servers name their engine (a quic_engine argument of their fixture),
    # so pytest builds one per engine.
    factory = ServerFactory(lambda: tmp_path_factory.mktemp("srv"), "ngtcp2")
    yield factory
    factory.cleanup()


@pytest.fixture(scope="module")
def server(module_server_factory) -> Server:
    """The main test app with default limits, TLS on ``port`` and cleartext on ``http_port``."""
    return module_server_factory(http=True)


@pytest.fixture
def run_cli(tmp_path):
    """Run ``fpy3 ...`` to completion (bounded) and return the CompletedProcess."""

    def run(args, env=None, timeout: float = 30.0, command: str = "fpy3", cwd=None):
        return subprocess.run(
            [*fpy3_command(command), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=clean_env({"XDG_STATE_HOME": str(tmp_path / "xdg-state"), **(env or {})}),
            cwd=cwd or tmp_path,
            stdin=subprocess.DEVNULL,
        )

    return run
