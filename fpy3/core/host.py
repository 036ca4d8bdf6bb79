"""What the core and the protocol adapters need from the per-worker service.

``fpy3.service.HTTPService`` implements it; tests use a small fake. Typed here so the
core never imports the service (which sits above the protocols).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from .forwarded import ProxyHeaders
from .health import Health

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Any]


class Host(Protocol):
    app: ASGIApp
    loop: asyncio.AbstractEventLoop
    debug: bool  # tracebacks in 500 bodies
    root_path: str
    state: dict  # the lifespan state; every scope gets a shallow copy
    timed: bool  # response_done needs the start time (access log, metrics)
    proxy_headers: ProxyHeaders | None  # None: proxy headers are never applied
    health: Health | None  # None: no health paths; every request goes to the app

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Run an app cycle as a task the service tracks (drain waits for it, then
        cancels it at the deadline)."""
        ...

    def response_done(self, scope: dict, status: int, sent: int, started_at: float) -> None:
        """A response ended (complete or aborted): the access log and the counters."""
        ...
