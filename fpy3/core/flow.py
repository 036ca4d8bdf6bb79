"""The one waiter: a consumer awaits, a producer wakes it.

Every place that waits on the peer or the app (a body chunk, a transport that drains,
acknowledged bytes, a drain) uses this instead of a hand-written future.
"""

from __future__ import annotations

import asyncio

# Bytes received for the app and not yet taken by it, above which an adapter stops
# reading (HTTP/1.1) or stops giving flow-control credit (QUIC).
RECV_HIGH_WATER = 256 * 1024
# Bytes written but not yet sent (or acknowledged) above which send() waits.
SEND_HIGH_WATER = 256 * 1024


class Waiter:
    """A future created on demand; ``wake()`` completes it and forgets it."""

    __slots__ = ("_loop", "_future")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._future: asyncio.Future | None = None

    def wait(self) -> asyncio.Future:
        """The future to await (the same one for every waiter until the next wake)."""
        future = self._future
        if future is None:
            future = self._future = self._loop.create_future()
        return future

    def wake(self) -> None:
        future = self._future
        if future is not None:
            self._future = None
            if not future.done():
                future.set_result(None)

    @property
    def waiting(self) -> bool:
        return self._future is not None
