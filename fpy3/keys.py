"""Secrets that must outlive a process: one master key in a key file, the rest derived.

The master reads (or, on first start, makes) ``tls.keys_file`` (default
``server.state_dir/session-keys``, mode 0600) before any worker starts. Every worker
of the master, and every replica given the same file, derives the same keys from it,
so they reset, validate and resume each other's clients, across restarts too:

- the QUIC static secret: stateless-reset tokens, Retry and address-validation tokens;
- the QUIC session-ticket master key (GnuTLS rotates the key it derives from it once
  per ticket lifetime, MsQuic takes it as its ticket key);
- the TLS-over-TCP ticket keys, one per rotation period (``tcp_ticket_keys``); the
  current one encrypts, it and the previous one decrypt.

Derivation is HMAC-SHA256 of the master key over a label, so no key is ever used for
two purposes and the file never needs to change.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass

FILE_NAME = "session-keys"
_MAGIC = "fpy3-session-keys-v1"
_MASTER_LEN = 64


class KeyFileError(Exception):
    """The key file cannot be read, made or parsed; str() says why."""


@dataclass(frozen=True)
class TicketKey:
    """One TLS-over-TCP ticket key (OpenSSL's layout: name, HMAC key, AES-256 key)."""

    name: bytes  # 16 bytes, sent in the ticket to find the key again
    hmac: bytes  # 32 bytes
    aes: bytes  # 32 bytes


@dataclass(frozen=True)
class SessionKeys:
    master: bytes

    def _derive(self, label: str) -> bytes:
        return hmac.new(self.master, label.encode(), hashlib.sha256).digest()

    @property
    def quic_secret(self) -> bytes:
        """32 bytes: stateless-reset and Retry/address-validation token key."""
        return self._derive("quic static secret")

    @property
    def quic_ticket_key(self) -> bytes:
        """64 bytes: the session-ticket master key of the QUIC engines."""
        return self._derive("quic ticket key 1") + self._derive("quic ticket key 2")

    def tcp_ticket_key(self, epoch: int) -> TicketKey:
        return TicketKey(
            self._derive(f"tcp ticket name {epoch}")[:16],
            self._derive(f"tcp ticket hmac {epoch}"),
            self._derive(f"tcp ticket aes {epoch}"),
        )


def default_path(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def parse(text: str) -> SessionKeys:
    lines = text.split()
    if len(lines) != 2 or lines[0] != _MAGIC:
        raise KeyFileError(f"not an fpy3 key file (expected a first line {_MAGIC!r})")
    try:
        master = bytes.fromhex(lines[1])
    except ValueError:
        raise KeyFileError("the key is not hexadecimal") from None
    if len(master) != _MASTER_LEN:
        raise KeyFileError(f"the key has {len(master)} bytes, expected {_MASTER_LEN}")
    return SessionKeys(master)


def load(path: str) -> SessionKeys:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read(4096)
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise KeyFileError(f"cannot read {path}: {reason}") from None
    return parse(text)


def load_or_create(path: str) -> SessionKeys:
    """The keys in ``path``; made with a new random key (mode 0600) when it does not
    exist. An unreadable or damaged file is an error, never replaced: replicas may
    share it."""
    if os.path.exists(path):
        return load(path)
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        with open(fd, "w", encoding="ascii") as f:
            os.fchmod(fd, 0o600)
            f.write(f"{_MAGIC}\n{secrets.token_bytes(_MASTER_LEN).hex()}\n")
            f.flush()
            os.fsync(f.fileno())
        # link, not replace: a master starting at the same moment keeps its file.
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return load(path)
