# shellcheck shell=bash
# Sourced by the deploy scripts. Every step may run again: a create that finds its resource already
# there passes, so a script can be re-run after a fix, or to roll out a new image.
# Needs PROJECT_ID.

# once COMMAND...: run a create command; an "already exists" answer counts as done.
once() {
    local output
    if output=$("$@" 2>&1); then
        [ -z "$output" ] || printf '%s\n' "$output"
    elif grep -qi "already exists" <<<"$output"; then
        echo "already there: ${*:1:5}"
    else
        printf '%s\n' "$output" >&2
        return 1
    fi
}

# service_account NAME DESCRIPTION: creates NAME@PROJECT_ID.iam.gserviceaccount.com if missing.
service_account() {
    once gcloud iam service-accounts create "$1" --project "$PROJECT_ID" --display-name "$2"
}

# project_roles ACCOUNT ROLE...: grants project-wide roles to a service account's email.
project_roles() {
    local account=$1 role
    shift
    for role in "$@"; do
        gcloud projects add-iam-policy-binding "$PROJECT_ID" --member "serviceAccount:${account}" \
            --role "$role" --condition None --quiet >/dev/null
    done
}

# dataset_editor ACCOUNT DATASET: lets a service account create tables in and write to one dataset.
dataset_editor() {
    bq add-iam-policy-binding --member "serviceAccount:$1" --role roles/bigquery.dataEditor "${PROJECT_ID}:$2"
}

# image_reader ACCOUNT IMAGE: lets a service account pull from the Artifact Registry repository of IMAGE
# (REGION-docker.pkg.dev/PROJECT/REPOSITORY/NAME:TAG).
image_reader() {
    local host=${2%%/*} rest=${2#*/}
    local repository=${rest#*/}
    repository=${repository%%/*}
    gcloud artifacts repositories add-iam-policy-binding "$repository" --project "$PROJECT_ID" \
        --location "${host%-docker.pkg.dev}" --member "serviceAccount:$1" --role roles/artifactregistry.reader >/dev/null
}
