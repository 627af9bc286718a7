"""The fleet's alerting rules (deploy/prometheus) pass their own unit tests in promtool."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


def test_the_alert_rules_pass_promtool_unit_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool is missing: apt-get install prometheus"
        pytest.fail(message) if os.environ.get("CLICKFLOW_REQUIRE_EMULATORS") == "1" else pytest.skip(message)
    result = subprocess.run([promtool, "test", "rules", "clickflow-alerts.test.yml"], cwd=RULES,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rules_use_only_metrics_the_live_sink_exports() -> None:
    from clickflow_live.metrics import LiveCollector
    from clickflow_live.sink import LiveSink, LiveSinkOptions

    exported = {family.name for family in LiveCollector(LiveSink("live", LiveSinkOptions())).collect()}
    used = set()
    for group in yaml.safe_load((RULES / "clickflow-alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"\bclickflow_[a-z_]+\b", rule["expr"]))
    assert used and used <= exported
