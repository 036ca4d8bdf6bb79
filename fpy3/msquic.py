"""Whether libmsquic.so.2 can be loaded here (the FPY3_MSQUIC_LIB path first, then the
system loader). Only dlopen: MsQuic itself starts in the worker (``fpy3.h3.engine``),
never in a process that forks afterwards; config checks and the master ask here."""

from __future__ import annotations

import ctypes
import os
import re

INSTALL_HINT = (
    "install libmsquic.so.2, 2.6 or later (for example the libmsquic package from "
    "packages.microsoft.com) or set FPY3_MSQUIC_LIB to its path"
)
MIN_VERSION = (2, 6)  # application-driven execution and partitioned listeners


def probe_msquic() -> str | None:
    """None when libmsquic loads, exports MsQuicOpenVersion and is not too old (as far as
    its file name tells), else why not.

    Only dlopen: MsQuic itself starts in the worker (MsQuicOpenVersion), never in a
    process that forks afterwards; the worker checks the version MsQuic reports.
    """
    reasons = []
    path = os.environ.get("FPY3_MSQUIC_LIB", "")
    for name in ([path] if path else []) + ["libmsquic.so.2"]:
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            reasons.append(str(exc))
            continue
        if not hasattr(lib, "MsQuicOpenVersion"):
            reasons.append(f"{name}: no MsQuicOpenVersion")
            continue
        version = _loaded_version()
        if version is not None and version < MIN_VERSION:
            reasons.append(
                f"{name} is MsQuic {'.'.join(map(str, version))}; fpy3 needs "
                f"{'.'.join(map(str, MIN_VERSION))} or later"
            )
            continue
        return None
    return "; ".join(reasons)


def _loaded_version() -> tuple[int, int] | None:
    """(major, minor) of the libmsquic this process has loaded, from its file name
    (libmsquic.so.2.6.0, as builds and packages name it); None when it does not say."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                m = re.search(r"/libmsquic\.so\.(\d+)\.(\d+)\.\d+\s*$", line)
                if m:
                    return int(m.group(1)), int(m.group(2))
    except OSError:
        pass
    return None


def msquic_engine(name: str) -> bool:
    """Whether ``http3.engine`` means MsQuic here (for the master, which forks: no start)."""
    return name == "msquic" or (name == "auto" and probe_msquic() is None)
