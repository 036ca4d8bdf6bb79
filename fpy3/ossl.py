"""Two OpenSSL hooks Python's ``ssl`` module does not offer, set through ctypes on the
very library ``_ssl`` is linked with (found in this process's memory map, never
loaded anew):

- **session-ticket keys** (``SSL_CTX_set_tlsext_ticket_key_cb``): tickets are encrypted
  with keys derived from the key file (``fpy3.keys``), the same in every worker and
  every replica, rotated once per ticket lifetime; the previous period's key still
  decrypts (and the ticket is renewed). Python's ssl only has per-context random keys,
  so a client would resume only on the worker that issued its ticket.
- **a context per handshake** (``SSL_CTX_set_client_hello_cb``): before anything is
  chosen, a function picks the SSL_CTX for this connection from the client's ALPN
  list and server name. This is the one place a new certificate takes effect for
  every TCP protocol (HTTP/1.1 and HTTP/2), and how a tls-alpn-01 ACME challenge
  (ALPN ``acme-tls/1``) gets its own certificate while every other client of the same
  name keeps the real one. An SNI callback could switch the context too, but it
  cannot see the client's ALPN list.

``available()`` says why the hooks cannot be used (None when they can): then fpy3
serves with Python's own per-context tickets and switches certificates through an SNI
callback (a tls-alpn-01 challenge is then answered only for names with no other
client meanwhile).
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import time
from collections.abc import Callable

from .keys import SessionKeys

logger = logging.getLogger("fpy3.error")

_SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB = 72
_TLSEXT_TYPE_SERVER_NAME = 0
_TLSEXT_TYPE_ALPN = 16
_CLIENT_HELLO_SUCCESS = 1

_TICKET_CB = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # SSL *
    ctypes.POINTER(ctypes.c_ubyte),  # key_name[16]
    ctypes.POINTER(ctypes.c_ubyte),  # iv[16]
    ctypes.c_void_p,  # EVP_CIPHER_CTX *
    ctypes.c_void_p,  # HMAC_CTX *
    ctypes.c_int,  # enc
)
_HELLO_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


class _Libs:
    def __init__(self, ssl_path: str, crypto_path: str):
        self.ssl = ssl_lib = ctypes.CDLL(ssl_path)
        self.crypto = crypto = ctypes.CDLL(crypto_path)
        ssl_lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        ssl_lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        ssl_lib.SSL_CTX_callback_ctrl.restype = ctypes.c_long
        ssl_lib.SSL_CTX_callback_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        ssl_lib.SSL_CTX_set_timeout.restype = ctypes.c_long
        ssl_lib.SSL_CTX_set_timeout.argtypes = [ctypes.c_void_p, ctypes.c_long]
        ssl_lib.SSL_CTX_set_client_hello_cb.restype = None
        ssl_lib.SSL_CTX_set_client_hello_cb.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        ssl_lib.SSL_client_hello_get0_ext.restype = ctypes.c_int
        ssl_lib.SSL_client_hello_get0_ext.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_size_t),
        ]
        ssl_lib.SSL_set_SSL_CTX.restype = ctypes.c_void_p
        ssl_lib.SSL_set_SSL_CTX.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        crypto.EVP_aes_256_cbc.restype = ctypes.c_void_p
        crypto.EVP_aes_256_cbc.argtypes = []
        crypto.EVP_sha256.restype = ctypes.c_void_p
        crypto.EVP_sha256.argtypes = []
        for name in ("EVP_EncryptInit_ex", "EVP_DecryptInit_ex"):
            fn = getattr(crypto, name)
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p] * 5
        crypto.HMAC_Init_ex.restype = ctypes.c_int
        crypto.HMAC_Init_ex.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        crypto.RAND_bytes.restype = ctypes.c_int
        crypto.RAND_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.aes = crypto.EVP_aes_256_cbc()
        self.sha256 = crypto.EVP_sha256()


_libs: _Libs | None = None
_why_not: str | None = None
_probed = False


def _find_libs() -> tuple[str, str]:
    import _ssl  # noqa: F401  (maps libssl and libcrypto into this process)

    ssl_path = crypto_path = ""
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.rsplit(None, 1)[-1] if "/" in line else ""
            name = path.rsplit("/", 1)[-1]
            if name.startswith("libssl.so") and not ssl_path:
                ssl_path = path
            elif name.startswith("libcrypto.so") and not crypto_path:
                crypto_path = path
    if not ssl_path or not crypto_path:
        raise OSError("Python's ssl module is not linked with a shared libssl/libcrypto")
    return ssl_path, crypto_path


def _load() -> _Libs | None:
    global _libs, _why_not, _probed
    if not _probed:
        _probed = True
        if ssl.OPENSSL_VERSION_INFO < (1, 1, 1):
            _why_not = f"{ssl.OPENSSL_VERSION} is older than 1.1.1"
        else:
            try:
                _libs = _Libs(*_find_libs())
            except (OSError, AttributeError) as exc:
                _why_not = f"OpenSSL hooks unavailable: {exc}"
    return _libs


def available() -> str | None:
    """None when the hooks work here, else why not."""
    _load()
    return _why_not


def ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The SSL_CTX * of a Python SSLContext (its first field after the object header),
    checked against what Python itself reads from it."""
    libs = _load()
    if libs is None:
        raise OSError(_why_not)
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or libs.ssl.SSL_CTX_get_options(ptr) != ctx.options:
        raise OSError("cannot find the SSL_CTX behind an ssl.SSLContext")
    return ptr


