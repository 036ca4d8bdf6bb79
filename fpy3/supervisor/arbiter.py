"""``fpy3-master``: binds the sockets, forks the workers and keeps them running.

Signal handlers only queue the signal and wake the loop through a pipe; the
loop in ``Arbiter.run`` does all the work (as gunicorn's arbiter does).

- TERM: graceful stop (workers drain up to ``workers.drain_timeout``), exit 0. With
  ``health.drain_delay``, workers first get WINCH (their readiness path answers 503)
  and keep serving as usual for that long; then the drain begins.
- INT, QUIT: fast stop.
- HUP: reload: re-read the config; if valid, start a new generation of workers and
  drain the old one once the new one is ready; if not, log and keep serving.
- CHLD: reap; a worker that dies is replaced, with backoff. A worker that fails to
  start the app (exit 3) before any worker was ever ready stops the master.
- TTIN / TTOU: one worker more / less (never below 1); TTOU drains the highest number.
- USR1: reopen log files, here and in every worker.

Certificates: every ``tls.watch_interval`` seconds the master reads ``tls.cert``,
``tls.key`` and ``tls.client_ca``; when they changed and make a usable context, it
sends USR2 to every worker, which serves them to new handshakes from then on (TCP and
QUIC alike; open connections keep theirs). A pair that does not load (a key not yet
written beside its new certificate) is logged and the old one keeps serving. With
``acme.enabled`` the ACME client (acme.py) runs in a thread of the master, writes
the certificate into the state dir and wakes the loop, which does the same. This is
cheaper than a reload: the app is not restarted, and websockets, streams and QUIC
connections stay where they are.

Each worker writes lines on its pipe (workers.py): ``ready``, ``beat`` (every
``workers.timeout/4`` s) and ``requests N``. A worker silent for ``workers.timeout``
is killed (SIGKILL) and replaced. A worker past ``workers.max_requests`` (plus jitter)
or ``workers.max_rss_mb`` is recycled: its replacement starts first, and it drains
once that one is ready.

HTTP/3 packets are steered to the worker owning their connection (steering/). A
steering failure (no fd left, a worker or socket gone, a program the kernel refuses)
costs at most HTTP/3 packets their best route: it is logged and retried, and never
ends the loop, which would leave the workers without their master.

With ``NOTIFY_SOCKET`` set (systemd ``Type=notify``) the master reports READY=1,
RELOADING=1, STOPPING=1 and STATUS= (systemd.py). ``server.pidfile`` is written once
the sockets are bound (pidfile.py). As root, workers switch to ``server.user`` /
``server.group`` after the fork (privileges.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import logging
import os
import random
import select
import signal
import sys
import time

from setproctitle import setproctitle

from fpy3 import __version__, config
from fpy3.bootstrap import (
    EXIT_CONFIG,
    EXIT_STARTUP,
    configure_logging,
    load_session_keys,
    load_settings,
    prepare,
)
from fpy3.certs import FileWatch
from fpy3.logs import configure_error_log, reopen_error_log
from fpy3.metrics import Block, Totals, render
from fpy3.msquic import msquic_engine
from fpy3.sockets import BindError, Listeners, bind_tcp

from .acme import AcmeManager
from .exporter import MetricsEndpoint
from .pidfile import Pidfile
from .privileges import UserIds, resolve_ids
from .reloader import FileWatcher
from .steering.msquic_group import MsQuicGroup
from .steering.reuseport import MAX_SOCKETS, QuicGroups, SteeringUnavailable
from .systemd import sd_notify
from .workers import Launch, Message, WorkerProcess, spawn

logger = logging.getLogger("fpy3.error")

HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
)
MAX_WORKERS = 1024  # as workers.count allows
RSS_INTERVAL = 5.0  # seconds between RSS samples when workers.max_rss_mb is set
RECYCLE_RETRY = 30.0  # after a replacement failed to start, wait this long to try again


class Arbiter:
    def __init__(
        self,
        args: argparse.Namespace,
        settings: config.Settings,
        listeners: Listeners,
        default_workers: int = 0,
    ):
        self.args = args
        self.default_workers = default_workers  # workers.count = 0: 0 = one per CPU
        self.settings = settings
        self.listeners = listeners
        self.workers: dict[int, WorkerProcess] = {}
        self.generation = 1
        self.signals: list[int] = []
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stopping: str | None = None  # "graceful" | "fast"
        self.stop_deadline = 0.0
        self.drain_at = 0.0  # a graceful stop's drain_delay ends then (0 = not waiting)
        self.ever_ready = False
        self.crashes: list[float] = []
        self.exit_code = 0
        self.previous: config.Settings | None = None  # the generation a reload replaces
        self.previous_count = 0
        # Reset, token and ticket keys: every worker, restart and replica shares them.
        self.session_keys = load_session_keys(settings)
        self.tls_watch: FileWatch | None = None
        self.next_tls_check = 0.0
        self.tls_changed = False  # set by the ACME thread: a new certificate is on disk
        self.acme: AcmeManager | None = None
        self.watcher: FileWatcher | None = None
        # TTIN/TTOU change it; a reload resets it.
        self.worker_count = worker_count(settings, default_workers)
        self.ids: UserIds | None = None  # what workers switch to
        self.pidfile: Pidfile | None = None
        self.reloading = False  # between RELOADING=1 and the READY=1 that ends it
        self.announced = False  # READY=1 sent once
        self.last_round = time.monotonic()
        self.next_rss_check = 0.0
        self.quic: QuicGroups | None = None  # the steered UDP socket groups, one per address
        self.msquic: MsQuicGroup | None = None  # MsQuic: the workers' sockets, steered
        self.serving = 1  # the generation that takes new QUIC connections
        self.steering_stale = False  # the last steer() failed: retried every round
        self.totals = Totals()  # metrics of the workers that exited, and master events
        self.exporter: MetricsEndpoint | None = None  # metrics.port
        self.msquic_id_stale = False  # the MsQuic group's tidy() failed: retried every round

    # -- signals: queue and wake ------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)
        try:
            os.write(self.wake_w, b"\0")
        except OSError:
            pass

    def _install_signals(self) -> None:
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        setproctitle(f"fpy3: master [{self.settings.config_file or self.settings.server.app}]")
        try:
            self.ids = resolve_ids(self.settings)
            if self.settings.server.pidfile:
                self.pidfile = Pidfile(self.settings.server.pidfile)
                self.pidfile.create()
            self._steer_udp()
            metrics = self.settings.metrics
            if metrics.port:
                sock = bind_tcp(metrics.host, metrics.port, 64, "metrics.port")
                self.exporter = MetricsEndpoint(sock, self._render_metrics)
        except (OSError, ValueError, BindError) as exc:
            print(f"{self.settings.config_file or 'command line'}: {exc}", file=sys.stderr)
            self.listeners.close()
            if self.quic is not None:
                self.quic.close()
            if self.pidfile is not None:
                self.pidfile.remove()
            return EXIT_CONFIG
        self._install_signals()
        logger.info(
            "fpy3 %s master %d starting %d worker(s); listening on %s%s",
            __version__,
            os.getpid(),
            self.worker_count,
            self.listeners.describe(),
            " (sockets from systemd)" if self.listeners.systemd else "",
        )
        if self.quic is not None:
            logger.info("HTTP/3 steered on %d UDP address(es)", len(self.quic.groups))
        if self.exporter is not None:
            host, port = self.exporter.sock.getsockname()[:2]
            logger.info("metrics on http://%s:%d/metrics", host, port)
        sd_notify(f"MAINPID={os.getpid()}\nSTATUS=starting {self.worker_count} worker(s)")
        try:
            self._spawn_generation()
            if self.settings.reload.enabled:
                self.watcher = FileWatcher(self.settings, self._on_signal)
            self._watch_tls()
            if self.settings.acme.enabled:
                self.acme = AcmeManager(self.settings, self._acme_done)
            while True:
                timeout = 1.0
                if self.drain_at:
                    timeout = min(timeout, max(0.0, self.drain_at - time.monotonic()))
                self._wait(timeout)
                while self.signals:
                    self._handle_signal(self.signals.pop(0))
                self._reap()
                self._check_tls()
                self._check_heartbeats()
                if self.msquic is not None:
                    self._tidy_msquic()
                if self.steering_stale:
                    self._steer()
                if self.stopping:
                    if self.drain_at and time.monotonic() >= self.drain_at:
                        self._begin_drain(signal.SIGTERM)
                    if not self.workers:
                        break
                    if time.monotonic() > self.stop_deadline:
                        self._kill_all(signal.SIGKILL)
                else:
                    self._maintain()
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            if self.acme is not None:
                self.acme.stop()
            self.listeners.close()
            if self.quic is not None:
                self.quic.close()  # only now: closing one reorders the group
            if self.msquic is not None:
                self.msquic.close()
            if self.exporter is not None:
                self.exporter.close()
            if self.pidfile is not None:
                self.pidfile.remove()
        logger.info("master %d exiting", os.getpid())
        return self.exit_code

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal or a worker's message, at most ``timeout`` s; handle the
        messages."""
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        pipes = {}
        for w in self.workers.values():
            if not w.eof:
                poller.register(w.pipe, select.POLLIN)
                pipes[w.pipe] = w
        handlers = self.exporter.register(poller) if self.exporter is not None else {}
        for fd, _ in poller.poll(timeout * 1000):
            if fd in handlers:
                handlers[fd](fd)
            elif fd == self.wake_r:
                try:
                    while os.read(self.wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                worker = pipes[fd]
                for message in worker.read():
                    self._on_message(worker, message)

    def _on_message(self, worker: WorkerProcess, message: Message) -> None:
        if message.kind == "ready":
            worker.ready = True
            self.ever_ready = True
            self._on_worker_ready(worker)
        elif message.kind == "requests":
            worker.requests = message.value
        elif message.kind == "quic":
            self._on_join(worker, message.value)

    def _handle_signal(self, sig: int) -> None:
        if sig == signal.SIGCHLD:
            return  # reaping happens every round
        if sig == signal.SIGHUP:
            self._reload()
        elif sig == signal.SIGTERM:
            self._stop("graceful")
        elif sig in (signal.SIGINT, signal.SIGQUIT):
            self._stop("fast")
        elif sig == signal.SIGUSR1:
            reopen_error_log()
            logger.info("reopened log files")
            self._kill_all(signal.SIGUSR1)
        elif self.stopping:
            return
        elif sig == signal.SIGTTIN:
            if self.worker_count < MAX_WORKERS:
                self.worker_count += 1
                logger.info("TTIN: now %d worker(s)", self.worker_count)
                sd_notify(f"STATUS={self._status()}")
        elif sig == signal.SIGTTOU:
            if self.worker_count > 1:
                self.worker_count -= 1
                logger.info("TTOU: now %d worker(s)", self.worker_count)
                sd_notify(f"STATUS={self._status()}")
            else:
                logger.info("TTOU ignored: already at 1 worker")

    # -- workers ------------------------------------------------------------------------------

    def _spawn_generation(self) -> None:
        for number in range(1, self.worker_count + 1):
            if self._spawn(number) is None:
                return  # the rest follow in _maintain, after the backoff

    def _spawn(self, number: int) -> WorkerProcess | None:
        """Start worker ``number`` of the current generation; None when the system
        refused (logged, and counted as a crash so that retries back off)."""
        workers = self.settings.workers
        limit = 0
        if workers.max_requests:
            limit = workers.max_requests + random.randint(0, workers.max_requests_jitter)
        quic_id = None
        if self.quic is not None:
            try:
                quic_id = self.quic.acquire(self.generation)
            except OSError as exc:
                logger.error("worker %d without HTTP/3: %s", number, exc)
        launch = Launch(
            number,
            self.generation,
            self.settings,
            self.session_keys,
            limit,
            self.ids,
            (self.msquic.lock_path, self.msquic.id_path) if self.msquic is not None else None,
        )
        block = None
        try:
            if self.exporter is not None:
                block = Block()
            worker = spawn(
                launch, functools.partial(self._detach_child, number, quic_id), metrics=block
            )
        except OSError as exc:
            if quic_id is not None and self.quic is not None:
                self.quic.release(quic_id)
            if block is not None:
                block.close()
            logger.error("cannot start worker number %d: %s", number, exc)
            self.crashes.append(time.monotonic())
            return None
        self.totals.worker_starts += 1
        worker.quic_id = quic_id
        self.workers[worker.pid] = worker
        self._steer()
        return worker

    def _detach_child(self, number: int, quic_id: int | None) -> tuple[Listeners, int]:
        """In a new worker, right after the fork: drop what is the master's. Returns the
        sockets the worker serves and its QUIC worker id."""
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self.wake_r)
        os.close(self.wake_w)
        for other in self.workers.values():
            other.close()
        if self.msquic is not None:
            self.msquic.forget_in_child()
        if self.exporter is not None:
            self.exporter.forget_in_child()
        listeners = self.listeners
        if self.quic is not None:
            udp = self.quic.for_worker(quic_id) if quic_id is not None else []
            return dataclasses.replace(listeners, udp=udp), quic_id or 0
        if number != 1 and listeners.udp:
            # Without steering, processes sharing one UDP socket would split QUIC
            # connections between them: one worker serves HTTP/3.
            return dataclasses.replace(listeners, udp=[]), number
        return listeners, number

    def _current(self) -> list[WorkerProcess]:
        """The current generation's workers that are not on their way out."""
        return [
            w for w in self.workers.values() if w.generation == self.generation and not w.retiring
        ]

    def _retire(self, worker: WorkerProcess) -> None:
        worker.retiring = True
        self._steer()  # no new QUIC connections for a worker about to drain
        self._signal(worker.pid, signal.SIGTERM)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if worker.metrics is not None:
                self.totals.retire(worker.metrics)
            worker.close()
            if worker.quic_id is not None:
                group = self._steering_group()
                if group is not None:
                    group.release(worker.quic_id)  # bookkeeping only: cannot fail
                    self._steer()
            code = os.waitstatus_to_exitcode(status)
            how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            outcome = "signal" if code < 0 else "ok" if code == 0 else "error"
            self.totals.worker_exits[outcome] = self.totals.worker_exits.get(outcome, 0) + 1
            # Unlink a recycle pair: whichever is left just serves on.
            old = self.workers.get(worker.replaces) if worker.replaces else None
            new = self.workers.get(worker.replacement) if worker.replacement else None
            if old is not None:
                old.replacement = None
            if new is not None:
                new.replaces = None
            if self.stopping or worker.retiring or worker.generation != self.generation:
                logger.info("worker %d exited (%d)", pid, code)
                continue
            if old is not None:
                # A recycle that did not take: the old worker keeps serving for now.
                logger.error(
                    "replacement worker %d %s before it was ready; worker %d keeps serving",
                    pid,
                    how,
                    old.pid,
                )
                old.next_recycle = time.monotonic() + RECYCLE_RETRY
                continue
            if not worker.ready and (code == EXIT_STARTUP or worker.timed_out):
                if self._rollback():
                    continue
                if code == EXIT_STARTUP and not self.ever_ready:
                    logger.error("worker %d could not start the app; stopping", pid)
                    self.exit_code = EXIT_STARTUP
                    self._stop("fast")
                    continue
            logger.error("worker %d (number %d) %s; replacing it", pid, worker.number, how)
            self.crashes.append(time.monotonic())

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        if self.workers and now - self.last_round > min(w.timeout for w in self.workers.values()):
            # This loop itself did not run (the machine slept, the master was stopped):
            # the silence is ours, not the workers'.
            for w in self.workers.values():
                w.last_seen = now
        self.last_round = now
        for w in list(self.workers.values()):
            silent = now - w.last_seen
            if not w.timed_out and not w.eof and silent > w.timeout:
                logger.error(
                    "worker %d (number %d) sent no heartbeat for %.1fs (workers.timeout);"
                    " killing it",
                    w.pid,
                    w.number,
                    silent,
                )
                w.timed_out = True
                self._signal(w.pid, signal.SIGKILL)

    def _maintain(self) -> None:
        """Keep the current generation at full strength, backing off on a crash loop."""
        now = time.monotonic()
        self.crashes = [t for t in self.crashes if now - t < 60]
        if len(self.crashes) >= 10:
            logger.error("workers crashed %d times in a minute; stopping", len(self.crashes))
            self.exit_code = 1
            self._stop("fast")
            return
        current = self._current()
        for w in current:
            if w.number > self.worker_count:
                logger.info("worker %d (number %d) removed; draining it", w.pid, w.number)
                self._retire(w)
        self._check_recycle(now)
        if self.crashes and now - self.crashes[-1] < min(2 ** len(self.crashes) * 0.1, 5.0):
            return  # backoff
        running = {w.number for w in self._current()}
        for number in range(1, self.worker_count + 1):
            if number not in running and self._spawn(number) is None:
                return

    def _check_recycle(self, now: float) -> None:
        """Recycle one worker at a time past max_requests or max_rss_mb."""
        if any(w.replacement is not None for w in self.workers.values()):
            return
        candidates = [
            w for w in self._current() if w.ready and not w.replaces and now >= w.next_recycle
        ]
        rss: dict[int, float] = {}
        max_rss = self.settings.workers.max_rss_mb
        if max_rss and candidates and now >= self.next_rss_check:
            self.next_rss_check = now + RSS_INTERVAL
            rss = worker_rss_mb([w.pid for w in candidates])
        for w in sorted(candidates, key=lambda w: w.number):
            if w.request_limit and w.requests >= w.request_limit:
                reason = f"served {w.requests} requests (workers.max_requests)"
            elif rss.get(w.pid, 0) > max_rss:
                reason = f"uses {rss[w.pid]:.0f} MiB (workers.max_rss_mb = {max_rss})"
            else:
                continue
            new = self._spawn(w.number)
            if new is None:
                w.next_recycle = now + RECYCLE_RETRY
                return
            new.replaces, w.replacement = w.pid, new.pid
            logger.info(
                "worker %d (number %d) %s; starting worker %d", w.pid, w.number, reason, new.pid
            )
            return

    def _on_worker_ready(self, worker: WorkerProcess) -> None:
        if worker.replaces is not None:
            old = self.workers.get(worker.replaces)
            if old is not None:
                old.replacement = None
                logger.info("worker %d ready; draining worker %d", worker.pid, old.pid)
                self._retire(old)
            worker.replaces = None
        if worker.generation != self.generation:
            return
        current = self._current()
        numbers = {w.number for w in current}
        if numbers.issuperset(range(1, self.worker_count + 1)) and all(w.ready for w in current):
            self.serving = self.generation
            self._steer()
            older = [
                w
                for w in self.workers.values()
                if w.generation != self.generation and not w.retiring
            ]
            if older:
                logger.info(
                    "generation %d ready; draining %d old worker(s)", self.generation, len(older)
                )
            if self.reloading:
                self._count_reload("ok")
            for w in older:
                self._retire(w)
            if self.reloading or not self.announced:
                self.reloading = False
                self.announced = True
                sd_notify(f"READY=1\nSTATUS={self._status()}")

    def _count_reload(self, result: str) -> None:
        self.totals.reloads[result] = self.totals.reloads.get(result, 0) + 1

    def _render_metrics(self) -> str:
        blocks = [w.metrics for w in self.workers.values() if w.metrics is not None]
        return render(self.totals.collect(blocks), self.totals, len(self.workers), self.generation)

    def _status(self) -> str:
        return f"serving with {self.worker_count} worker(s), generation {self.generation}"

    # -- certificates ----------------------------------------------------------------------

    def _watch_tls(self) -> None:
        tls = self.settings.tls
        files = [p for p in (tls.cert, tls.key, tls.client_ca) if p]
        self.tls_watch = FileWatch(files) if tls.watch_interval else None
        self.next_tls_check = time.monotonic() + tls.watch_interval

    def _acme_done(self) -> None:
        """From the ACME thread: a new certificate is in place."""
        self.tls_changed = True
        try:
            os.write(self.wake_w, b"\0")
        except OSError:
            pass

    def _check_tls(self) -> None:
        """Tell the workers to load the certificate files when they changed and work."""
        changed, self.tls_changed = self.tls_changed, False
        now = time.monotonic()
        if self.tls_watch is not None and now >= self.next_tls_check:
            self.next_tls_check = now + self.settings.tls.watch_interval
            if self.tls_watch.changed():
                logger.info("TLS: %s changed on disk", self.settings.tls.cert)
                changed = True
        if not changed or self.stopping:
            return
        from fpy3.tls import server_context

        try:
            server_context(self.settings)
        except (OSError, ValueError) as exc:
            logger.error("TLS: the new certificate files do not load, keeping the old: %s", exc)
            return
        if self.tls_watch is not None:
            self.tls_watch.seen = self.tls_watch.digest()
        if self.settings.http3.enabled and msquic_engine(self.settings.http3.engine):
            # MsQuic's credentials are fixed per worker here: a new generation loads
            # them, with the same zero-downtime switch as a HUP.
            logger.info("TLS: HTTP/3 is on MsQuic; a new generation loads the new certificate")
            self._reload()
            return
        logger.info("TLS: %d worker(s) load the new certificate", len(self.workers))
        self._kill_all(signal.SIGUSR2)

    # -- QUIC steering -------------------------------------------------------------------------

    def _steer_udp(self) -> None:
        """Route QUIC packets by the worker id in their connection id, when the kernel can."""
        udps = self.listeners.udp
        if not udps:
            return
        if msquic_engine(self.settings.http3.engine):
            if len(udps) > 1 or self.listeners.systemd or self.settings.server.fds:
                # Not for inherited sockets: their first owner keeps the address bound.
                raise ValueError(
                    "http3.engine: MsQuic binds its own UDP socket, so it serves HTTP/3 on "
                    "one address fpy3 binds itself; with several addresses or inherited "
                    'UDP sockets set http3.engine = "ngtcp2"'
                )
            udp = udps[0]
            # MsQuic binds its own SO_REUSEPORT socket in each worker: they join the
            # group one worker at a time and the master keeps copies, so their indexes
            # stay put and the program can steer (MsQuicGroup). Without pidfd_getfd
            # the kernel hashes each 4-tuple to a worker.
            addr = udp.getsockname()
            udp.close()
            self.listeners = dataclasses.replace(self.listeners, udp=[], udp_addr=addr)
            if hasattr(os, "pidfd_open"):
                from fpy3.devcert import default_state_dir

                state = self.settings.server.state_dir or default_state_dir()
                try:
                    self.msquic = MsQuicGroup(addr[1], state)
                except OSError as exc:
                    raise ValueError(
                        f"server.state_dir: cannot keep the QUIC port group's files in "
                        f"{state}: {exc.strerror or exc}"
                    ) from None
            else:
                logger.info("HTTP/3 on MsQuic: packets spread over workers by 4-tuple hash")
            return
        slots = min(2 * self.worker_count, MAX_SOCKETS)
        inherited = {s.fileno() for s in udps} if self.listeners.systemd else set()
        for text in self.settings.server.fds:
            inherited.add(int(text.partition(":")[0]))
        try:
            self.quic = QuicGroups.take_over(udps, slots, inherited)
        except SteeringUnavailable as exc:
            logger.warning("%s; HTTP/3 is served by worker 1 only", exc)
            return
        self.listeners = dataclasses.replace(self.listeners, udp=[])

    def _on_join(self, worker: WorkerProcess, quic_id: int) -> None:
        """A worker's MsQuic has bound its socket: keep a copy in the group, steer to it.

        If it cannot be adopted (the worker is gone, no fd left, ...) the worker is
        told no: it closes its HTTP/3 side before it lets the next worker join (its
        socket is the group's last, so that moves no other), and serves on without
        HTTP/3; the other workers take the packets.
        """
        if self.msquic is None or worker.quic_ack is None:
            logger.warning("worker %d asked to join a QUIC port group; there is none", worker.pid)
            return
        try:
            self.msquic.adopt(worker.pid, quic_id)
        except Exception as exc:  # whatever it is, the master must go on
            _log_steering_error(
                f"worker {worker.pid} (number {worker.number}): its QUIC sockets on UDP port "
                f"{self.msquic.port} cannot be adopted, so no HTTP/3 is steered to it "
                f"(worker id {quic_id:#x})",
                exc,
            )
            worker.answer_join(False)
            return
        worker.quic_id = quic_id
        worker.answer_join(True)
        self._steer()

    def _tidy_msquic(self) -> None:
        """Let the sockets of gone MsQuic workers leave the port group where that moves
        no other, and offer the next worker id. A failure is logged once and tried again
        every round."""
        assert self.msquic is not None
        try:
            self.msquic.tidy()
        except Exception as exc:  # whatever it is, the master must go on
            if not self.msquic_id_stale:
                _log_steering_error(
                    f"QUIC port group: no worker id offered in {self.msquic.id_path}, so "
                    "starting workers get no HTTP/3 packets; retrying every round",
                    exc,
                )
            self.msquic_id_stale = True
            return
        if self.msquic_id_stale:
            logger.info("QUIC port group: worker ids offered again")
            self.msquic_id_stale = False

    def _steering_group(self) -> QuicGroups | MsQuicGroup | None:
        return self.quic if self.quic is not None else self.msquic

    def _steer(self) -> None:
        """Point new QUIC connections at the serving generation; keep the rest in place.

        A failure is logged once and tried again every round until it succeeds.
        """
        group = self._steering_group()
        if group is None:
            return
        active = [
            w.quic_id
            for w in self.workers.values()
            if w.generation == self.serving and not w.retiring and w.quic_id is not None
        ]
        try:
            group.steer(active)
        except Exception as exc:  # whatever it is, the master must go on
            if not self.steering_stale:  # once, not every round
                _log_steering_error(
                    f"QUIC steering not updated for {len(active)} active worker(s); "
                    "retrying every round",
                    exc,
                )
            self.steering_stale = True
            return
        if self.steering_stale:
            logger.info("QUIC steering updated again (%d active worker(s))", len(active))
            self.steering_stale = False

    # -- reload and stop ---------------------------------------------------------------------

    def _reload(self) -> None:
        if self.stopping:
            return
        self.reloading = True
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\nSTATUS=reloading")
        try:
            settings = config.load(
                self.args.config, overrides=config.overrides_from_args(self.args)
            )
        except config.ConfigError as exc:
            self._refuse_reload(f"reload refused, keeping the running workers: {exc}")
            return
        old = self.settings

        def bound(s: config.Settings) -> tuple:
            server = s.server
            return (
                s.bind_hosts,
                server.port,
                server.http_port,
                server.uds,
                server.fds,
                s.http3.enabled,
                s.udp_port,
                s.metrics.port,
                s.metrics.host,
            )

        if bound(settings) != bound(old):
            # The sockets were bound once, before the first fork.
            self._refuse_reload(
                "reload refused: server.host/hosts/port/http_port/uds/fds, http3.enabled/port "
                "and metrics.host/port changes need a restart"
            )
            return
        try:
            from fpy3.tls import server_context, with_certificate

            settings = with_certificate(settings)
            server_context(settings)
        except (OSError, ValueError) as exc:
            self._refuse_reload(f"reload refused, keeping the running workers: tls.cert: {exc}")
            return
        try:
            ids = resolve_ids(settings)
        except ValueError as exc:
            self._refuse_reload(f"reload refused, keeping the running workers: {exc}")
            return
        try:
            configure_error_log(settings.logging, settings.server.debug)
        except config.ConfigError as exc:
            configure_error_log(self.settings.logging, self.settings.server.debug)
            self._refuse_reload(f"reload refused, keeping the running workers: {exc}")
            return
        self.previous, self.previous_count = self.settings, self.worker_count
        self.settings = settings
        self._watch_tls()
        if settings.acme != self.previous.acme:
            if self.acme is not None:
                self.acme.stop()
            self.acme = AcmeManager(settings, self._acme_done) if settings.acme.enabled else None
        self.ids = ids
        self.worker_count = worker_count(settings, self.default_workers)
        self.generation += 1
        logger.info("reloading: starting generation %d", self.generation)
        self._spawn_generation()

    def _refuse_reload(self, message: str) -> None:
        logger.error("%s", message)
        self._count_reload("refused")
        self.reloading = False
        sd_notify(f"READY=1\nSTATUS={self._status()}; last reload refused")

    def _rollback(self) -> bool:
        """A new generation failed to start: keep the one that is serving."""
        serving = [w for w in self.workers.values() if w.generation < self.generation and w.ready]
        if not serving or self.previous is None:
            return False
        failed = self.generation
        self.generation = max(w.generation for w in serving)
        self.settings = self.previous
        self.previous = None
        self.worker_count = self.previous_count
        logger.error(
            "generation %d failed to start; generation %d keeps serving", failed, self.generation
        )
        self._count_reload("failed")
        for w in list(self.workers.values()):
            if w.generation == failed:
                w.retiring = True
                self._signal(w.pid, signal.SIGQUIT)
        if self.reloading:
            self.reloading = False
            sd_notify(f"READY=1\nSTATUS={self._status()}; last reload failed")
        return True

    def _stop(self, how: str) -> None:
        if self.stopping == "fast" or self.stopping == how:
            return
        self.stopping = how
        delay = self.settings.health.drain_delay if how == "graceful" else 0.0
        grace = self.settings.workers.drain_timeout + 5.0 if how == "graceful" else 5.0
        self.stop_deadline = time.monotonic() + delay + grace
        logger.info("master %d: %s stop", os.getpid(), how)
        sd_notify(f"STOPPING=1\nSTATUS={how} stop")
        if delay:
            # Readiness fails first; everything else is served as usual until the drain.
            logger.info("master %d: draining in %gs", os.getpid(), delay)
            self.drain_at = time.monotonic() + delay
            self._kill_all(signal.SIGWINCH)
            return
        self._begin_drain(signal.SIGTERM if how == "graceful" else signal.SIGQUIT)

    def _begin_drain(self, sig: int) -> None:
        self.drain_at = 0.0
        # Workers close their copies as they drain; with ours closed too, new
        # connections are refused instead of waiting in a backlog nobody accepts.
        self.listeners.close()
        self._kill_all(sig)

    def _kill_all(self, sig: int) -> None:
        for pid in list(self.workers):
            self._signal(pid, sig)

    def _signal(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise


def _log_steering_error(what: str, exc: Exception) -> None:
    # An OSError is the system's answer (EMFILE, a process or socket gone): its message
    # says it all. Anything else is a bug: keep the traceback.
    if isinstance(exc, OSError):
        logger.error("%s: %s", what, exc)
    else:
        logger.error("%s: %r", what, exc, exc_info=exc)


def worker_rss_mb(pids: list[int]) -> dict[int, float]:
    import psutil

    rss = {}
    for pid in pids:
        try:
            rss[pid] = psutil.Process(pid).memory_info().rss / (1 << 20)
        except psutil.Error:
            pass
    return rss


def worker_count(settings: config.Settings, default: int = 0) -> int:
    """workers.count; 0 means ``default``, and a default of 0 one worker per CPU."""
    return settings.workers.count or default or os.cpu_count() or 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fpy3-master", description="fpy3 master process")
    parser.add_argument("--version", action="version", version=f"fpy3 {__version__}")
    config.add_arguments(parser)
    args = parser.parse_args(argv)
    settings = load_settings(args)
    configure_logging(settings)
    settings, listeners = prepare(settings)
    sys.exit(Arbiter(args, settings, listeners).run())


if __name__ == "__main__":
    main()
