#!/usr/bin/env bash
# Build the three service images with podman: localhost/rmesh-{router,solver,verifier}:$TAG.
#
#   bash scripts/images.sh            (make images)
#
# BASE      the image the Containerfile starts from. Unset: the official python:3.11-slim when
#           a registry answers, else a Debian bookworm base built here with mmdebstrap from the
#           machine's own apt sources (localhost/rmesh-base:bookworm). Set: used as given, and
#           the build stops with a message naming BASE when it cannot be found or pulled.
# TAG       image tag (default: the chart's appVersion).
# PYTHON    the venv's python, which builds the wheels (default .venv/bin/python).
#
# Needs podman, buildah, mmdebstrap and runc: installed from Debian's packages when missing
# (as root). Builds run with --network=none; every wheel comes from build/images/wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
TAG=${TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' helm/reasoning-mesh/Chart.yaml)}
OFFICIAL_BASE=docker.io/library/python:3.11-slim
LOCAL_BASE=localhost/rmesh-base:bookworm
WHEELS=build/images/wheels
log() { printf '[images] %s\n' "$*" >&2; }

# shellcheck source=scripts/podman-env.sh
source scripts/podman-env.sh

# 1. The base image.
if [[ -n "${BASE:-}" && ! $BASE =~ ^[A-Za-z0-9][A-Za-z0-9._/:@-]*$ ]]; then
    log "BASE=$BASE is not an image reference"
    exit 3
fi
if [[ -n "${BASE:-}" ]]; then
    if ! podman image exists "$BASE" && ! podman pull -q "$BASE" >/dev/null 2>&1; then
        log "BASE=$BASE cannot be found locally or pulled from its registry; set BASE to an image"
        log "with python3.11 and its venv module, or leave BASE unset to build a Debian base here"
        exit 3
    fi
elif podman image exists "$OFFICIAL_BASE" || timeout 60 podman pull -q "$OFFICIAL_BASE" >/dev/null 2>&1; then
    BASE=$OFFICIAL_BASE
else
    log "no registry answers for $OFFICIAL_BASE; using BASE=$LOCAL_BASE, built here from Debian packages"
    bash scripts/build-base.sh "$LOCAL_BASE"
    BASE=$LOCAL_BASE
fi
log "BASE=$BASE"

# 2. Wheels: the project's distributions, then every pinned dependency they need.
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WHEELS" \
    ./shared ./router_svc ./solver_svc ./verifier_svc
"$PYTHON" -m pip wheel --quiet -w "$WHEELS" --find-links "$WHEELS" -c constraints.txt \
    rmesh-router 'rmesh-solver[embedded]' rmesh-verifier

# 3. One image per target, no network (the solver on python:3.11-slim fetches libgomp1).
WHEELS_SHA=$(cat "$WHEELS"/*.whl | sha256sum | cut -c1-16)
network=none
[[ $BASE == "$OFFICIAL_BASE" ]] && network=host
for service in router verifier solver; do
    started=$(date +%s)
    podman build --quiet --network="$network" --pull=never \
        --build-arg "BASE=$BASE" --build-arg "WHEELS_SHA=$WHEELS_SHA" --target "$service" \
        -t "localhost/rmesh-$service:$TAG" -f Containerfile . >/dev/null
    log "localhost/rmesh-$service:$TAG built in $(( $(date +%s) - started )) s"
done
podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "rmesh-(router|solver|verifier):$TAG" >&2
