#!/bin/sh
# Build bench/wsload.c into bench/.build/wsload if the source is newer; print the path.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src=$here/wsload.c
out=$here/.build/wsload
mkdir -p "$here/.build"
if [ ! -x "$out" ] || [ "$src" -nt "$out" ] || [ "$0" -nt "$out" ]; then
    ${CC:-cc} -O2 -Wall -Wextra -o "$out.tmp" "$src"
    mv "$out.tmp" "$out"
fi
echo "$out"
