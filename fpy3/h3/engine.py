"""Which QUIC engine serves HTTP/3: ngtcp2 (built in) or MsQuic (libmsquic.so.2,
loaded at run time: the FPY3_MSQUIC_LIB path first, then the system loader)."""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger("fpy3.error")

INSTALL_HINT = (
    "install libmsquic.so.2 (for example the libmsquic package from "
    "packages.microsoft.com) or set FPY3_MSQUIC_LIB to its path"
)


def probe_msquic() -> str | None:
    """None when libmsquic loads and exports MsQuicOpenVersion, else why not.

    Only dlopen: MsQuic itself starts in the worker (MsQuicOpenVersion), never in a
    process that forks afterwards.
    """
    reasons = []
    path = os.environ.get("FPY3_MSQUIC_LIB", "")
    for name in ([path] if path else []) + ["libmsquic.so.2"]:
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            reasons.append(str(exc))
            continue
        if hasattr(lib, "MsQuicOpenVersion"):
            return None
        reasons.append(f"{name}: no MsQuicOpenVersion")
    return "; ".join(reasons)


def msquic_engine(name: str) -> bool:
    """Whether ``http3.engine`` means MsQuic here (for the master, which forks: no start)."""
    return name == "msquic" or (name == "auto" and probe_msquic() is None)


def choose(name: str) -> int:
    """The engine for ``http3.engine`` (auto | msquic | ngtcp2) in this worker."""
    from fpy3._native import ffi, lib

    if name == "ngtcp2":
        logger.info("HTTP/3 engine: ngtcp2")
        return lib.FPY3_ENGINE_NGTCP2
    err = ffi.new("char[]", 512)
    if lib.fpy3_msquic_load(err, 512) == 0:
        logger.info("HTTP/3 engine: msquic")
        return lib.FPY3_ENGINE_MSQUIC
    reason = ffi.string(err).decode(errors="replace")
    if name == "msquic":
        raise OSError(
            f"http3.engine = msquic: libmsquic cannot be loaded ({reason}); {INSTALL_HINT}"
        )
    logger.info("HTTP/3 engine: ngtcp2 (libmsquic not loaded: %s)", reason)
    return lib.FPY3_ENGINE_NGTCP2
