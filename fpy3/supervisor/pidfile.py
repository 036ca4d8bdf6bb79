"""``server.pidfile``: the master's pid, written once its sockets are bound."""

from __future__ import annotations

import contextlib
import os


class Pidfile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = 0  # the pid written, once written

    def create(self) -> None:
        """Write this process's pid; raises OSError naming server.pidfile."""
        pid = os.getpid()
        tmp = f"{self.path}.{pid}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(f"{pid}\n")
            os.replace(tmp, self.path)  # readers never see a partial file
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise OSError(f"server.pidfile: cannot write {self.path}: {exc.strerror}") from None
        self.pid = pid

    def remove(self) -> None:
        """Unlink the file if it still holds our pid: a newer master may have taken the
        path over."""
        if not self.pid:
            return
        try:
            with open(self.path) as f:
                mine = f.read().strip() == str(self.pid)
            if mine:
                os.unlink(self.path)
        except OSError:
            pass
