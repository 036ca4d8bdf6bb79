"""Whether libmsquic.so.2 can be loaded here (the FPY3_MSQUIC_LIB path first, then the
system loader). Only dlopen: MsQuic itself starts in the worker (``fpy3.h3.engine``),
never in a process that forks afterwards; config checks and the master ask here."""

from __future__ import annotations

import ctypes
import os

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
