"""Serving from inside your own program: ``fpy3.asgi.ASGIServer`` and ``fpy3.asgi.serve``.

An embedded server is one worker in the caller's event loop. It is prepared as
``fpy3 run`` prepares a worker (the certificate from ``fpy3.tls``, the development one
when none is given; the sockets from ``fpy3.sockets``) and serves through the same
``HTTPService.serve``: HTTPS with Alt-Svc on TCP and HTTP/3 on the same UDP port, with
websockets on both, and whatever else that path serves. Cleartext HTTP/1.1 alone is
served only when asked for with ``tls=False``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys

from . import config
from .bootstrap import EXIT_CONFIG, EXIT_STARTUP
from .config import Settings
from .core.lifespan import Lifespan, LifespanError
from .logs import AccessLog, configure_error_log
from .service import HTTPService
from .sockets import Listeners, bind_listeners, bind_picked, bind_tcp
from .tls import server_context, with_certificate

logger = logging.getLogger("fpy3.error")


class ASGIServer:
    """Serve ``app`` on the running loop::

        server = ASGIServer(app)
        server.start("127.0.0.1", 8443)  # or: await server.start(...)
        ...
        await server.stop()

    or ``async with ASGIServer(app, port=0) as server:`` (``server.port`` is the port).

    It serves HTTP/1.1 over TLS with ``Alt-Svc: h3=":PORT"`` and HTTP/3 on the same
    UDP port (``http3.engine`` picks ngtcp2 or MsQuic), websockets on both. The
    certificate is ``certfile``/``keyfile``, else ``tls.cert``/``tls.key``, else the
    development certificate (``tls.dev_cert``), as for ``fpy3 run``. ``tls=False``
    serves cleartext HTTP/1.1 only.

    ``settings`` defaults to the defaults plus the ``FPY3_<SECTION>__<KEY>`` environment
    variables (a bad one raises ``fpy3.config.ConfigError`` here). Host, port and the
    certificate given here or to ``start()`` override them.

    ``debug=True`` logs at debug level, logs each request (the access log, on stdout
    unless ``logging.access_log_file`` says otherwise; ``access_log`` turns it on or
    off whatever ``debug``) and puts tracebacks into 500 bodies. Unless the program
    configured logging itself, fpy3's log goes to stderr.
    """

    def __init__(
        self,
        app,
        loop: asyncio.AbstractEventLoop | None = None,
        debug: bool = False,
        settings: Settings | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        tls: bool = True,
        access_log: bool | None = None,
    ):
        self.app = app
        self.loop = loop  # the loop served on; None: the running one at each start()
        self._given_loop = loop
        self.settings = settings if settings is not None else config.load(None)
        self.debug = debug or self.settings.server.debug
        self.service: HTTPService | None = None
        self.lifespan: Lifespan | None = None
        self.listeners: Listeners | None = None
        self._options = (host, port, certfile, keyfile, tls)
        self._access_log_wanted = access_log
        self._access_log: AccessLog | None = None
        self._task: asyncio.Task | None = None
        self._serving = False

    # -- start --------------------------------------------------------------------------

    def start(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
        tls: bool | None = None,
    ) -> asyncio.Task:
        """Bind now, then serve from a task, which is returned already scheduled.

        The certificate, the bind and the engine's library are checked here: their
        errors (``fpy3.sockets.BindError``, an ``OSError``; ``ValueError``) raise from
        this call. The task runs lifespan startup and then serves; awaiting it (or
        ``await server.start(...)``) returns once every listener accepts. When startup
        fails, the task logs why at once, closes the sockets and raises.
        """
        if self._task is not None:
            raise RuntimeError("server already started")
        loop = self.loop = self._given_loop or asyncio.get_running_loop()
        self._configure_logging()
        log = self.settings.logging
        wanted = self._access_log_wanted
        if wanted is None:
            wanted = self.debug and log.access_log
        access_log = AccessLog(log) if wanted else None
        try:
            settings, listeners = self._prepare(host, port, certfile, keyfile, tls)
        except BaseException:
            if access_log is not None:
                access_log.close()
            raise
        self._access_log = access_log
        self.listeners = listeners
        self.lifespan = Lifespan(self.app, loop)
        self.service = HTTPService(
            self.app,
            loop,
            settings,
            state=self.lifespan.state,
            access_log=access_log,
            debug=self.debug,
        )
        task = self._task = loop.create_task(self._startup())
        task.add_done_callback(_seen)
        return task

    def _configure_logging(self) -> None:
        fpy3_logger = logging.getLogger("fpy3")
        if not fpy3_logger.handlers and not logging.getLogger().handlers:
            configure_error_log(self.settings.logging, self.debug)
        elif self.debug:
            fpy3_logger.setLevel(logging.DEBUG)

    def _prepare(self, host, port, certfile, keyfile, tls) -> tuple[Settings, Listeners]:
        """The effective settings and the bound sockets, the way ``fpy3 run`` makes them."""
        own_host, own_port, own_cert, own_key, own_tls = self._options
        base = self.settings
        host = _first(host, own_host, base.server.host)
        port = _first(port, own_port, base.server.port)
        certfile, keyfile = (certfile, keyfile) if certfile or keyfile else (own_cert, own_key)
        tls = _first(tls, own_tls)
        server = dataclasses.replace(base.server, host=host, port=port, debug=self.debug)
        settings = dataclasses.replace(base, server=server)
        if keyfile and not certfile:
            raise ValueError("keyfile given without certfile")
        if not tls:
            if certfile:
                raise ValueError("certfile given with tls=False (cleartext)")
            # Cleartext: HTTP/1.1 alone (HTTP/3 needs TLS), and no Alt-Svc.
            settings = dataclasses.replace(
                settings, http3=dataclasses.replace(settings.http3, enabled=False)
            )
            sock = bind_tcp(host, port, settings.http1.backlog, "server.port")
            listeners = Listeners(http=[sock])
        else:
            if certfile:
                tls_settings = dataclasses.replace(
                    settings.tls, cert=certfile, key=keyfile or certfile
                )
                settings = dataclasses.replace(settings, tls=tls_settings)
            elif not (settings.tls.cert and settings.tls.key) and not settings.tls.dev_cert:
                raise ValueError(
                    "no certificate: give certfile (and keyfile), allow the development "
                    "certificate (tls.dev_cert), or serve cleartext with tls=False"
                )
            settings = with_certificate(settings)
            server_context(settings)  # a bad certificate or key raises here
            if settings.http3.enabled and settings.http3.engine == "msquic":
                from .msquic import INSTALL_HINT, probe_msquic

                if (reason := probe_msquic()) is not None:
                    raise OSError(
                        f"http3.engine = msquic: libmsquic cannot be loaded ({reason}); "
                        + INSTALL_HINT
                    )
            listeners = bind_picked(settings) if port == 0 else bind_listeners(settings, env={})
        bound = (listeners.tls or listeners.http)[0]
        # Port 0 asked the system for one: Alt-Svc and the logs need the real one.
        server = dataclasses.replace(settings.server, port=bound.getsockname()[1])
        return dataclasses.replace(settings, server=server), listeners

    async def _startup(self) -> None:
        lifespan, service, listeners = self.lifespan, self.service, self.listeners
        assert lifespan is not None and service is not None and listeners is not None
        started = False
        try:
            await lifespan.startup()
            started = True
            await service.serve(listeners)
        except BaseException as exc:
            self._close()
            if isinstance(exc, LifespanError):
                logger.error("%s; not serving (the sockets are closed)", exc)
            elif isinstance(exc, Exception):
                logger.error("cannot serve: %s (the sockets are closed)", exc)
            if started:
                await lifespan.shutdown()
            raise
        self._serving = True
        logger.info("serving %s", ", ".join(service.endpoints))

    # -- stop ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the one the system picked, with port 0)."""
        if self.service is None:
            raise RuntimeError("server not started")
        return self.service.settings.server.port

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, drain (HTTP/1.1 answers with Connection: close, HTTP/3 sends
        GOAWAY; in-flight requests finish, up to ``timeout`` seconds, by default
        ``workers.drain_timeout``), run lifespan shutdown and close the sockets.

        Cancelled while draining, it closes every connection at once (QUIC ones with
        CONNECTION_CLOSE), cancels the requests left and skips lifespan shutdown.
        Stopping a server still starting abandons the start. Once stopped, the server
        may be started again.
        """
        task = self._task
        if task is None:
            return
        if not task.done():
            task.cancel()
        await asyncio.wait([task])
        service, lifespan = self.service, self.lifespan
        try:
            if not self._serving:
                return  # the start failed or was abandoned: nothing is open
            assert service is not None and lifespan is not None
            if timeout is None:
                timeout = service.settings.workers.drain_timeout
            try:
                await service.drain(timeout)
            except asyncio.CancelledError:
                for app_task in list(service.tasks):
                    app_task.cancel()
                raise
            finally:
                self._close()  # the sockets are free before lifespan shutdown runs
            await lifespan.shutdown()
        finally:
            # Also when the start task was cancelled before it ran at all.
            self._close()
            self._task = None
            self._serving = False

    close = stop

    def _close(self) -> None:
        """Close the service, the sockets and the access log now (again is harmless)."""
        if self.service is not None:
            self.service.close()
        if self.listeners is not None:
            self.listeners.close()
        if self._access_log is not None:
            self._access_log.close()

    async def __aenter__(self) -> ASGIServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()


def _first(*values):
    return next(v for v in values if v is not None)


def _seen(task: asyncio.Task) -> None:
    # A failed start was logged when it failed; whoever awaits the task still gets the
    # exception, and nobody gets "Task exception was never retrieved" at exit.
    if not task.cancelled():
        task.exception()


# -- the one-call form -------------------------------------------------------------------


def serve(
    app,
    host: str | None = None,
    port: int | None = None,
    *,
    debug: bool = False,
    settings: Settings | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    tls: bool = True,
    access_log: bool | None = None,
    drain_timeout: float | None = None,
) -> None:
    """Serve ``app`` (see ``ASGIServer``) on a new uvloop loop until SIGINT or SIGTERM,
    then drain (up to ``drain_timeout``, by default ``workers.drain_timeout``) and
    return. A second signal stops at once. As with ``fpy3 run``, a bad setting,
    certificate or socket exits 2 and a failed lifespan startup exits 3 (SystemExit),
    with the reason on stderr.
    """
    import uvloop

    try:
        server = ASGIServer(
            app,
            debug=debug,
            settings=settings,
            host=host,
            port=port,
            certfile=certfile,
            keyfile=keyfile,
            tls=tls,
            access_log=access_log,
        )
    except config.ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    uvloop.run(_serve_until_signal(server, drain_timeout))


async def _serve_until_signal(server: ASGIServer, drain_timeout: float | None) -> None:
    loop = asyncio.get_running_loop()
    try:
        started = server.start()
    except (OSError, ValueError, RuntimeError) as exc:
        # RuntimeError: the development certificate could not be made.
        print(exc, file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    signalled: asyncio.Future = loop.create_future()
    stopping: list[asyncio.Task] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if not signalled.done():
            logger.info("%s: draining (a second signal stops at once)", name)
            signalled.set_result(None)
        elif stopping and not stopping[0].done():
            logger.info("%s: stopping at once", name)
            stopping[0].cancel()

    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await asyncio.wait([started, signalled], return_when=asyncio.FIRST_COMPLETED)
        if started.done() and (started.cancelled() or started.exception() is not None):
            raise SystemExit(EXIT_STARTUP)  # logged by the start task
        await signalled
        stopping.append(loop.create_task(server.stop(drain_timeout)))
        await asyncio.wait(stopping)
        if not stopping[0].cancelled():
            stopping[0].result()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
