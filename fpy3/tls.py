"""TLS over TCP: the server SSLContext, the certificate it uses, and the one place where
that certificate changes for every TCP protocol (``TLSContexts``).

A worker builds one ``TLSContexts``. Its ``listener`` context goes to every TLS
listening socket (HTTP/1.1, HTTP/2): session tickets and the per-handshake hook live
there (``fpy3.ossl``). ``reload()`` builds a context from the files again (after the
master saw them change, or ACME renewed them); new handshakes use it, open connections
keep theirs. A client that offers only ALPN ``acme-tls/1`` gets the tls-alpn-01
validation certificate ACME left in the state dir (``fpy3.certs``).

``tls_extension`` builds the ASGI TLS extension for a connection's scope.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl

from . import certs, ossl
from .config import Settings, TLSSettings
from .keys import SessionKeys

logger = logging.getLogger("fpy3.error")

ACME_TLS_ALPN = b"acme-tls/1"
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}

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
    """Settings whose tls.cert/key point at real files: ACME's (a self-signed
    placeholder until the first issuance), or the dev cert when allowed."""
    tls = settings.tls
    if tls.cert and tls.key:
        return settings
    from . import devcert

    state_dir = settings.state_path
    if settings.acme.enabled:
        cert, key = certs.acme_cert_paths(state_dir)
        if not (os.path.exists(cert) and os.path.exists(key)):
            placeholder = devcert.ensure_dev_cert(state_dir)
            for src, dst in zip(placeholder, (cert, key), strict=True):
                with open(src, "rb") as f:
                    certs.write_atomic(dst, f.read())
            logger.info("ACME: serving a self-signed placeholder until the first certificate")
    else:
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


def key_password(tls: TLSSettings) -> str | None:
    """The passphrase of tls.key: tls.key_password, or the first line of
    tls.key_password_file; None when neither is set."""
    if tls.key_password_file:
        with open(tls.key_password_file, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    return tls.key_password or None


def server_context(settings: Settings) -> ssl.SSLContext:
    """A server context with the certificate files as they are now. Raises OSError or
    ValueError (ssl.SSLError is an OSError) when they cannot be used."""
    tls = settings.tls
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    if tls.ciphers:
        ctx.set_ciphers(tls.ciphers)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(tls.cert, tls.key, password=key_password(tls))
    if tls.client_auth != "none":
        ctx.load_verify_locations(cafile=tls.client_ca)
        ctx.verify_mode = _VERIFY[tls.client_auth]
    if not tls.session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    ctx.set_alpn_protocols(alpn_protocols(settings))
    return ctx


def _challenge_context(path: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(path)
    ctx.set_alpn_protocols([ACME_TLS_ALPN.decode()])
    return ctx


class TLSContexts:
    """The context of a worker's TLS listeners, and the certificate it serves now."""

    def __init__(self, settings: Settings, keys: SessionKeys | None = None):
        self.settings = settings
        self.state_dir = settings.state_path
        self.listener = server_context(settings)
        self.current = self.listener
        # Handshakes under way may still use an older context: keep the last few.
        self.older: list[ssl.SSLContext] = []
        self._challenges: dict[str, tuple[float, ssl.SSLContext]] = {}
        why_not = ossl.available()
        tls = settings.tls
        if keys is not None and tls.session_tickets:
            if why_not is None:
                ossl.set_ticket_keys(self.listener, keys, tls.ticket_lifetime)
            else:
                logger.warning(
                    "TLS over TCP: session tickets are per worker (%s); clients resume "
                    "only on the worker that issued their ticket",
                    why_not,
                )
        if why_not is None:
            ossl.set_context_chooser(self.listener, self._choose)
        else:
            # Without the hook an SNI callback switches certificates; it cannot see ALPN.
            self.listener.sni_callback = self._sni

    def reload(self) -> bool:
        """Build a context from the certificate files again; on failure keep the one
        in use (and log why). True when the new one is in use."""
        try:
            ctx = server_context(self.settings)
        except (OSError, ValueError) as exc:
            logger.error(
                "TLS: keeping the current certificate; %s: %s", self.settings.tls.cert, exc
            )
            return False
        self.older = [*self.older[-3:], self.current]
        self.current = ctx
        logger.info("TLS: now serving the certificate in %s", self.settings.tls.cert)
        return True

    def _choose(self, alpn: list[bytes], server_name) -> ssl.SSLContext | None:
        if alpn == [ACME_TLS_ALPN]:
            return self._challenge(server_name())
        return self.current

    def _sni(self, sslobj, server_name, ctx) -> None:
        if self.current is not self.listener:
            sslobj.context = self.current

    def _challenge(self, name: str | None) -> ssl.SSLContext | None:
        """The tls-alpn-01 context for ``name``, while ACME has a challenge there."""
        path = certs.tls_alpn01_file(self.state_dir, name)
        if path is None:
            return None
        try:
            mtime = os.stat(path).st_mtime
            cached = self._challenges.get(path)
            if cached is None or cached[0] != mtime:
                if len(self._challenges) > 16:
                    self._challenges.clear()
                cached = self._challenges[path] = (mtime, _challenge_context(path))
            return cached[1]
        except (OSError, ValueError) as exc:
            logger.warning("ACME: cannot serve the tls-alpn-01 certificate %s: %s", path, exc)
            return None


# --- the ASGI TLS extension ---------------------------------------------------------------

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
_RDN_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}
_cipher_ids: dict[str, int] = {}


def _cipher_id(name: str) -> int | None:
    if not _cipher_ids:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        _cipher_ids.update({c["name"]: c["id"] & 0xFFFF for c in ctx.get_ciphers()})
    return _cipher_ids.get(name)


def _escape(value: str) -> str:
    out = "".join("\\" + ch if ch in ',+"\\<>;=' else ch for ch in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out


def rfc4514(subject) -> str:
    """A getpeercert() subject as an RFC 4514 string (last RDN first)."""
    rdns = []
    for rdn in reversed(subject):
        rdns.append("+".join(f"{_RDN_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(rdns)


def tls_extension(sslobj) -> dict:
    """``scope["extensions"]["tls"]`` for a TLS connection (ASGI TLS extension).

    A client certificate that does not verify fails the handshake (with
    ``tls.client_auth`` optional too), so ``client_cert_error`` is always None here.
    """
    chain: list[str] = []
    name = None
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if der:
        get_chain = getattr(sslobj, "get_verified_chain", None)  # Python 3.13+
        if get_chain is not None:
            chain = [c.public_bytes() for c in get_chain()]
        else:
            chain = [ssl.DER_cert_to_PEM_cert(der)]
        name = rfc4514(sslobj.getpeercert().get("subject", ()))
    cipher = sslobj.cipher() if sslobj is not None else None
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(sslobj.version()) if sslobj is not None else None,
        "cipher_suite": _cipher_id(cipher[0]) if cipher else None,
    }