# Callbacks must outlive the contexts they are set on: kept here, per SSL_CTX.
_keep: dict[int, list] = {}


def set_ticket_keys(ctx: ssl.SSLContext, keys: SessionKeys, lifetime: int) -> None:
    """Tickets of ``ctx`` encrypted with the key of the current ``lifetime``-second
    period; the previous period's key still decrypts them (and the client gets a new
    ticket)."""
    libs = _load()
    ptr = ctx_pointer(ctx)
    assert libs is not None
    cache: dict[int, object] = {}

    def key_for(epoch: int):
        key = cache.get(epoch)
        if key is None:
            if len(cache) > 4:
                cache.clear()
            key = cache[epoch] = keys.tcp_ticket_key(epoch)
        return key

    def callback(_ssl, name, iv, cctx, hctx, enc) -> int:
        try:
            epoch = int(time.time()) // lifetime
            if enc:
                key = key_for(epoch)
                ctypes.memmove(name, key.name, 16)
                if libs.crypto.RAND_bytes(iv, 16) != 1:
                    return -1
                ok = libs.crypto.EVP_EncryptInit_ex(cctx, libs.aes, None, key.aes, iv)
                status = 1
            else:
                wanted = ctypes.string_at(name, 16)
                for status, e in ((1, epoch), (2, epoch - 1)):  # noqa: B007
                    key = key_for(e)
                    if key.name == wanted:
                        break
                else:
                    return 0  # unknown or expired: a full handshake
                ok = libs.crypto.EVP_DecryptInit_ex(cctx, libs.aes, None, key.aes, iv)
            if ok != 1 or libs.crypto.HMAC_Init_ex(hctx, key.hmac, 32, libs.sha256, None) != 1:
                return -1
            return status
        except Exception:  # never let an exception unwind into OpenSSL
            logger.exception("TLS session ticket callback failed")
            return -1

    cb = _TICKET_CB(callback)
    libs.ssl.SSL_CTX_callback_ctrl(
        ptr, _SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB, ctypes.cast(cb, ctypes.c_void_p)
    )
    libs.ssl.SSL_CTX_set_timeout(ptr, lifetime)
    _keep.setdefault(ptr, []).append(cb)


def _ext(libs: _Libs, ssl_ptr, ext_type: int) -> bytes | None:
    data = ctypes.c_void_p()
    size = ctypes.c_size_t()
    found = libs.ssl.SSL_client_hello_get0_ext(
        ssl_ptr, ext_type, ctypes.byref(data), ctypes.byref(size)
    )
    if found != 1:
        return None
    return ctypes.string_at(data, size.value) if data.value else b""


def parse_alpn(ext: bytes) -> list[bytes]:
    """The protocol names of a ClientHello ALPN extension body."""
    out = []
    i = 2
    end = min(len(ext), 2 + int.from_bytes(ext[:2], "big"))
    while i < end:
        n = ext[i]
        if i + 1 + n > end:
            break  # malformed: OpenSSL refuses the hello anyway
        out.append(ext[i + 1 : i + 1 + n])
        i += 1 + n
    return out


def parse_server_name(ext: bytes) -> str | None:
    """The host name of a ClientHello server_name extension body."""
    if len(ext) < 5 or ext[2] != 0:
        return None
    n = int.from_bytes(ext[3:5], "big")
    try:
        return ext[5 : 5 + n].decode("ascii").lower()
    except UnicodeDecodeError:
        return None


Chooser = Callable[[list[bytes], Callable[[], str | None]], ssl.SSLContext | None]


def set_context_chooser(ctx: ssl.SSLContext, choose: Chooser) -> None:
    """For every handshake on ``ctx``: ``choose(alpn, server_name)`` (the client's ALPN
    names; a function returning its server name) returns the SSLContext to use, or None
    to keep ``ctx``. The chosen contexts must be kept alive by the caller."""
    libs = _load()
    base = ctx_pointer(ctx)
    assert libs is not None
    pointers: dict[int, tuple[ssl.SSLContext, int]] = {}  # holding the context: ids are reused

    def callback(ssl_ptr, _alert, _arg) -> int:
        try:
            alpn_ext = _ext(libs, ssl_ptr, _TLSEXT_TYPE_ALPN)
            alpn = parse_alpn(alpn_ext) if alpn_ext else []

            def server_name() -> str | None:
                ext = _ext(libs, ssl_ptr, _TLSEXT_TYPE_SERVER_NAME)
                return parse_server_name(ext) if ext else None

            chosen = choose(alpn, server_name)
            if chosen is not None and chosen is not ctx:
                entry = pointers.get(id(chosen))
                if entry is None or entry[0] is not chosen:
                    if len(pointers) > 64:
                        pointers.clear()
                    entry = pointers[id(chosen)] = (chosen, ctx_pointer(chosen))
                ptr = entry[1]
                if ptr != base:
                    libs.ssl.SSL_set_SSL_CTX(ssl_ptr, ptr)
        except Exception:
            logger.exception("TLS client hello callback failed; serving the default certificate")
        return _CLIENT_HELLO_SUCCESS

    cb = _HELLO_CB(callback)
    libs.ssl.SSL_CTX_set_client_hello_cb(base, ctypes.cast(cb, ctypes.c_void_p), None)
    _keep.setdefault(base, []).append(cb)
