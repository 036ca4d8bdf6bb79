"""TLS for the TCP port (HTTP/2 and HTTP/1.1): the server SSLContext and its certificate."""

from __future__ import annotations

import dataclasses
import ssl

from .config import Settings


def with_certificate(settings: Settings) -> Settings:
    """Settings whose tls.cert/key point at real files, making the dev cert if allowed."""
    tls = settings.tls
    if tls.cert and tls.key:
        return settings
    from . import devcert

    state_dir = settings.server.state_dir or devcert.default_state_dir()
    cert, key = devcert.ensure_dev_cert(state_dir)
    return dataclasses.replace(settings, tls=dataclasses.replace(tls, cert=cert, key=key))


def server_context(settings: Settings) -> ssl.SSLContext:
    tls = settings.tls
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    if tls.ciphers:
        ctx.set_ciphers(tls.ciphers)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(tls.cert, tls.key)
    # HTTP/2 first when enabled, else HTTP/1.1 alone; HTTP/3 is announced with Alt-Svc.
    ctx.set_alpn_protocols(["h2", "http/1.1"] if settings.http2.enabled else ["http/1.1"])
    return ctx
