"""A private network namespace for a test that must bind a fixed port (the README's
program binds 0.0.0.0:8080 as written): nothing else on the machine can hold that port
there, and nothing the test binds collides with anyone.

``private_network()`` moves the calling thread into a fresh namespace with loopback up
(``unshare(CLONE_NEWNET)``, as ``bench/run.py`` does for its rows) and back at the end.
The processes it starts and the clients it runs meanwhile (sockets, libcurl, aioquic
in this thread, subprocesses forked from it) live there too. It needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Iterator


def loopback_up() -> None:
    """ip link set lo up, without needing iproute2."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, siocgifflags, req)[:18])[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


@contextlib.contextmanager
def private_network() -> Iterator[str | None]:
    """Yields None inside a fresh namespace, or why there is none (staying put)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            os.unshare(os.CLONE_NEWNET)
        except OSError as exc:
            yield f"no private network namespace: unshare(CLONE_NEWNET): {exc.strerror}"
            return
        try:
            loopback_up()
            yield None
        finally:
            os.setns(home, os.CLONE_NEWNET)
    finally:
        os.close(home)
