#!/bin/bash
# Build edgesplit's images without any image registry (docs/DEPLOY.md, "Images").
#
#   deploy/containers/build.sh [base|wheels|images|all]...     (default all)
#
# base:   a Debian bookworm root file system from Debian packages (debootstrap minbase,
#         with python3), cached as a tarball and imported as edgesplit-base:bookworm.
# wheels: every wheel the images install, downloaded on this host (torch's CPU wheel
#         lies on disk: pip's find-links) plus the project's own wheel, into a cache.
# images: edgesplit-mosquitto, edgesplit-control and edgesplit-worker, tagged $TAG.
#
# Environment: DOCKER (the docker command, default docker; DOCKER_HOST picks the engine),
# PYTHON (a Python 3.11 with pip and setuptools, default the project's .venv),
# EDGESPLIT_CACHE_DIR (default ~/.cache/edgesplit), EDGESPLIT_IMAGE_TAG (default dev),
# DEBIAN_MIRROR (default the first of this machine's apt sources, else deb.debian.org).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${EDGESPLIT_CACHE_DIR:-$HOME/.cache/edgesplit}/containers
TAG=${EDGESPLIT_IMAGE_TAG:-dev}
DOCKER=${DOCKER:-docker}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BASE_IMAGE=edgesplit-base:bookworm
BASE_TAR=$CACHE/base-bookworm-minbase.tar

say() { echo "build.sh: $*" >&2; }

mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
          | head -n1 | awk '{print $2}')
    echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
    mkdir -p "$CACHE"
    if [ ! -s "$BASE_TAR" ]; then
        local dir
        dir=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        say "debootstrap minbase bookworm from $(mirror) into $dir"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$dir" "$(mirror)" >"$CACHE/debootstrap.log" 2>&1 \
            || { say "debootstrap failed; see $CACHE/debootstrap.log"; rm -rf "$dir"; exit 1; }
        rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
        chmod 0755 "$dir"  # mktemp made it 0700: it becomes the image's /, which non-root users must traverse
        tar -C "$dir" -c . >"$BASE_TAR.part" && mv "$BASE_TAR.part" "$BASE_TAR"
        rm -rf "$dir"
    fi
    if ! $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "importing $BASE_TAR as $BASE_IMAGE"
        $DOCKER import "$BASE_TAR" "$BASE_IMAGE" >/dev/null
    fi
}

build_wheels() {
    local wheels=$CACHE/wheels
    mkdir -p "$wheels"
    say "wheels for the images into $wheels"
    "$PYTHON" -m pip download -q --only-binary=:all: --no-deps --dest "$wheels" \
        -r "$HERE/requirements-control.txt" -r "$HERE/requirements-worker.txt" 2> >(grep -v "is ignored: it is neither" >&2)
    rm -f "$wheels"/edgesplit-*.whl
    local out
    out=$(mktemp -d)
    # a copy of the sources: setuptools writes build/ and *.egg-info beside them
    mkdir -p "$out/src"
    cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/services" "$ROOT/shared" "$out/src/"
    find "$out/src" -name __pycache__ -prune -exec rm -rf {} +
    # reproducible (fixed zip timestamps): unchanged sources give the same wheel, so the
    # image layers that install it come from the build cache
    SOURCE_DATE_EPOCH=315532800 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation \
        --wheel-dir "$wheels" "$out/src"
    rm -rf "$out"
}

# A build context of its own per image (hard links where possible), so the worker's
# 190 MB torch wheel is not sent with the other two. Few instructions per Dockerfile: on
# vfs storage every step copies the whole file system.
context() {
    local name=$1 requirements=$2 ctx=$CACHE/context-$1
    rm -rf "$ctx"
    mkdir -p "$ctx/wheels" "$ctx/app"
    cp "$HERE/Dockerfile.$name" "$ctx/Dockerfile"
    if [ -n "$requirements" ]; then
        cp "$HERE/$requirements" "$ctx/wheels/requirements.txt"
        local spec file
        while read -r spec; do
            spec=${spec%%#*}; spec=${spec// /}
            [ -z "$spec" ] && continue
            file=$(wheel_for "$spec")
            ln "$file" "$ctx/wheels/" 2>/dev/null || cp "$file" "$ctx/wheels/"
        done <"$HERE/$requirements"
        cp "$CACHE"/wheels/edgesplit-*.whl "$ctx/app/"
    fi
    echo "$ctx"
}

# The wheel file of "name==version" in the wheel cache (names normalised as wheels spell them).
wheel_for() {
    local name=${1%%==*} version=${1#*==} found
    name=$(echo "$name" | tr 'A-Z-.' 'a-z__')
    found=$(find "$CACHE/wheels" -maxdepth 1 -iname "${name}-${version}-*.whl" -o -maxdepth 1 -iname "${name}-${version}+*.whl" | head -n1)
    [ -n "$found" ] || { say "no wheel for $1 in $CACHE/wheels (run: $0 wheels)"; exit 1; }
    echo "$found"
}

build_images() {
    local ctx
    ctx=$(context mosquitto "")
    "$PYTHON" - "$ROOT/deploy/mosquitto/mosquitto.conf" "$ctx/mosquitto.conf" <<'PY'
import sys
from pathlib import Path
# the project's broker configuration, as shared/broker.py renders it, for a container
text = Path(sys.argv[1]).read_text().format(
    port=1883, bind_address='0.0.0.0', user='mosquitto', data_dir='/var/lib/mosquitto')
Path(sys.argv[2]).write_text(text)
PY
    for name in mosquitto control worker; do
        [ "$name" = mosquitto ] || ctx=$(context "$name" "requirements-$name.txt")
        say "building edgesplit-$name:$TAG"
        DOCKER_BUILDKIT=0 $DOCKER build -q --network host --build-arg BASE="$BASE_IMAGE" \
            -t "edgesplit-$name:$TAG" "$ctx" >/dev/null
    done
}

[ $# -gt 0 ] || set -- all
for step in "$@"; do
    case $step in
        base) build_base ;;
        wheels) build_wheels ;;
        images) build_images ;;
        all) build_base; build_wheels; build_images ;;
        *) echo "usage: $0 [base|wheels|images|all]..." >&2; exit 2 ;;
    esac
    say "done: $step"
done
