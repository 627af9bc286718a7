#!/usr/bin/env bash
# Pull workers on GKE (Workload Identity on): IAM for the workers, then deploy/k8s/pull.yaml with
# this project's values. kubectl must point at the cluster.
#   PROJECT_ID=my-project IMAGE=europe-west1-docker.pkg.dev/my-project/clickflow/clickflow:1.0 deploy/k8s/deploy.sh
# The HorizontalPodAutoscaler reads the subscription's backlog through the Custom Metrics
# Stackdriver Adapter, installed once per cluster (README, "Deploy").
set -euo pipefail
: "${PROJECT_ID:?set PROJECT_ID}" "${IMAGE:?set IMAGE}"
here=$(dirname "$0")
# shellcheck source=deploy/common.sh
. "$here/../common.sh"
SUBSCRIPTION=${SUBSCRIPTION:-clickstream}
DATASET=${DATASET:-clickstream}
NAMESPACE=${NAMESPACE:-default}
SA="clickflow-pull@${PROJECT_ID}.iam.gserviceaccount.com"

service_account clickflow-pull "clickflow pull workers"
gcloud pubsub subscriptions add-iam-policy-binding "$SUBSCRIPTION" --project "$PROJECT_ID" \
    --member "serviceAccount:${SA}" --role roles/pubsub.subscriber
dataset_editor "$SA" "$DATASET"
# Pods of the Kubernetes service account clickflow-pull act as the Google one; no key anywhere.
gcloud iam service-accounts add-iam-policy-binding "$SA" --project "$PROJECT_ID" \
    --member "serviceAccount:${PROJECT_ID}.svc.id.goog[${NAMESPACE}/clickflow-pull]" \
    --role roles/iam.workloadIdentityUser

sed -e "s|image: .*|image: ${IMAGE}|" -e "s|my-project|${PROJECT_ID}|g" \
    -e "s|{name: SUBSCRIPTION, value: clickstream}|{name: SUBSCRIPTION, value: ${SUBSCRIPTION}}|" \
    -e "s|{name: DATASET, value: clickstream}|{name: DATASET, value: ${DATASET}}|" \
    -e "s|subscription_id: clickstream|subscription_id: ${SUBSCRIPTION}|" \
    "$here/pull.yaml" | kubectl apply --namespace "$NAMESPACE" -f -
