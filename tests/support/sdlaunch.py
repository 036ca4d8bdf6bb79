"""Starts a command with listening sockets it inherits, as systemd socket activation
or a parent passing ``--fd`` would: binds them, then execs (the pid stays the same,
so LISTEN_PID names the command).

    python sdlaunch.py MODE SOCKET... -- COMMAND...

MODE is ``systemd`` (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, fds from 3 on) or ``fd``
(``--fd N[:KIND]`` appended to COMMAND). SOCKET is ``tcp:HOST:PORT[:NAME]``,
``udp:HOST:PORT[:NAME]`` (with SO_REUSEPORT, as systemd's ReusePort=yes),
``udp-plain:HOST:PORT[:NAME]`` (without) or ``unix:PATH[:NAME]``.
"""

from __future__ import annotations

import os
import socket
import sys


def bind(spec: str) -> tuple[socket.socket, str]:
    kind, _, rest = spec.partition(":")
    if kind == "unix":
        path, _, name = rest.partition(":")
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(128)
        return sock, name
    host, port, *name = rest.rsplit(":", 2) if rest.count(":") >= 2 else [*rest.split(":"), ""]
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if kind == "tcp":
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(128)
    else:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if kind == "udp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
    return sock, name[0] if name else ""


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--")
    mode, specs, command = args[0], args[1:split], args[split + 1 :]
    socks = [bind(spec) for spec in specs]
    fds = []
    for i, (sock, name) in enumerate(socks):
        fd = 3 + i if mode == "systemd" else sock.fileno()
        if fd != sock.fileno():
            os.dup2(sock.fileno(), fd)
        os.set_inheritable(fd, True)
        fds.append((fd, name))
    if mode == "systemd":
        os.environ["LISTEN_FDS"] = str(len(fds))
        os.environ["LISTEN_PID"] = str(os.getpid())
        os.environ["LISTEN_FDNAMES"] = ":".join(name for _, name in fds)
    else:
        for fd, name in fds:
            command += ["--fd", f"{fd}:{name}" if name else str(fd)]
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
