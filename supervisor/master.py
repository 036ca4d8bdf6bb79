"""``fpy3-master``: binds the sockets, forks the workers and keeps them running.

Signal handlers only queue the signal and wake the loop through a pipe; the
loop in ``Arbiter.run`` does all the work (as gunicorn's arbiter does).

- TERM: graceful stop (workers drain up to ``workers.drain_timeout``), exit 0.
- INT, QUIT: fast stop.
- HUP: reload: re-read the config; if valid, start a new generation of workers and
  drain the old one once the new one is ready; if not, log and keep serving.
- CHLD: reap; a worker that dies is replaced, with backoff. A worker that fails to
  start the app (exit 3) before any worker was ever ready stops the master.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fnmatch
import logging
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from setproctitle import setproctitle

from fpy3 import __version__, config
from fpy3.cli import load_settings, prepare
from fpy3.logs import configure_error_log
from fpy3.worker import EXIT_STARTUP

logger = logging.getLogger("fpy3.error")

HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGCHLD,
)


@dataclass
class WorkerProcess:
    pid: int
    number: int
    generation: int
    pipe: int  # read end: the worker writes "ready\n"
    ready: bool = False
    started: float = field(default_factory=time.monotonic)


class Arbiter:
    def __init__(self, args: argparse.Namespace, settings: config.Settings, listeners):
        self.args = args
        self.settings = settings
        self.listeners = listeners
        self.workers: dict[int, WorkerProcess] = {}
        self.generation = 1
        self.signals: list[int] = []
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stopping: str | None = None  # "graceful" | "fast"
        self.stop_deadline = 0.0
        self.ever_ready = False
        self.crashes: list[float] = []
        self.exit_code = 0
        self.previous: config.Settings | None = None  # the generation a reload replaces
        self.quic_secret = os.urandom(32)  # stateless-reset key shared by every worker
        self.watcher: FileWatcher | None = None

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
        self._install_signals()
        logger.info(
            "fpy3 %s master %d starting %d worker(s)",
            __version__,
            os.getpid(),
            self.settings.workers.count,
        )
        self._spawn_generation()
        if self.settings.reload.enabled:
            self.watcher = FileWatcher(self.settings, self._on_signal)
        while True:
            self._wait(1.0)
            while self.signals:
                self._handle_signal(self.signals.pop(0))
            self._reap()
            if self.stopping:
                if not self.workers:
                    break
                if time.monotonic() > self.stop_deadline:
                    self._kill_all(signal.SIGKILL)
            else:
                self._maintain()
        if self.watcher is not None:
            self.watcher.stop()
        self.listeners.close()
        logger.info("master %d exiting", os.getpid())
        return self.exit_code

    def _wait(self, timeout: float) -> None:
        fds = [self.wake_r] + [w.pipe for w in self.workers.values() if not w.ready]
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        for fd in readable:
            if fd == self.wake_r:
                try:
                    while os.read(self.wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                self._read_worker_pipe(fd)

    def _read_worker_pipe(self, fd: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        for worker in self.workers.values():
            if worker.pipe == fd and data.startswith(b"ready"):
                worker.ready = True
                self.ever_ready = True
                self._on_worker_ready(worker)

    def _handle_signal(self, sig: int) -> None:
        if sig == signal.SIGCHLD:
            return  # reaping happens every round
        if sig == signal.SIGHUP:
            self._reload()
        elif sig == signal.SIGTERM:
            self._stop("graceful")
        elif sig in (signal.SIGINT, signal.SIGQUIT):
            self._stop("fast")

    # -- workers ------------------------------------------------------------------------------

    def _spawn_generation(self) -> None:
        for number in range(1, self.settings.workers.count + 1):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            self._worker_main(number, write_fd)  # never returns
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.workers[pid] = WorkerProcess(pid, number, self.generation, read_fd)

    def _worker_main(self, number: int, ready_fd: int) -> None:
        code = 1
        try:
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            os.close(self.wake_r)
            os.close(self.wake_w)
            setproctitle(f"fpy3: worker {number} gen {self.generation}")
            from fpy3 import worker

            listeners = self.listeners
            if number != 1 and listeners.udp is not None:
                # Several processes reading one UDP socket would split QUIC connections
                # between them, so one worker serves HTTP/3 until packets are steered by
                # connection id.
                listeners = dataclasses.replace(listeners, udp=None)
            code = worker.run(self.settings, listeners, ready_fd, number, self.quic_secret)
        except BaseException:
            logger.exception("worker %d crashed", os.getpid())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

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
            os.close(worker.pipe)
            code = os.waitstatus_to_exitcode(status)
            if self.stopping or worker.generation != self.generation:
                logger.info("worker %d exited (%d)", pid, code)
                continue
            if code == EXIT_STARTUP and not worker.ready:
                if self._rollback():
                    continue
                if not self.ever_ready:
                    logger.error("worker %d could not start the app; stopping", pid)
                    self.exit_code = EXIT_STARTUP
                    self._stop("fast")
                    continue
            how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            logger.error("worker %d (number %d) %s; replacing it", pid, worker.number, how)
            self.crashes.append(time.monotonic())

    def _maintain(self) -> None:
        """Keep the current generation at full strength, backing off on a crash loop."""
        now = time.monotonic()
        self.crashes = [t for t in self.crashes if now - t < 60]
        if len(self.crashes) >= 10:
            logger.error("workers crashed %d times in a minute; stopping", len(self.crashes))
            self.exit_code = 1
            self._stop("fast")
            return
        if self.crashes and now - self.crashes[-1] < min(2 ** len(self.crashes) * 0.1, 5.0):
            return  # backoff
        running = {w.number for w in self.workers.values() if w.generation == self.generation}
        for number in range(1, self.settings.workers.count + 1):
            if number not in running:
                self._spawn(number)

    def _on_worker_ready(self, worker: WorkerProcess) -> None:
        if worker.generation != self.generation:
            return
        current = [w for w in self.workers.values() if w.generation == self.generation]
        if len(current) >= self.settings.workers.count and all(w.ready for w in current):
            old = [w for w in self.workers.values() if w.generation != self.generation]
            if old:
                logger.info(
                    "generation %d ready; draining %d old worker(s)", self.generation, len(old)
                )
            for w in old:
                self._signal(w.pid, signal.SIGTERM)

    # -- reload and stop ---------------------------------------------------------------------

    def _reload(self) -> None:
        try:
            settings = config.load(
                self.args.config, overrides=config.overrides_from_args(self.args)
            )
        except config.ConfigError as exc:
            logger.error("reload refused, keeping the running workers: %s", exc)
            return
        old = self.settings
        if (settings.server.host, settings.server.port, settings.server.http_port) != (
            old.server.host,
            old.server.port,
            old.server.http_port,
        ):
            logger.error("reload refused: server.host/port/http_port changes need a restart")
            return
        try:
            from fpy3.tls import server_context, with_certificate

            settings = with_certificate(settings)
            server_context(settings)
        except (OSError, ValueError) as exc:
            logger.error("reload refused, keeping the running workers: tls.cert: %s", exc)
            return
        configure_error_log(settings.logging, settings.server.debug)
        self.previous = self.settings
        self.settings = settings
        self.generation += 1
        logger.info("reloading: starting generation %d", self.generation)
        self._spawn_generation()

    def _rollback(self) -> bool:
        """A new generation failed to start: keep the one that is serving."""
        serving = [w for w in self.workers.values() if w.generation < self.generation and w.ready]
        if not serving or self.previous is None:
            return False
        failed = self.generation
        self.generation = max(w.generation for w in serving)
        self.settings = self.previous
        self.previous = None
        logger.error(
            "generation %d failed to start; generation %d keeps serving", failed, self.generation
        )
        for w in list(self.workers.values()):
            if w.generation == failed:
                self._signal(w.pid, signal.SIGQUIT)
        return True

    def _stop(self, how: str) -> None:
        if self.stopping == "fast" or self.stopping == how:
            return
        self.stopping = how
        grace = self.settings.workers.drain_timeout + 5.0 if how == "graceful" else 5.0
        self.stop_deadline = time.monotonic() + grace
        logger.info("master %d: %s stop", os.getpid(), how)
        self._kill_all(signal.SIGTERM if how == "graceful" else signal.SIGQUIT)

    def _kill_all(self, sig: int) -> None:
        for pid in list(self.workers):
            self._signal(pid, sig)

    def _signal(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise


class FileWatcher:
    """Dev hot reload: a thread waits on watchfiles and queues a HUP for the loop."""

    def __init__(self, settings: config.Settings, notify):
        self.stop_event = threading.Event()
        reload = settings.reload
        paths = list(reload.dirs) or [settings.server.app_dir or os.getcwd()]
        if settings.config_file:
            paths.append(settings.config_file)
        self.paths = [p for p in paths if os.path.exists(p)]
        self.include = reload.include
        self.exclude = reload.exclude
        self.notify = notify
        self.thread = threading.Thread(target=self._run, name="fpy3-reload", daemon=True)
        self.thread.start()
        logger.info("watching %s for changes", ", ".join(self.paths))

    def _wanted(self, change, path: str) -> bool:
        parts = path.split(os.sep)
        if any(fnmatch.fnmatch(p, pat) for p in parts for pat in self.exclude):
            return False
        return any(fnmatch.fnmatch(parts[-1], pat) for pat in self.include)

    def _run(self) -> None:
        import watchfiles

        for changes in watchfiles.watch(
            *self.paths,
            watch_filter=self._wanted,
            stop_event=self.stop_event,
            raise_interrupt=False,
        ):
            names = sorted({os.path.relpath(p) for _, p in changes})
            logger.info("changed: %s; reloading", ", ".join(names[:5]))
            self.notify(signal.SIGHUP, None)

    def stop(self) -> None:
        self.stop_event.set()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fpy3-master", description="fpy3 master process")
    parser.add_argument("--version", action="version", version=f"fpy3 {__version__}")
    config.add_arguments(parser)
    args = parser.parse_args(argv)
    settings = load_settings(args)
    configure_error_log(settings.logging, settings.server.debug)
    settings, listeners = prepare(settings)
    sys.exit(Arbiter(args, settings, listeners).run())


if __name__ == "__main__":
    main()
