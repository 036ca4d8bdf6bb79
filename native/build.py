"""cffi builder for fpy3._native.

Every ``native/*.c`` file is compiled in, with warnings as errors. Each C room declares
what Python may call in its own ``<room>.cdef`` file and its C prototypes in
``<room>.h``; headers without a ``.cdef`` are internal to the C code (the engines'
shared parts) and stay out of the module's own source.
System libraries are found with pkg-config; a missing one stops the build with the
Debian package that provides it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

# pkg-config name -> (Debian package, minimum version). ngtcp2/nghttp3 1.x are in
# bookworm-backports; bookworm itself has 0.x, whose API differs.
LIBRARIES = {
    "gnutls": ("libgnutls28-dev", "3.7"),
    "libngtcp2": ("libngtcp2-dev", "1.4"),
    "libngtcp2_crypto_gnutls": ("libngtcp2-crypto-gnutls-dev", "1.4"),
    "libnghttp3": ("libnghttp3-dev", "1.2"),
    "libnghttp2": ("libnghttp2-dev", "1.52"),
}


def _pkg_config(name: str, debian_pkg: str, minimum: str) -> tuple[list[str], list[str]]:
    if shutil.which("pkg-config") is None:
        sys.exit("fpy3 build: pkg-config not found; install the Debian package pkg-config")
    if subprocess.call(["pkg-config", "--exists", name]) == 0 and subprocess.call(
        ["pkg-config", f"--atleast-version={minimum}", name]
    ):
        found = subprocess.check_output(["pkg-config", "--modversion", name], text=True).strip()
        sys.exit(
            f"fpy3 build: '{name}' is {found}, fpy3 needs >= {minimum}; install the Debian "
            f"package {debian_pkg} from bookworm-backports (apt-get install -t bookworm-backports {debian_pkg})"
        )
    try:
        cflags = subprocess.check_output(["pkg-config", "--cflags", name], text=True).split()
        libs = subprocess.check_output(["pkg-config", "--libs", name], text=True).split()
    except subprocess.CalledProcessError:
        sys.exit(
            f"fpy3 build: the C library '{name}' was not found by pkg-config; "
            f"install the Debian package {debian_pkg} (apt-get install {debian_pkg})"
        )
    return cflags, libs


# nghttp2 options fpy3's HTTP/2 defences use: upstream 1.61 has both; Debian 12's
# 1.52.0-1+deb12u2 has them backported (CVE-2023-44487, CVE-2024-27316).
NGHTTP2_NEEDS = (
    "nghttp2_option_set_stream_reset_rate_limit",
    "nghttp2_option_set_max_continuations",
)


def _check_nghttp2(cflags: list[str]) -> None:
    dirs = [f[2:] for f in cflags if f.startswith("-I")] + ["/usr/include", "/usr/local/include"]
    for d in dirs:
        header = Path(d) / "nghttp2" / "nghttp2.h"
        if header.exists():
            text = header.read_text(errors="replace")
            missing = [f for f in NGHTTP2_NEEDS if f not in text]
            if missing:
                sys.exit(
                    f"fpy3 build: libnghttp2 lacks {', '.join(missing)}; fpy3 needs nghttp2 "
                    ">= 1.61, or Debian 12's libnghttp2-dev with its security updates "
                    "(apt-get update && apt-get install libnghttp2-dev)"
                )
            return


def _builder() -> FFI:
    cflags: list[str] = []
    libs: list[str] = []
    for name, (pkg, minimum) in LIBRARIES.items():
        c, ll = _pkg_config(name, pkg, minimum)
        cflags += c
        libs += ll
        if name == "libnghttp2":
            _check_nghttp2(c)

    ffi = FFI()
    for cdef in sorted(HERE.glob("*.cdef")):
        ffi.cdef(cdef.read_text())
    rooms = sorted(h for h in HERE.glob("*.h") if h.with_suffix(".cdef").exists())
    headers = "\n".join(f'#include "{h.name}"' for h in rooms)
    # cffi defines it without a prototype, which -Wmissing-prototypes refuses.
    headers += "\nPyMODINIT_FUNC PyInit__native(void);\n"
    sources = [
        str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)
        for p in sorted(HERE.glob("*.c"))
        if p.name != "_native.c"
    ]
    extra = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wmissing-prototypes"]
    if os.environ.get("FPY3_SANITIZE"):
        extra += ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        libs += ["-fsanitize=address,undefined"]
    ffi.set_source(
        "fpy3._native",
        headers,
        sources=sources,
        include_dirs=[str(HERE)],
        extra_compile_args=cflags + extra,
        extra_link_args=libs,
    )
    return ffi


ffibuilder = _builder()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE), verbose=True)
