"""A worker: one uvloop loop serving the app on sockets it was handed.

Order of life: import the app, run lifespan startup, serve, tell the master it is
ready; on TERM drain (HTTP/1.1 answers with Connection: close), run lifespan
shutdown, exit 0. On INT or QUIT stop fast. USR1 reopens the log files. USR2 reloads
the certificate files (the master sends it once it has checked them): new handshakes,
TCP and QUIC, use the new certificate; open connections keep theirs. A worker without
a master checks the files itself every ``tls.watch_interval`` seconds. WINCH turns the
readiness path (``health.ready_path``) to 503: the master sends it when a stop begins,
``health.drain_delay`` seconds before the TERM. Without a master (``fpy3 run``) the
worker waits that delay itself between the TERM and the drain.

Under a master, the worker writes short lines on its pipe: ``ready`` once serving,
``beat`` every ``workers.timeout / 4`` seconds from a loop timer (a blocked loop
stops beating and gets killed), and ``requests N`` (requests served so far) when it
changed, at most once a second, and at once on reaching ``request_limit``. The
master decides about recycling. A worker whose master is gone drains and exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import uvloop

from .bootstrap import EXIT_STARTUP
from .certs import FileWatch
from .config import Settings
from .core.lifespan import Lifespan, LifespanError
from .importer import AppImportError, import_app
from .keys import SessionKeys
from .logs import AccessLog, reopen_error_log
from .metrics import Block
from .service import HTTPService
from .sockets import Listeners
from .tls import TLSContexts

logger = logging.getLogger("fpy3.error")

EXIT_OK = 0


class Worker:
    def __init__(
        self,
        settings: Settings,
        listeners: Listeners,
        ready_fd: int | None = None,
        worker_id: int = 0,
        session_keys: SessionKeys | None = None,
        request_limit: int = 0,
        quic_join: tuple[str, str, int] | None = None,
        metrics: Block | None = None,
    ):
        self.settings = settings
        self.metrics = metrics  # the master's shared counters block for this worker
        self.quic_join = quic_join  # (lock path, id path, ack fd): MsQuic, steered
        self.listeners = listeners
        self.ready_fd = ready_fd
        self.worker_id = worker_id  # carried in the QUIC connection ids this worker issues
        self.session_keys = session_keys
        self.tls: TLSContexts | None = None
        self._watch: FileWatch | None = None
        self.loop = asyncio.get_running_loop()
        self.stopping: asyncio.Future = self.loop.create_future()
        self.service: HTTPService | None = None
        self.access_log: AccessLog | None = None
        self.request_limit = request_limit  # the master recycles us past it; 0 = never
        self._reported = 0  # requests_served last sent to the master
        self._next_beat = 0.0
        self._next_report = 0.0
        self._pulse: asyncio.TimerHandle | None = None
        self._master = os.getppid()
        self._hurry: asyncio.Future | None = None  # ends the drain delay early

    async def main(self) -> int:
        settings = self.settings
        if self.ready_fd is not None:
            # Non-blocking: a master that stops reading must not stall this loop.
            os.set_blocking(self.ready_fd, False)
            self._tick()  # beats cover app import and lifespan startup too
        # Before the certificate is first read: a change from then on is not missed.
        self.loop.add_signal_handler(signal.SIGUSR2, self.reload_tls)
        try:
            app = import_app(settings.server.app, settings.server.app_dir, settings.server.factory)
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
        access_log = self.access_log = AccessLog(log) if log.access_log else None
        service = HTTPService(
            app,
            self.loop,
            settings,
            state=lifespan.state,
            access_log=access_log,
            metrics=self.metrics,
            quic_port=self.listeners.quic_port,
        )
        self.service = service
        try:
            code = await self._serve(service)
            if code != EXIT_OK:
                return code
            fast = await self.stopping
            delay = settings.health.drain_delay
            if not fast and delay and self.ready_fd is None:
                fast = await self._drain_delay(service, delay)
            await service.drain(0.0 if fast else settings.workers.drain_timeout)
        finally:
            # Whatever happened: QUIC clients get a CONNECTION_CLOSE now, not a silence
            # until their idle timeout (a forked worker leaves through os._exit).
            service.close()
        await lifespan.shutdown()
        if self._pulse is not None:
            self._pulse.cancel()
        if access_log is not None:
            access_log.close()
        return EXIT_OK

    async def _serve(self, service: HTTPService) -> int:
        settings = self.settings
        if self.ready_fd is None and settings.tls.watch_interval:
            self._watch = FileWatch(_tls_files(settings))
            self.loop.call_later(settings.tls.watch_interval, self._check_files)
        self.tls = TLSContexts(settings, self.session_keys)
        join = None
        try:
            if self.quic_join is not None and self.listeners.udp_addr is not None:
                from .h3.engine import GroupJoin

                join = GroupJoin(*self.quic_join)
            await service.serve(
                self.listeners,
                worker_id=join.worker_id if join else self.worker_id,
                keys=self.session_keys,
                tls_context=self.tls.listener,
            )
            if join is not None and not join.done(self._send):
                # No packet would reach it: serve without HTTP/3 (the other workers
                # take it), and leave the group before the next worker joins.
                logger.error("HTTP/3: the master did not adopt this worker's QUIC socket")
                service.close_h3()
        except OSError as exc:
            logger.error("%s", exc)
            return EXIT_STARTUP
        finally:
            if join is not None:
                join.close()
        self._install_signals()
        self._report_ready(service)
        return EXIT_OK

    async def _drain_delay(self, service: HTTPService, delay: float) -> bool:
        """Readiness fails while everything else is served as before, so load balancers
        stop sending new work before connections start closing. A second INT or a QUIT
        cuts it short (True: stop fast)."""
        service.not_ready()
        logger.info("worker %d: draining in %gs", os.getpid(), delay)
        hurry = self._hurry = self.loop.create_future()

        def end() -> None:
            if not hurry.done():
                hurry.set_result(False)

        timer = self.loop.call_later(delay, end)
        try:
            return await hurry
        finally:
            timer.cancel()

    def _install_signals(self) -> None:
        self.loop.add_signal_handler(signal.SIGTERM, self.stop, False)
        self.loop.add_signal_handler(signal.SIGINT, self._interrupt)
        self.loop.add_signal_handler(signal.SIGQUIT, self.stop, True)
        self.loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)
        if self.service is not None:
            self.loop.add_signal_handler(signal.SIGWINCH, self.service.not_ready)

    def reload_tls(self) -> None:
        """The certificate files changed (they were checked): serve them from now on."""
        if self.tls is None:
            return  # not read yet: they will be read as they are now
        if self.tls.reload() and self.service is not None:
            for h3 in self.service.h3_servers:
                h3.reload_credentials()

    def _check_files(self) -> None:
        if self._watch is not None and not self.stopping.done():
            if self._watch.changed():
                logger.info("TLS: %s changed; reloading", self.settings.tls.cert)
                self.reload_tls()
            self.loop.call_later(self.settings.tls.watch_interval, self._check_files)

    def _reopen_logs(self) -> None:
        if self.access_log is not None:
            self.access_log.reopen()
        reopen_error_log()
        logger.info("worker %d: reopened log files", os.getpid())

    # -- talking to the master ------------------------------------------------------------

    def _tick(self) -> None:
        """Loop timer: a beat every timeout/4 s; the request count once a second when it
        changed, and at once when it reaches the limit (so the recycle starts promptly)."""
        interval = self.settings.workers.timeout / 4
        now = self.loop.time()
        message = b""
        if now >= self._next_beat:
            message = b"beat\n"
            self._next_beat = now + interval
        served = self.service.requests_served if self.service is not None else 0
        limit = self.request_limit
        if served != self._reported and (
            now >= self._next_report or (limit and served >= limit > self._reported)
        ):
            message += b"requests %d\n" % served
            self._reported = served
            self._next_report = now + 1.0
        if message:
            self._send(message)
        if self.service is not None:
            self.service.sample_metrics()
        if os.getppid() != self._master:
            self._master_gone()
        # No per-request hook: with a limit, look at the counter often (it is cheap).
        self._pulse = self.loop.call_later(min(interval, 0.1 if limit else 1.0), self._tick)

    def _send(self, message: bytes) -> None:
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, message)
        except BlockingIOError:
            pass  # the master is busy; the next beat will do
        except OSError:
            self._master_gone()

    def _master_gone(self) -> None:
        # Nobody would replace or stop us, and we would keep the ports: drain and exit.
        if not self.stopping.done():
            logger.error("worker %d: master gone; draining", os.getpid())
            self.stop(False)

    def _interrupt(self) -> None:
        # The first Ctrl-C drains, a second one stops at once.
        self.stop(self.stopping.done())

    def stop(self, fast: bool) -> None:
        if not self.stopping.done():
            logger.info("worker %d: %s", os.getpid(), "stopping" if fast else "draining")
            self.stopping.set_result(fast)
        elif fast and self._hurry is not None and not self._hurry.done():
            self._hurry.set_result(True)  # cuts the readiness delay short
        elif fast and self.service is not None:
            logger.info("worker %d: stopping now", os.getpid())
            self.service.hurry()

    def _report_ready(self, service: HTTPService) -> None:
        logger.info(
            "worker %d serving %s on %s",
            os.getpid(),
            self.settings.server.app,
            ", ".join(service.endpoints),
        )
        if self.ready_fd is not None:
            self._send(b"ready\n")


def run(
    settings: Settings,
    listeners: Listeners,
    ready_fd: int | None = None,
    worker_id: int = 0,
    session_keys: SessionKeys | None = None,
    request_limit: int = 0,
    quic_join: tuple[str, str, int] | None = None,
    metrics: Block | None = None,
) -> int:
    """Run a worker to the end; returns the process exit code."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.set_exception_handler(_exception_handler)

    async def main() -> int:
        worker = Worker(
            settings,
            listeners,
            ready_fd,
            worker_id,
            session_keys,
            request_limit,
            quic_join,
            metrics,
        )
        return await worker.main()

    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()
        sys.stdout.flush()


def _tls_files(settings: Settings) -> list[str]:
    tls = settings.tls
    return [p for p in (tls.cert, tls.key, tls.client_ca) if p]


def _exception_handler(loop, context) -> None:
    exc = context.get("exception")
    # Peers that vanish mid-handshake or mid-write are routine on the internet.
    if isinstance(exc, (ConnectionError, TimeoutError)) or "SSL" in type(exc).__name__:
        logger.debug("connection error: %s", context.get("message"))
        return
    loop.default_exception_handler(context)
