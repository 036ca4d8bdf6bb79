"""``--reload`` (``reload.enabled``): watch the app's files and reload on a change.

Development only: a thread waits on watchfiles and queues a HUP for the master's
loop, exactly as if the signal had come from outside."""

from __future__ import annotations

import fnmatch
import logging
import os
import signal
import threading
from collections.abc import Callable

from fpy3 import config

logger = logging.getLogger("fpy3.error")


class FileWatcher:
    def __init__(self, settings: config.Settings, notify: Callable[[int, object], None]):
        """``notify(signum, frame)`` queues a signal for the master's loop."""
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
