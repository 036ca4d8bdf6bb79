"""A worker: one uvloop loop serving the app on sockets it was handed.

Order of life: import the app, run lifespan startup, serve, tell the master it is
ready; on TERM drain (HTTP/1.1 answers with Connection: close), run lifespan
shutdown, exit 0. On INT or QUIT stop fast.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import uvloop

from .asgi.lifespan import Lifespan, LifespanError
from .config import Settings
from .importer import AppImportError, import_app
from .logs import AccessLog
from .server import HTTPService
from .sockets import Listeners
from .tls import server_context

logger = logging.getLogger("fpy3.error")

EXIT_OK = 0
EXIT_STARTUP = 3  # the app could not be imported or its lifespan startup failed


class Worker:
    def __init__(
        self,
        settings: Settings,
        listeners: Listeners,
        ready_fd: int | None = None,
        worker_id: int = 0,
        quic_secret: bytes | None = None,
    ):
        self.settings = settings
        self.listeners = listeners
        self.ready_fd = ready_fd
        self.worker_id = worker_id  # carried in the QUIC connection ids this worker issues
        self.quic_secret = quic_secret
        self.loop = asyncio.get_running_loop()
        self.stopping: asyncio.Future = self.loop.create_future()

    async def main(self) -> int:
        settings = self.settings
        try:
            app = import_app(settings.server.app, settings.server.app_dir)
        except AppImportError as exc:
            logger.error("%s", exc, exc_info=exc.__cause__)
            return EXIT_STARTUP
        lifespan = Lifespan(app, self.loop)
        try:
            await lifespan.startup()
        except LifespanError as exc:
            logger.error("%s", exc)
            return EXIT_STARTUP
        log = settings.logging
        access_log = AccessLog(log) if log.access_log else None
        service = HTTPService(app, self.loop, settings, state=lifespan.state, access_log=access_log)
        service.start()
        await service.listen(self.listeners.tls, server_context(settings))
        if self.listeners.http is not None:
            await service.listen(self.listeners.http, None)
        if self.listeners.udp is not None:
            try:
                service.serve_h3(
                    self.listeners.udp,
                    settings.tls.cert,
                    settings.tls.key,
                    self.worker_id,
                    self.quic_secret,
                )
            except OSError as exc:
                logger.error("%s", exc)
                return EXIT_STARTUP
        self._install_signals()
        self._report_ready()
        fast = await self.stopping
        await service.drain(0.0 if fast else settings.workers.drain_timeout)
        await lifespan.shutdown()
        if access_log is not None:
            access_log.close()
        return EXIT_OK

    def _install_signals(self) -> None:
        self.loop.add_signal_handler(signal.SIGTERM, self.stop, False)
        self.loop.add_signal_handler(signal.SIGINT, self._interrupt)
        self.loop.add_signal_handler(signal.SIGQUIT, self.stop, True)

    def _interrupt(self) -> None:
        # The first Ctrl-C drains, a second one stops at once.
        self.stop(self.stopping.done())

    def stop(self, fast: bool) -> None:
        if not self.stopping.done():
            logger.info("worker %d: %s", os.getpid(), "stopping" if fast else "draining")
            self.stopping.set_result(fast)

    def _report_ready(self) -> None:
        server = self.settings.server
        logger.info(
            "worker %d serving %s on https://%s:%d%s",
            os.getpid(),
            server.app,
            server.host,
            server.port,
            f" and http://{server.host}:{server.http_port}" if server.http_port else "",
        )
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, b"ready\n")
            except OSError:
                pass


def run(
    settings: Settings,
    listeners: Listeners,
    ready_fd: int | None = None,
    worker_id: int = 0,
    quic_secret: bytes | None = None,
) -> int:
    """Run a worker to the end; returns the process exit code."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.set_exception_handler(_exception_handler)

    async def main() -> int:
        return await Worker(settings, listeners, ready_fd, worker_id, quic_secret).main()

    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()
        sys.stdout.flush()


def _exception_handler(loop, context) -> None:
    exc = context.get("exception")
    # Peers that vanish mid-handshake or mid-write are routine on the internet.
    if isinstance(exc, (ConnectionError, TimeoutError)) or "SSL" in type(exc).__name__:
        logger.debug("connection error: %s", context.get("message"))
        return
    loop.default_exception_handler(context)
