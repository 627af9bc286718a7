#!/usr/bin/env bash
# Builds the Flex Template (launcher image and spec file) and runs it once on BUCKET/visits/*.jsonl.gz.
#   PROJECT_ID=my-project REGION=europe-west1 BUCKET=my-bucket deploy/dataflow/build.sh
# Needs the Artifact Registry repository `clickflow` in REGION and the dataset (DATASET, default
# clickstream). Safe to run again.
set -euo pipefail
: "${PROJECT_ID:?set PROJECT_ID}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}"
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/common.sh
. deploy/common.sh
DATASET=${DATASET:-clickstream}
IMAGE="${REGION}-docker.pkg.dev/${PROJECT_ID}/clickflow/clickflow-flex:$(git rev-parse --short HEAD)"
SPEC="gs://${BUCKET}/templates/clickflow-batch.json"
SA="clickflow-dataflow@${PROJECT_ID}.iam.gserviceaccount.com"

gcloud builds submit --project "$PROJECT_ID" --config deploy/dataflow/cloudbuild.yaml \
    --substitutions "_IMAGE=${IMAGE}" .
gcloud dataflow flex-template build "$SPEC" --project "$PROJECT_ID" --image "$IMAGE" \
    --sdk-language PYTHON --metadata-file deploy/dataflow/metadata.json

# The launcher and the workers: be a Dataflow worker, pull the launcher image, read the input and
# write temporary files in the bucket, run load jobs, write the dataset's tables; nothing else.
service_account clickflow-dataflow "clickflow batch on Dataflow"
project_roles "$SA" roles/dataflow.worker roles/bigquery.jobUser
dataset_editor "$SA" "$DATASET"
image_reader "$SA" "$IMAGE"
gcloud storage buckets add-iam-policy-binding "gs://${BUCKET}" --member "serviceAccount:${SA}" \
    --role roles/storage.objectAdmin >/dev/null

gcloud dataflow flex-template run "clickflow-batch-$(date +%Y%m%d-%H%M%S)" --project "$PROJECT_ID" \
    --region "$REGION" --template-file-gcs-location "$SPEC" --service-account-email "$SA" \
    --parameters "input=gs://${BUCKET}/visits/*.jsonl.gz,output_project=${PROJECT_ID},dataset=${DATASET}" \
    --temp-location "gs://${BUCKET}/tmp"
