#!/usr/bin/env bash
# A local base image made from Debian's packages with debootstrap, for machines that can reach a
# Debian mirror but no image registry: Debian 13 (trixie) with Python 3.13, imported into podman.
#   deploy/base-image.sh [TAG]     (default localhost/clickflow-base:trixie; needs root)
set -euo pipefail
TAG=${1:-localhost/clickflow-base:trixie}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates trixie "$root" "$MIRROR"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --change 'CMD ["python3"]' - "$TAG"
