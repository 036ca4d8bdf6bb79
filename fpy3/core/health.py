"""Health checks answered by the server itself, without calling the app.

``health.ready_path`` answers 200 while the worker takes new work and 503 from the
moment it stops (the drain, or the ``health.drain_delay`` before it), so a load
balancer or a Kubernetes readiness probe takes it out of rotation before connections
start closing. ``health.live_path`` answers 200 as long as the worker's loop runs.
Both are off by default. Every protocol gets this through the one HTTP cycle
(``HTTPCycle.run`` asks ``answer`` before calling the app), with the response rules,
the access log and the counters of any other request.
"""

from __future__ import annotations

from typing import Protocol


class Request(Protocol):
    """What a health check needs of a request: its scope and a way to answer it
    (``fpy3.core.http.HTTPCycle``)."""

    scope: dict

    def reply(self, status: int, headers: list, body: bytes) -> None: ...


_READY, _LIVE = 1, 2
_HEADERS = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"cache-control", b"no-store"),
]


class Health:
    __slots__ = ("paths", "ready")

    def __init__(self, ready_path: str, live_path: str):
        # Raw request paths (without the query): what the request line or :path carries.
        self.paths: dict[bytes, int] = {}
        if ready_path:
            self.paths[ready_path.encode("ascii")] = _READY
        if live_path:
            self.paths[live_path.encode("ascii")] = _LIVE
        self.ready = True  # False once the worker stops taking new work

    def answer(self, cycle: Request) -> bool:
        """Answer the request if it is a health check (True), else leave it to the app."""
        kind = self.paths.get(cycle.scope["raw_path"])
        if kind is None:
            return False
        if kind == _LIVE:
            status, body = 200, b"alive\n"
        elif self.ready:
            status, body = 200, b"ready\n"
        else:
            status, body = 503, b"stopping\n"
        cycle.reply(status, [*_HEADERS, (b"content-length", b"%d" % len(body))], body)
        return True
