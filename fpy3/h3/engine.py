"""Which QUIC engine serves HTTP/3: ngtcp2 (built in) or MsQuic (libmsquic.so.2,
loaded at run time: the FPY3_MSQUIC_LIB path first, then the system loader)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select

from ..msquic import INSTALL_HINT

logger = logging.getLogger("fpy3.error")


def choose(name: str) -> int:
    """The engine for ``http3.engine`` (auto | msquic | ngtcp2) in this worker."""
    from fpy3._native import ffi, lib

    if name == "ngtcp2":
        logger.info("HTTP/3 engine: ngtcp2")
        return lib.FPY3_ENGINE_NGTCP2
    err = ffi.new("char[]", 512)
    if lib.fpy3_msquic_load(err, 512) == 0:
        logger.info("HTTP/3 engine: msquic")
        return lib.FPY3_ENGINE_MSQUIC
    reason = ffi.string(err).decode(errors="replace")
    if name == "msquic":
        raise OSError(
            f"http3.engine = msquic: libmsquic cannot be loaded ({reason}); {INSTALL_HINT}"
        )
    logger.info("HTTP/3 engine: ngtcp2 (libmsquic not loaded: %s)", reason)
    return lib.FPY3_ENGINE_NGTCP2


def udp_inodes(port: int) -> set[str]:
    """Inodes of the UDP sockets bound to ``port`` (any address), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if len(parts) > 9 and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(parts[9])
    return inodes


class GroupJoin:
    """A worker joining the master's steered MsQuic port group (MsQuicGroup in
    fpy3/supervisor/steering/msquic_group.py): under the master's lock, it takes the
    worker id the master offers (its socket's place in the group), binds, and asks the
    master to adopt the socket."""

    def __init__(self, lock_path: str, id_path: str, ack_fd: int) -> None:
        self._lock = open(lock_path, "a")  # noqa: SIM115 (held across join() and done())
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # other workers join one at a time
        self.ack_fd = ack_fd
        try:
            with open(id_path) as f:
                self.worker_id = int(f.read())
        except (OSError, ValueError) as exc:
            self.close()
            raise OSError(f"HTTP/3: no worker id from the master ({id_path}: {exc})") from None

    def done(self, send, timeout: float = 10.0) -> bool:
        """Ask the master to adopt our socket (``send`` writes a line to it) and wait for
        its answer. The lock stays held: see ``close``."""
        send(b"quic %d\n" % self.worker_id)
        poller = select.poll()  # not select(): the fd may be past FD_SETSIZE
        poller.register(self.ack_fd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            return False
        return os.read(self.ack_fd, 1) == b"1"

    def close(self) -> None:
        """Let the next worker join. A socket the master did not adopt must be closed
        first: it is the group's last, so closing it then moves no other socket."""
        if not self._lock.closed:
            self._lock.close()  # releases the lock
