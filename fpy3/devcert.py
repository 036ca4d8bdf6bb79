"""Development certificate: made once per state dir, then reused.

When no certificate is configured in dev, workers call ``ensure_dev_cert``. The pair is
a self-signed ECDSA P-256 leaf for localhost, 127.0.0.1 and ::1 (see native/devcert.c);
clients trust it by using the certificate itself as their CA file.
"""

import base64
import contextlib
import fcntl
import logging
import os
import time

from fpy3._native import ffi, lib

from .certs import write_atomic

CERT_NAME = "dev-cert.pem"
KEY_NAME = "dev-key.pem"
LOCK_NAME = ".dev-cert.lock"

VALID_DAYS = 365
BACKDATE_SECONDS = 3600  # tolerate clients whose clocks run a little behind
RENEW_BEFORE_SECONDS = 7 * 86400
_MAX_PEM = 1 << 20  # anything larger is not ours

log = logging.getLogger("fpy3.error")


class DevCertError(RuntimeError):
    """A GnuTLS call failed while making or reading the development certificate."""


def default_state_dir() -> str:
    from .config import default_state_dir as default

    return default()


def _err(buf) -> str:
    return ffi.string(buf).decode("utf-8", "replace")


def generate_pem(not_before: int, not_after: int) -> tuple[bytes, bytes]:
    """A new (cert_pem, key_pem) valid between the two unix times."""
    cert = ffi.new("char[]", lib.FPY3_DEVCERT_PEM_MAX)
    key = ffi.new("char[]", lib.FPY3_DEVCERT_PEM_MAX)
    cert_len = ffi.new("size_t *", lib.FPY3_DEVCERT_PEM_MAX)
    key_len = ffi.new("size_t *", lib.FPY3_DEVCERT_PEM_MAX)
    err = ffi.new("char[]", 256)
    rc = lib.fpy3_devcert_generate(not_before, not_after, cert, cert_len, key, key_len, err, 256)
    if rc < 0:
        raise DevCertError(f"generating the development certificate: {_err(err)}")
    return ffi.buffer(cert, cert_len[0])[:], ffi.buffer(key, key_len[0])[:]


def check_pem(cert_pem: bytes, key_pem: bytes | None = None) -> tuple[int, int]:
    """(not_before, not_after) of a PEM cert; with key_pem, also check the key is its key."""
    nb = ffi.new("int64_t *")
    na = ffi.new("int64_t *")
    err = ffi.new("char[]", 256)
    key = ffi.NULL if key_pem is None else key_pem
    rc = lib.fpy3_devcert_check(cert_pem, len(cert_pem), key, len(key_pem or b""), nb, na, err, 256)
    if rc < 0:
        raise DevCertError(_err(err))
    return nb[0], na[0]


def spki_sha256(cert_pem: bytes) -> bytes:
    out = ffi.new("unsigned char[32]")
    err = ffi.new("char[]", 256)
    if lib.fpy3_devcert_spki_sha256(cert_pem, len(cert_pem), out, err, 256) < 0:
        raise DevCertError(_err(err))
    return ffi.buffer(out, 32)[:]


def spki_sha256_b64(cert_path: str) -> str:
    """Base64 SHA-256 of the cert's SubjectPublicKeyInfo (Chromium's SPKI pin format)."""
    with open(cert_path, "rb") as f:
        return base64.b64encode(spki_sha256(f.read(_MAX_PEM))).decode("ascii")


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_PEM)
    except FileNotFoundError:
        return None


def _usable(cert_path: str, key_path: str, now: float) -> bool:
    cert, key = _read(cert_path), _read(key_path)
    if cert is None or key is None:
        return False
    try:
        not_before, not_after = check_pem(cert, key)
    except DevCertError as e:
        log.info("development certificate %s is unusable (%s); replacing it", cert_path, e)
        return False
    # A notBefore in the future means the clock moved back: clients would reject it too.
    return not_before <= now and not_after - now > RENEW_BEFORE_SECONDS


def ensure_dev_cert(state_dir: str) -> tuple[str, str]:
    """(cert_path, key_path) of a usable development pair in state_dir, made if needed.

    Several worker processes may call this at once: an flock on state_dir/.dev-cert.lock
    serialises check-and-create, and each file is replaced atomically, so readers that
    skip the lock still see whole files.
    """
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    cert_path = os.path.join(state_dir, CERT_NAME)
    key_path = os.path.join(state_dir, KEY_NAME)
    lock_fd = os.open(
        os.path.join(state_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        now = time.time()
        if _usable(cert_path, key_path, now):
            return cert_path, key_path
        cert, key = generate_pem(int(now) - BACKDATE_SECONDS, int(now) + VALID_DAYS * 86400)
        # Key first: a crash in between leaves a mismatched pair, which check_pem rejects.
        write_atomic(key_path, key, 0o600)
        write_atomic(cert_path, cert, 0o644)
        with contextlib.suppress(OSError):
            dfd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        log.info("generated a development certificate: %s (key %s)", cert_path, key_path)
        return cert_path, key_path
    finally:
        os.close(lock_fd)  # releases the flock
