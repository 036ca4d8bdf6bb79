"""The built-in ACME client (RFC 8555), in a thread of the master.

It keeps ``server.state_dir/acme/cert.pem`` and ``key.pem`` (fpy3.certs) valid for
``acme.domains``: it orders a certificate when there is none (the workers serve a
self-signed placeholder meanwhile), when the names changed, and from two thirds of the
current one's lifetime on. Challenges are answered by the workers from files: http-01
on the cleartext port, tls-alpn-01 (RFC 8737) on the TLS port, so it works behind a
TCP passthrough proxy too. A new certificate is checked, written, and the master told
(``on_new_cert``), which has every worker load it (arbiter.py). A failure is logged
with the CA's reason; the current certificate keeps serving and the order is tried
again after ``acme.retry_interval`` seconds, doubled on each failure up to a day.

The protocol (JWS, nonces, account, order, polling) is certbot's ``acme`` library.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable

from fpy3 import __version__, certs
from fpy3.config import Settings

logger = logging.getLogger("fpy3.error")

RENEW_AT = 2 / 3  # of the lifetime
MAX_BACKOFF = 86400.0
ORDER_TIMEOUT = 120.0  # seconds for validation and issuance
ACME_IDENTIFIER_OID = "1.3.6.1.5.5.7.1.31"  # id-pe-acmeIdentifier (RFC 8737)


class AcmeManager:
    def __init__(self, settings: Settings, on_new_cert: Callable[[], None]):
        self.settings = settings
        self.acme = settings.acme
        self.state_dir = settings.state_path
        self.on_new_cert = on_new_cert
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.failures = 0
        self.thread = threading.Thread(target=self._run, name="fpy3-acme", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()

    # -- when ------------------------------------------------------------------------------

    def seconds_to_renewal(self) -> float:
        """0 when a certificate must be ordered now, else seconds until that time."""
        from cryptography import x509

        cert_path, _ = certs.acme_cert_paths(self.state_dir)
        try:
            with open(cert_path, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
        except (OSError, ValueError):
            return 0.0
        if cert.issuer == cert.subject:
            return 0.0  # the placeholder
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = set(san.value.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            names = set()
        if names != {d.lower() for d in self.acme.domains}:
            return 0.0
        start = cert.not_valid_before_utc.timestamp()
        end = cert.not_valid_after_utc.timestamp()
        renew = start + (end - start) * RENEW_AT
        now = datetime.datetime.now(datetime.UTC).timestamp()
        return max(0.0, renew - now)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            wait = self.seconds_to_renewal()
            if wait > 0:
                self.wake.wait(min(wait, 3600.0))
                self.wake.clear()
                continue
            try:
                self.issue()
            except Exception as exc:  # whatever failed, the current certificate stays
                self.failures += 1
                delay = min(self.acme.retry_interval * 2 ** (self.failures - 1), MAX_BACKOFF)
                logger.error(
                    "ACME: no certificate for %s from %s: %s; the current certificate keeps "
                    "serving, next attempt in %g s",
                    ", ".join(self.acme.domains),
                    self.acme.directory_url,
                    _reason(exc),
                    delay,
                    exc_info=exc if logger.isEnabledFor(logging.DEBUG) else None,
                )
                self.stop_event.wait(delay)
                continue
            self.failures = 0
            self.on_new_cert()

    # -- how -------------------------------------------------------------------------------

    def _account_key(self):
        import josepy
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        path = os.path.join(certs.acme_dir(self.state_dir), "account.key")
        try:
            with open(path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            certs.write_atomic(path, pem, 0o600)
            logger.info("ACME: made a new account key %s", path)
        return josepy.JWKEC(key=key)

    def _client(self, jwk):
        import josepy
        from acme import client, errors, messages

        net = client.ClientNetwork(jwk, alg=josepy.ES256, user_agent=f"fpy3/{__version__}")
        if self.acme.ca_bundle:  # requests takes a CA file where it takes True
            net.verify_ssl = self.acme.ca_bundle  # type: ignore[assignment]
        directory = client.ClientV2.get_directory(self.acme.directory_url, net)
        acme = client.ClientV2(directory, net)
        contact = (f"mailto:{self.acme.email}",) if self.acme.email else ()
        registration = messages.NewRegistration(contact=contact, terms_of_service_agreed=True)
        try:
            account = acme.new_account(registration)
        except errors.ConflictError as exc:  # the key has an account already
            account = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
            net.account = account
        path = os.path.join(certs.acme_dir(self.state_dir), "account.json")
        certs.write_atomic(path, json.dumps({"uri": account.uri}).encode(), 0o600)
        return acme

    def issue(self) -> None:
        """Order, validate and install one certificate; raises on any failure."""
        from acme import challenges, crypto_util
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        domains = list(self.acme.domains)
        logger.info("ACME: ordering a certificate for %s", ", ".join(domains))
        jwk = self._account_key()
        acme = self._client(jwk)
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        order = acme.new_order(crypto_util.make_csr(key_pem, domains))
        placed: list[str] = []
        try:
            for authz in order.authorizations:
                if authz.body.status.name == "valid":
                    continue
                challb = self._answer(authz, jwk, placed)
                acme.answer_challenge(challb, challenges.HTTP01Response())
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
            order = acme.poll_and_finalize(order, deadline)
        finally:
            for path in placed:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        self._install(order.fullchain_pem.encode(), key_pem)

    def _answer(self, authz, jwk, placed: list[str]):
        """Leave the answer to our challenge type where the workers find it."""
        import josepy

        kind = self.acme.challenge
        name = authz.body.identifier.value
        for challb in authz.body.challenges:
            if _kind(challb) != kind:
                continue
            token = (
                challb.chall.jobj["token"]
                if kind == "tls-alpn-01"
                else challb.chall.encode("token")
            )
            key_auth = f"{token}.{josepy.b64encode(jwk.thumbprint()).decode()}"
            if kind == "http-01":
                path = certs.http01_path(self.state_dir, token)
                certs.write_atomic(path, key_auth.encode(), 0o644)
            else:
                path = certs.tls_alpn01_path(self.state_dir, name)
                certs.write_atomic(path, _validation_cert(name, key_auth), 0o600)
            placed.append(path)
            return challb
        offered = ", ".join(_kind(c) for c in authz.body.challenges)
        raise RuntimeError(f"the CA offers no {kind} challenge for {name} (only {offered})")

    def _install(self, fullchain: bytes, key_pem: bytes) -> None:
        import ssl
        import tempfile

        # Check the pair loads before it replaces the one serving.
        with tempfile.NamedTemporaryFile() as c, tempfile.NamedTemporaryFile() as k:
            c.write(fullchain)
            k.write(key_pem)
            c.flush()
            k.flush()
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(c.name, k.name)
        cert_path, key_path = certs.acme_cert_paths(self.state_dir)
        certs.write_atomic(key_path, key_pem, 0o600)
        certs.write_atomic(cert_path, fullchain, 0o644)
        logger.info("ACME: new certificate for %s in %s", ", ".join(self.acme.domains), cert_path)


def _kind(challb) -> str:
    """A challenge's type; the library no longer models tls-alpn-01, so it comes back
    as an unrecognized challenge, with its JSON."""
    jobj = getattr(challb.chall, "jobj", None)
    return str(jobj.get("type")) if jobj else str(challb.chall.typ)


def _validation_cert(name: str, key_auth: str) -> bytes:
    """The tls-alpn-01 certificate for ``name``, with its key (RFC 8737 3)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_auth.encode()).digest()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            # The extension's value is the DER OCTET STRING of the digest.
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier(ACME_IDENTIFIER_OID), b"\x04\x20" + digest
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _reason(exc: Exception) -> str:
    """The CA's words when it gave any (an ACME problem document), else the error."""
    failed = getattr(exc, "failed_authzrs", None)
    if failed:
        words = []
        for authz in failed:
            for challb in authz.body.challenges:
                if challb.error is not None:
                    words.append(f"{authz.body.identifier.value}: {_reason(challb.error)}")
        if words:
            return "; ".join(words)
    detail = getattr(exc, "detail", None)
    typ = getattr(exc, "typ", None)
    if detail or typ:
        return f"{typ or 'error'}: {detail or ''}".strip()
    return f"{type(exc).__name__}: {exc}"
