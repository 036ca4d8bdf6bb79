"""The files of the built-in ACME client in ``server.state_dir/acme/``, shared by the
master (which writes them) and the workers (which serve them).

- ``cert.pem`` / ``key.pem``: the certificate chain and its key (0600). Before the
  first issuance they hold a self-signed placeholder, so the workers can start.
- ``account.key``, ``account.json``: the ACME account (0600).
- ``http-01/TOKEN``: the key authorization a worker answers on the cleartext port at
  ``/.well-known/acme-challenge/TOKEN``, without calling the app.
- ``tls-alpn-01/NAME.pem``: the validation certificate and key a worker presents to a
  client that offers only ALPN ``acme-tls/1`` for server name NAME (RFC 8737).

Each file is written whole under a temporary name and renamed into place, so a reader
never sees half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile

ACME_DIR = "acme"
HTTP01_PREFIX = b"/.well-known/acme-challenge/"
_TOKEN = re.compile(rb"[A-Za-z0-9_-]{1,256}")
_NAME = re.compile(r"[a-z0-9.*-]{1,253}")


def acme_dir(state_dir: str) -> str:
    return os.path.join(state_dir, ACME_DIR)


def acme_cert_paths(state_dir: str) -> tuple[str, str]:
    d = acme_dir(state_dir)
    return os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".")
    try:
        with open(fd, "wb") as f:
            os.fchmod(fd, mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def http01_path(state_dir: str, token: str) -> str:
    return os.path.join(acme_dir(state_dir), "http-01", token)


def tls_alpn01_path(state_dir: str, name: str) -> str:
    return os.path.join(acme_dir(state_dir), "tls-alpn-01", name.lower() + ".pem")


def http01_answer(state_dir: str, path: bytes) -> bytes | None:
    """The key authorization for a request path under /.well-known/acme-challenge/,
    or None when there is no such challenge."""
    token = path[len(HTTP01_PREFIX) :]
    if not _TOKEN.fullmatch(token):
        return None
    try:
        with open(http01_path(state_dir, token.decode()), "rb") as f:
            return f.read(4096)
    except OSError:
        return None


def tls_alpn01_file(state_dir: str, name: str | None) -> str | None:
    """The validation certificate file for ``name``, when a challenge is pending."""
    if not name or not _NAME.fullmatch(name):
        return None
    path = tls_alpn01_path(state_dir, name)
    return path if os.path.exists(path) else None


class FileWatch:
    """Notices when the contents of some files change (a certbot renewal, a mounted
    secret replaced through a symlink swap, cert-manager): ``changed()`` compares a
    digest of what they hold now with the last one seen. Reading them is cheap (a few
    KiB) and, unlike modification times, sees through symlinks swapped in place."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        self.seen = self.digest()

    def digest(self) -> bytes:
        h = hashlib.sha256()
        for path in self.paths:
            try:
                with open(path, "rb") as f:
                    h.update(f.read(1 << 20))
            except OSError as exc:
                h.update(f"missing {exc.errno}".encode())
            h.update(b"\0")
        return h.digest()

    def changed(self) -> bool:
        now = self.digest()
        if now == self.seen:
            return False
        self.seen = now
        return True
