"""TLS for the TCP port (HTTP/2 and HTTP/1.1): the server SSLContext and its certificate."""

from __future__ import annotations

import dataclasses
import logging
import ssl

from .config import Settings

logger = logging.getLogger("fpy3.error")

# What TLS connections may negotiate (ALPN), most preferred first. HTTP/3 is not here:
# it is announced with Alt-Svc.
# How logs name the protocols ALPN offers.
PROTOCOL_NAMES = {"http/1.1": "HTTP/1.1", "h2": "HTTP/2"}


def alpn_protocols(settings: Settings) -> list[str]:
    """What the TLS port offers in ALPN: HTTP/2 first when enabled, then HTTP/1.1
    (HTTP/3 is announced with Alt-Svc)."""
    return ["h2", "http/1.1"] if settings.http2.enabled else ["http/1.1"]


def tls_protocols(settings: Settings) -> str:
    """The protocols served over TLS, for logs: "HTTP/2, HTTP/1.1"."""
    return ", ".join(PROTOCOL_NAMES.get(p, p) for p in alpn_protocols(settings))


def with_certificate(settings: Settings) -> Settings:
    """Settings whose tls.cert/key point at real files, making the dev cert if allowed."""
    tls = settings.tls
    if tls.cert and tls.key:
        return settings
    from . import devcert

    state_dir = settings.server.state_dir or devcert.default_state_dir()
    cert, key = devcert.ensure_dev_cert(state_dir)
    logger.info(
        "TLS: no tls.cert given: using the development certificate %s (self-signed for "
        "localhost, 127.0.0.1 and ::1). To trust it, give clients that file as their CA "
        "(curl --cacert %s, or curl -k to skip checks; Chromium: "
        "--ignore-certificate-errors-spki-list=%s)",
        cert,
        cert,
        devcert.spki_sha256_b64(cert),
    )
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
    ctx.set_alpn_protocols(alpn_protocols(settings))
    return ctx
