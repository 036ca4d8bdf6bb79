"""TLS-aware clients for the session, 0-RTT and client-certificate tests: aioquic with a
session ticket (and early data), gtlsclient with its session and transport-parameter
files, and Python's ssl over TCP with a saved session."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass, field

import h3clients
from h3clients import ClientUnavailable, H3ClientError, Response


@dataclass
class QuicResult:
    responses: list[Response] = field(default_factory=list)
    ticket: object = None  # aioquic SessionTicket for the next connection
    resumed: bool = False
    early_accepted: bool = False


def aioquic_session(
    host: str,
    port: int,
    requests: list[tuple[str, str, bytes]],
    cafile: str | None = None,
    ticket=None,
    early: bool = False,
    certfile: str | None = None,
    keyfile: str | None = None,
    server_name: str | None = None,
    timeout: float = 10,
) -> QuicResult:
    """One QUIC connection sending ``requests``; with ``ticket`` it resumes, and with
    ``early`` the requests go out before the handshake completes (0-RTT)."""
    aq = h3clients._aioquic()
    import ssl as _ssl

    config = aq.QuicConfiguration(
        is_client=True,
        alpn_protocols=aq.H3_ALPN,
        idle_timeout=timeout,
        verify_mode=_ssl.CERT_REQUIRED if cafile else _ssl.CERT_NONE,
    )
    if cafile:
        config.load_verify_locations(cafile)
    if certfile:
        config.load_cert_chain(certfile, keyfile)
    config.server_name = server_name or host
    config.session_ticket = ticket
    result = QuicResult()
    tickets: list = []
    authority = f"{host}:{port}"

    async def go():
        from aioquic.asyncio import connect

        async with connect(
            host,
            port,
            configuration=config,
            create_protocol=h3clients._h3_protocol_class(),
            session_ticket_handler=tickets.append,
            wait_connected=not early,
        ) as proto:
            sent = [
                await h3clients._send_request(proto, m, p, authority, (), b) for m, p, b in requests
            ]
            for ex in sent:
                result.responses.append(await h3clients._finish(proto, ex))
            for _ in range(200):  # the ticket follows the handshake; give it a moment
                if tickets:
                    break
                await asyncio.sleep(0.01)
            tls = proto._quic.tls
            result.resumed = bool(tls.session_resumed)
            result.early_accepted = bool(tls.early_data_accepted)
            proto.close(error_code=h3clients.H3_NO_ERROR)
        result.ticket = tickets[-1] if tickets else None
        return result

    try:
        return h3clients._run(go, timeout, f"aioquic session to {authority}")
    except ConnectionError as exc:
        raise H3ClientError(f"QUIC connection to {authority} failed: {exc!r}") from exc


def gtlsclient_session(
    host: str,
    port: int,
    path: str,
    state_dir: str,
    method: str = "GET",
    body_file: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    timeout: float = 10,
) -> tuple[int, bytes, str]:
    """One request with gtlsclient, keeping its TLS session and transport parameters
    in ``state_dir`` (so the next call resumes and sends its request in 0-RTT).
    Returns (status, body, log)."""
    exe = shutil.which("gtlsclient")
    if exe is None:
        raise ClientUnavailable("gtlsclient not found (Debian: ngtcp2-client)")
    download = os.path.join(state_dir, "download")
    shutil.rmtree(download, ignore_errors=True)
    os.makedirs(download)
    cmd = [
        exe,
        "--exit-on-all-streams-close",
        "--wait-for-ticket",
        f"--session-file={os.path.join(state_dir, 'session')}",
        f"--tp-file={os.path.join(state_dir, 'tp')}",
        f"--download={download}",
        f"--timeout={int(timeout)}s",
        "-m",
        method,
    ]
    if body_file:
        cmd += ["-d", body_file]
    if certfile:
        cmd += [f"--cert={certfile}", f"--key={keyfile}"]
    cmd += [host, str(port), f"https://{host}:{port}{path}"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, errors="replace", timeout=timeout + 5, check=False
    )
    log = proc.stdout + proc.stderr
    status = 0
    for line in log.splitlines():
        if line.startswith("http: stream 0x0 [:status: "):
            status = int(line.rsplit(" ", 1)[-1].rstrip("]"))
    files = os.listdir(download)
    body = b""
    if files:
        with open(os.path.join(download, files[0]), "rb") as f:
            body = f.read()
    return status, body, log


def tcp_request(
    host: str,
    port: int,
    path: str,
    context: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    server_name: str | None = None,
    timeout: float = 10,
) -> tuple[bytes, ssl.SSLSession | None, bool, bytes]:
    """GET over TLS on a new connection: (body, session for the next one, whether this
    one resumed, the server's certificate in DER)."""
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=server_name or host, session=session) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
            # TLS 1.3 tickets arrive after the handshake: read above, so they are in.
            return body, sock.session, sock.session_reused, sock.getpeercert(binary_form=True)
