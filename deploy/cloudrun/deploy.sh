#!/usr/bin/env bash
# The push endpoint on Cloud Run, fed by a Pub/Sub push subscription with a dead-letter topic.
#   PROJECT_ID=my-project REGION=europe-west1 IMAGE=europe-west1-docker.pkg.dev/my-project/clickflow/clickflow:1.0 \
#     deploy/cloudrun/deploy.sh
# Needs the topic (TOPIC, default clickstream) and the dataset (DATASET, default clickstream:
# clickflow bigquery create-tables config/push.yaml). Safe to run again, e.g. with a new IMAGE.
set -euo pipefail
: "${PROJECT_ID:?set PROJECT_ID}" "${REGION:?set REGION}" "${IMAGE:?set IMAGE}"
# shellcheck source=deploy/common.sh
. "$(dirname "$0")/../common.sh"
TOPIC=${TOPIC:-clickstream}
DATASET=${DATASET:-clickstream}
SERVICE=${SERVICE:-clickflow-push}
RUNTIME_SA="clickflow-push@${PROJECT_ID}.iam.gserviceaccount.com"   # the service's own identity
PUSHER_SA="clickflow-pusher@${PROJECT_ID}.iam.gserviceaccount.com"  # the identity Pub/Sub signs with
PROJECT_NUMBER=$(gcloud projects describe "$PROJECT_ID" --format 'value(projectNumber)')
PUBSUB_AGENT="service-${PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"
# Cloud Run's deterministic URL; the push path under it is the token audience both sides check.
AUDIENCE="https://${SERVICE}-${PROJECT_NUMBER}.${REGION}.run.app/pubsub/push"

service_account clickflow-push "clickflow push service"
service_account clickflow-pusher "Pub/Sub push to clickflow"
# The service only writes rows: data editor on its dataset, nothing project-wide.
dataset_editor "$RUNTIME_SA" "$DATASET"

# Not public: Cloud Run lets only run.invoker holders in, and clickflow checks the token again.
# Concurrency 80: requests arriving while an insert is in flight share the next one (one parse, one
# insert), so more per instance is cheaper; each waits for its own rows, one or two inserts' time.
# One warm instance keeps the signing keys cached and pushes fast; at most 20 bounds the cost.
# shutdown_timeout is 7 s in config/push.yaml: Cloud Run kills 10 s after SIGTERM.
gcloud run deploy "$SERVICE" --project "$PROJECT_ID" --region "$REGION" --image "$IMAGE" \
    --service-account "$RUNTIME_SA" --no-allow-unauthenticated \
    --args run,/etc/clickflow/push.yaml \
    --concurrency 80 --min-instances 1 --max-instances 20 --cpu 1 --memory 1Gi --timeout 60 \
    --set-env-vars "PROJECT_ID=${PROJECT_ID},DATASET=${DATASET},PUSH_AUDIENCE=${AUDIENCE},PUSH_SERVICE_ACCOUNT=${PUSHER_SA}"
gcloud run services add-iam-policy-binding "$SERVICE" --project "$PROJECT_ID" --region "$REGION" \
    --member "serviceAccount:${PUSHER_SA}" --role roles/run.invoker
# Pub/Sub's service agent mints the pusher's tokens (needed for projects made before April 2021).
gcloud iam service-accounts add-iam-policy-binding "$PUSHER_SA" --project "$PROJECT_ID" \
    --member "serviceAccount:${PUBSUB_AGENT}" --role roles/iam.serviceAccountTokenCreator

# What Pub/Sub cannot deliver in 10 attempts goes to a dead-letter topic, kept 7 days for inspection.
once gcloud pubsub topics create "${TOPIC}-undeliverable" --project "$PROJECT_ID"
once gcloud pubsub subscriptions create "${TOPIC}-undeliverable" --project "$PROJECT_ID" \
    --topic "${TOPIC}-undeliverable" --message-retention-duration 7d
gcloud pubsub topics add-iam-policy-binding "${TOPIC}-undeliverable" --project "$PROJECT_ID" \
    --member "serviceAccount:${PUBSUB_AGENT}" --role roles/pubsub.publisher
# Ack deadline 60 s: clickflow answers within ack_timeout (30 s in config/push.yaml), 503 after.
once gcloud pubsub subscriptions create "${TOPIC}-push" --project "$PROJECT_ID" --topic "$TOPIC" \
    --push-endpoint "$AUDIENCE" --push-auth-service-account "$PUSHER_SA" \
    --push-auth-token-audience "$AUDIENCE" --ack-deadline 60 \
    --dead-letter-topic "${TOPIC}-undeliverable" --max-delivery-attempts 10 \
    --min-retry-delay 10s --max-retry-delay 600s
gcloud pubsub subscriptions add-iam-policy-binding "${TOPIC}-push" --project "$PROJECT_ID" \
    --member "serviceAccount:${PUBSUB_AGENT}" --role roles/pubsub.subscriber
echo "push endpoint: ${AUDIENCE}"
