#!/bin/sh
# Build bench/h3load.c into bench/.build/h3load if the source is newer; print the path.
# Links libcurl-gnutls by name: Debian's OpenSSL libcurl (libcurl4) has no HTTP/3.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src=$here/h3load.c
out=$here/.build/h3load
mkdir -p "$here/.build"
if [ ! -x "$out" ] || [ "$src" -nt "$out" ] || [ "$0" -nt "$out" ]; then
    # Headers come from libcurl4-gnutls-dev; its pkg-config file says -lcurl, which is
    # the same library via a symlink, but naming it keeps an OpenSSL -dev from sneaking in.
    cflags=$(pkg-config --cflags libcurl 2>/dev/null || true)
    # shellcheck disable=SC2086  # cflags is a word list
    ${CC:-cc} -O2 -Wall -Wextra $cflags -pthread -o "$out.tmp" "$src" -lcurl-gnutls
    mv "$out.tmp" "$out"
fi
# The binary checks curl_version_info() for HTTP/3; fail here rather than mid-benchmark.
if ! info=$("$out" --version); then
    printf '%s\nh3load: the linked libcurl has no HTTP/3\n' "$info" >&2
    exit 1
fi
echo "$out"
