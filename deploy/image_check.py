"""Builds the image and runs it: every installed module is compiled ahead (a cold start compiles
nothing; its `clickflow validate` time is printed), config/local.yaml starts, /healthz and /metrics
answer, SIGTERM drains it and the process exits 0.

    python deploy/image_check.py [--base IMAGE] [--tag TAG]

Uses buildah with chroot isolation, which runs where podman's OCI runtime cannot (in a sandbox
that refuses setrlimit and new namespaces): the build runs every RUN step of the Dockerfile, and
the check runs the image's own entrypoint and command, as its user, in its working directory,
with its environment. On machines without a registry, make a base first (deploy/base-image.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"


def build(base: str, tag: str) -> None:
    command = ["buildah", "bud", "--isolation", "chroot", "--layers=false", "--build-arg", f"BASE_IMAGE={base}"]
    if os.path.exists(HOST_CA):  # a proxy's certificate authority, for the build stage's pip only
        command += ["--volume", f"{HOST_CA}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    subprocess.run([*command, "-t", tag, str(ROOT)], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status, response.read()


BYTECODE_PROBE = """
import importlib.util, json, pathlib, statistics, subprocess, sys, time
sources = [str(p) for p in pathlib.Path(sys.prefix).rglob("*.py")]
uncompiled = [p for p in sources if not pathlib.Path(importlib.util.cache_from_source(p)).is_file()]
seconds = []
for _ in range(6):
    start = time.perf_counter()
    subprocess.run(["clickflow", "validate", "/etc/clickflow/local.yaml"], check=True, capture_output=True)
    seconds.append(time.perf_counter() - start)
print(json.dumps({"sources": len(sources), "uncompiled": uncompiled, "validate": statistics.median(seconds[1:])}))
"""


def check_bytecode(container: str) -> None:
    """Every module in the image's environment has its bytecode, so no start compiles one."""
    command = ["buildah", "run", "--isolation", "chroot", container, "--", "python3", "-c", BYTECODE_PROBE]
    probe = subprocess.run(command, check=True, capture_output=True, text=True)
    found = json.loads(probe.stdout)
    if found["uncompiled"]:
        raise SystemExit(f"{len(found['uncompiled'])} modules are not compiled, e.g. {found['uncompiled'][:3]}")
    print(f"bytecode: all {found['sources']} modules compiled; `clickflow validate` takes {found['validate']:.3f}s")


def run_and_stop(tag: str) -> None:
    inspect = subprocess.run(["buildah", "inspect", "--type", "image", tag], check=True, capture_output=True, text=True)
    config = json.loads(inspect.stdout)["OCIv1"]["config"]
    argv = [*config["Entrypoint"], *config["Cmd"]]
    print(f"image: user {config['User']}, workdir {config['WorkingDir']}, runs {argv}")
    assert config["User"].split(":")[0] not in ("", "0", "root"), "the image must not run as root"
    container = subprocess.run(["buildah", "from", tag], check=True, capture_output=True, text=True).stdout.strip()
    port = free_port()
    try:
        check_bytecode(container)
        child = subprocess.Popen([
            "buildah", "run", "--isolation", "chroot", "--env", f"PORT={port}", "--env", "CLICKFLOW_VISITS=null",
            container, "--", *argv,
        ])  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _ = get(f"{base}/healthz")
                break
            except OSError:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the container did not start serving /healthz") from None
                time.sleep(0.5)
        status, metrics = get(f"{base}/metrics")
        assert status == 200 and b"clickflow_events_parsed_total" in metrics, "no clickflow metrics"
        status, _ = get(f"{base}/dashboard")
        print(f"/healthz, /metrics and /dashboard answer on port {port}")
        time.sleep(3)  # let it ingest for a while
        pid = int(subprocess.run(["pgrep", "-n", "-f", f"clickflow run {config['Cmd'][-1]}"],
                                 check=True, capture_output=True, text=True).stdout)  # fmt: skip
        os.kill(pid, signal.SIGTERM)  # what `docker stop` sends to the entrypoint process
        code = child.wait(timeout=60)
        print(f"SIGTERM: clickflow exited {code}")
        if code != 0:
            raise SystemExit(f"clickflow exited {code} on SIGTERM, not 0")
    finally:
        subprocess.run(["buildah", "rm", container], check=False, capture_output=True)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--base", default=os.environ.get("BASE_IMAGE", "localhost/clickflow-base:trixie"))
    args.add_argument("--tag", default="localhost/clickflow:check")
    args.add_argument("--no-build", action="store_true", help="check an image already built")
    opts = args.parse_args()
    if not opts.no_build:
        build(opts.base, opts.tag)
    run_and_stop(opts.tag)
    print("image check passed")


if __name__ == "__main__":
    main()
