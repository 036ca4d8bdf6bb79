"""Helpers of the master tests: the master's workers, as the tests see them."""

from __future__ import annotations

import psutil
from harness import wait_until
from master_support import PID_REQUEST

APP = "master_support:app"


def workers(srv) -> dict[int, str]:
    """pid -> process title of the master's live children."""
    titles = {}
    for child in psutil.Process(srv.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                titles[child.pid] = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            pass
    return titles


def wait_workers(srv, n: int, timeout: float = 15.0) -> dict[int, str]:
    """n workers, each past its fork (it has its own title by then)."""
    return wait_until(
        lambda: len(w := workers(srv)) == n and all("worker" in t for t in w.values()) and w,
        timeout,
        message=lambda: f"wanted {n} workers, have {workers(srv)}\n{srv.stderr()[-2000:]}",
    )


def pid_over_new_connection(srv) -> int:
    with srv.connect() as c:
        c.send(PID_REQUEST)
        return int(c.read_response().body)
