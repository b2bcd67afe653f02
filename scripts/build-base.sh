#!/usr/bin/env bash
# Build a Debian bookworm base image without a registry: a minbase root with python3, its venv
# module, CA certificates, libgomp1 (llama.cpp's OpenMP) and bubblewrap (the verifier's
# python_tests sandbox), made by mmdebstrap from this
# machine's apt sources and imported into podman. Docs, man pages and locales are left out.
#
#   bash scripts/build-base.sh [IMAGE]      (default localhost/rmesh-base:bookworm)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:-localhost/rmesh-base:bookworm}
SUITE=bookworm
# shellcheck source=scripts/podman-env.sh
source scripts/podman-env.sh

if podman image exists "$IMAGE" && [[ "${REBUILD_BASE:-0}" != 1 ]] \
    && podman run --rm --network=none "$IMAGE" test -x /usr/bin/bwrap 2>/dev/null; then
    exit 0
fi
sources=""
for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list; do
    if [[ -f $f ]] && grep -qE "^(Suites:.*\b$SUITE\b|deb .* $SUITE )" "$f"; then sources=$f; break; fi
done
sources=${sources:-http://deb.debian.org/debian}
work=$(mktemp -d "${TMPDIR:-/tmp}/rmesh-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
# merged /usr by symlinks, without the usrmerge package (which brings perl)
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1,bubblewrap \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --customize-hook='rm -rf "$1"/var/cache/ldconfig/aux-cache "$1"/var/log/*.log "$1"/var/log/apt/* "$1"/etc/machine-id' \
    --customize-hook='find "$1"/usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} +' \
    "$SUITE" "$work/rootfs.tar" "$sources"
podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/usr/bin/python3"]' \
    "$work/rootfs.tar" "$IMAGE" >/dev/null
echo "[images] imported $IMAGE" >&2
