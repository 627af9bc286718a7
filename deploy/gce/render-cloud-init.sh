#!/usr/bin/env bash
# Prints deploy/gce/cloud-init.yaml with its values filled in, for an instance template's user-data.
#   IMAGE=... PROJECT_ID=... [SUBSCRIPTION=clickstream DATASET=clickstream] deploy/gce/render-cloud-init.sh
set -euo pipefail
: "${PROJECT_ID:?set PROJECT_ID}" "${IMAGE:?set IMAGE}"
sed -e "s|@IMAGE@|${IMAGE}|g" -e "s|@REGISTRY@|${IMAGE%%/*}|g" -e "s|@PROJECT_ID@|${PROJECT_ID}|g" \
    -e "s|@SUBSCRIPTION@|${SUBSCRIPTION:-clickstream}|g" -e "s|@DATASET@|${DATASET:-clickstream}|g" \
    "$(dirname "$0")/cloud-init.yaml"
