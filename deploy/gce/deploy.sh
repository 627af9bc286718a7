#!/usr/bin/env bash
# A fleet of pull workers: a regional managed instance group of Container-Optimized OS VMs running
# the image (cloud-init), autohealed on /healthz and autoscaled on the subscription's backlog.
#   PROJECT_ID=my-project REGION=europe-west1 IMAGE=europe-west1-docker.pkg.dev/my-project/clickflow/clickflow:1.0 \
#     deploy/gce/deploy.sh
# Needs the subscription (SUBSCRIPTION, default clickstream) and the dataset (DATASET, default
# clickstream). Run it again with a new IMAGE to roll the fleet over to it.
set -euo pipefail
: "${PROJECT_ID:?set PROJECT_ID}" "${REGION:?set REGION}" "${IMAGE:?set IMAGE}"
here=$(dirname "$0")
# shellcheck source=deploy/common.sh
. "$here/../common.sh"
export SUBSCRIPTION=${SUBSCRIPTION:-clickstream} DATASET=${DATASET:-clickstream}
GROUP=${GROUP:-clickflow-pull}
SA="clickflow-pull@${PROJECT_ID}.iam.gserviceaccount.com"

service_account clickflow-pull "clickflow pull workers"
gcloud pubsub subscriptions add-iam-policy-binding "$SUBSCRIPTION" --project "$PROJECT_ID" \
    --member "serviceAccount:${SA}" --role roles/pubsub.subscriber
dataset_editor "$SA" "$DATASET"
image_reader "$SA" "$IMAGE"
project_roles "$SA" roles/logging.logWriter   # the container's logs (docker's gcplogs driver)

# Credentials come from the metadata server: the VM runs as the service account, nothing is mounted.
TEMPLATE="${GROUP}-$(date +%Y%m%d-%H%M%S)"
user_data=$(mktemp)
trap 'rm -f "$user_data"' EXIT
"$here/render-cloud-init.sh" >"$user_data"
gcloud compute instance-templates create "$TEMPLATE" --project "$PROJECT_ID" \
    --machine-type e2-standard-2 --image-family cos-stable --image-project cos-cloud \
    --service-account "$SA" --scopes cloud-platform --tags clickflow-pull \
    --metadata-from-file user-data="$user_data"

# Google's health checkers reach /healthz on 8080; an instance failing it 4 times in a row is recreated.
once gcloud compute firewall-rules create "${GROUP}-health" --project "$PROJECT_ID" --network default \
    --allow tcp:8080 --target-tags clickflow-pull --source-ranges 130.211.0.0/22,35.191.0.0/16
once gcloud compute health-checks create http "${GROUP}-healthz" --project "$PROJECT_ID" \
    --port 8080 --request-path /healthz --check-interval 15s --timeout 5s --unhealthy-threshold 4
if gcloud compute instance-groups managed describe "$GROUP" --project "$PROJECT_ID" --region "$REGION" >/dev/null 2>&1; then
    # A new image: replace the workers a few at a time, never below the current size.
    gcloud compute instance-groups managed rolling-action start-update "$GROUP" --project "$PROJECT_ID" \
        --region "$REGION" --version "template=${TEMPLATE}" --max-surge 3 --max-unavailable 0
else
    gcloud compute instance-groups managed create "$GROUP" --project "$PROJECT_ID" --region "$REGION" \
        --template "$TEMPLATE" --size 2 --health-check "${GROUP}-healthz" --initial-delay 120
fi
# One worker per 20,000 undelivered messages, 2 to 10 workers.
gcloud compute instance-groups managed set-autoscaling "$GROUP" --project "$PROJECT_ID" --region "$REGION" \
    --min-num-replicas 2 --max-num-replicas 10 --cool-down-period 120 \
    --update-stackdriver-metric pubsub.googleapis.com/subscription/num_undelivered_messages \
    --stackdriver-metric-filter "resource.type = \"pubsub_subscription\" AND resource.labels.subscription_id = \"${SUBSCRIPTION}\"" \
    --stackdriver-metric-single-instance-assignment 20000
