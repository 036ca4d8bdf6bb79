"""systemd's notify protocol, for ``Type=notify`` services: READY=1, RELOADING=1,
STOPPING=1, STATUS=, MAINPID=."""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger("fpy3.error")


def sd_notify(state: str) -> None:
    """Send a datagram to systemd's NOTIFY_SOCKET, when it is set ('@' = abstract)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        return  # vsock addresses are for VMs; not supported
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        logger.warning("sd_notify to %s failed: %s", os.environ["NOTIFY_SOCKET"], exc)
