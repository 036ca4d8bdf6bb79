"""ASGI lifespan: startup before serving, shutdown after draining.

An app that raises on the lifespan scope before answering startup is taken not to
support lifespan, and is served anyway (as uvicorn's "auto" mode does).
"""

from __future__ import annotations

import asyncio
import logging

from .scope import ASGI_VERSION

logger = logging.getLogger("fpy3.error")


class LifespanError(Exception):
    """Startup or shutdown failed; the message says why."""


class Lifespan:
    def __init__(self, app, loop: asyncio.AbstractEventLoop):
        self.app = app
        self.loop = loop
        self.state: dict = {}
        self.supported = True
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._startup: asyncio.Future = loop.create_future()
        self._shutdown: asyncio.Future = loop.create_future()
        self._task: asyncio.Task | None = None
        self._started_receiving = False

    async def startup(self) -> None:
        self._task = self.loop.create_task(self._run())
        await self._inbox.put({"type": "lifespan.startup"})
        await asyncio.wait({self._startup, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not self._startup.done():
            # The app returned or raised without answering: no lifespan support.
            self.supported = False
            return
        error = self._startup.result()
        if error is not None:
            raise LifespanError(f"lifespan startup failed: {error}")

    async def shutdown(self, timeout: float = 30.0) -> None:
        if not self.supported or self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        done, _ = await asyncio.wait(
            {self._shutdown, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            logger.error("lifespan shutdown did not complete in %.0f s", timeout)
            self._task.cancel()
            return
        if self._shutdown.done() and self._shutdown.result() is not None:
            logger.error("lifespan shutdown failed: %s", self._shutdown.result())

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI_VERSION.copy(), "state": self.state}
        try:
            await self.app(scope, self._receive, self._send)
        except BaseException as exc:
            if not self._startup.done():
                if self._started_receiving:
                    # It took the startup message, then failed: that is a startup failure.
                    logger.error("Exception in ASGI lifespan startup", exc_info=exc)
                    self._startup.set_result(f"{type(exc).__name__}: {exc}")
                elif isinstance(exc, Exception):
                    logger.info(
                        "ASGI lifespan unsupported by the app (%s: %s)", type(exc).__name__, exc
                    )
                return
            logger.error("Exception in ASGI lifespan", exc_info=exc)
            if not self._shutdown.done():
                self._shutdown.set_result(f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, Exception):
                raise

    async def _receive(self) -> dict:
        message = await self._inbox.get()
        self._started_receiving = True
        return message

    async def _send(self, message: dict) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self._startup.set_result(None)
        elif kind == "lifespan.startup.failed":
            self._startup.set_result(message.get("message") or "no message")
        elif kind == "lifespan.shutdown.complete":
            self._shutdown.set_result(None)
        elif kind == "lifespan.shutdown.failed":
            self._shutdown.set_result(message.get("message") or "no message")
        else:
            raise RuntimeError(f"unexpected ASGI lifespan message {kind!r}")
