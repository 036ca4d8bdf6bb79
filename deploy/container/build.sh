#!/usr/bin/env bash
# Builds the fpy3 image (Containerfile) with buildah, without an image registry: unless
# BASE names a Debian 13 image to build on, one is made first with debootstrap from
# Debian's packages (and kept as localhost/fpy3-base:trixie for the next build).
#
#   deploy/container/build.sh                  # -> localhost/fpy3:latest
#   TAG=localhost/fpy3:dev BASE=docker.io/library/debian:trixie-slim deploy/container/build.sh
#
# Needs root, buildah and (without BASE) debootstrap. DEBIAN_MIRROR picks the mirror;
# CA_BUNDLE is the CA bundle pip trusts in the build (the system's by default, which
# covers a TLS-inspecting proxy the host trusts).
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${TAG:-localhost/fpy3:latest}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

if [ -z "${BASE:-}" ]; then
    BASE=localhost/fpy3-base:trixie
    if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
        work=$(mktemp -d)
        trap 'rm -rf "$work"' EXIT
        debootstrap --variant=minbase trixie "$work/root" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
            { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
        tar -C "$work/root" -cf "$work/root.tar" .
        ctr=$(buildah from scratch)
        buildah add --quiet "$ctr" "$work/root.tar" / >/dev/null
        buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
        buildah commit --quiet "$ctr" "$BASE" >/dev/null
        buildah rm "$ctr" >/dev/null
    fi
fi

secret=()
[ -s "$CA_BUNDLE" ] && secret=(--secret "id=ca_bundle,src=$CA_BUNDLE")
# chroot isolation: no user namespaces or OCI runtime needed; RUN steps use the
# host's network (apt and pip reach Debian and PyPI).
exec buildah bud --isolation chroot --layers "${secret[@]}" --build-arg "BASE=$BASE" \
    -f deploy/container/Containerfile -t "$TAG" .
