"""Serving from inside your own asyncio program (exported as ``fpy3.asgi.ASGIServer``)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from .config import Settings
from .core.lifespan import Lifespan
from .service import HTTPService
from .sockets import bind_tcp
from .tls import server_context

logger = logging.getLogger("fpy3.error")


class ASGIServer:
    """Serve ``app`` on the running loop::

        server = ASGIServer(app)
        await server.start("127.0.0.1", 8443, certfile="cert.pem", keyfile="key.pem")
        ...
        await server.stop()

    ``start()`` binds at once (a bind error raises there) and returns an awaitable
    that completes once lifespan startup ran and the socket accepts. Without a
    certificate it serves cleartext HTTP/1.1. ``debug=True`` logs at debug level and
    puts tracebacks in 500 bodies.
    """

    def __init__(
        self,
        app,
        loop: asyncio.AbstractEventLoop | None = None,
        debug: bool = False,
        settings: Settings | None = None,
    ):
        self.app = app
        self.loop = loop
        self.debug = debug
        self.settings = settings or Settings()
        self.service: HTTPService | None = None
        self.lifespan: Lifespan | None = None
        self._started: asyncio.Task | None = None
        if debug:
            logging.getLogger("fpy3").setLevel(logging.DEBUG)

    def start(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
    ) -> asyncio.Task:
        if self._started is not None:
            raise RuntimeError("server already started")
        loop = self.loop or asyncio.get_running_loop()
        self.loop = loop
        settings = self.settings
        # Alt-Svc only once HTTP/3 can be served by this server.
        settings = dataclasses.replace(
            settings,
            server=dataclasses.replace(settings.server, host=host, port=port, debug=self.debug),
            http3=dataclasses.replace(settings.http3, enabled=False),
        )
        if certfile:
            settings = dataclasses.replace(
                settings,
                tls=dataclasses.replace(settings.tls, cert=certfile, key=keyfile or certfile),
            )
        self.settings = settings
        ssl_context = server_context(settings) if certfile else None
        sock = bind_tcp(host, port, settings.http1.backlog, "port")
        self._started = loop.create_task(self._start(sock, ssl_context))
        return self._started

    async def _start(self, sock, ssl_context) -> None:
        loop = asyncio.get_running_loop()
        lifespan = self.lifespan = Lifespan(self.app, loop)
        await lifespan.startup()
        service = self.service = HTTPService(
            self.app, loop, self.settings, state=lifespan.state, debug=self.debug
        )
        service.start()
        await service.listen(sock, ssl_context)
        self._sock = sock

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self._sock.getsockname()[1]

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, drain in-flight requests (up to ``timeout``), run lifespan shutdown."""
        if self._started is None:
            return
        await self._started
        if self.service is not None:
            await self.service.drain(timeout)
        if self.lifespan is not None:
            await self.lifespan.shutdown()

    close = stop
