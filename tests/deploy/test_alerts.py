"""The chart's alert rules: `promtool check rules` and `promtool test rules` on the rendered rules file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.deploy.conftest import helm_template, rules_from, tool

TESTS = Path(__file__).parent / "promtool" / "alerts-test.yaml"
WITH_RULES = {"monitoring": {"rulesConfigMap": {"enabled": True}}}


def write_rules(directory: Path, values: dict[str, object] | None = None) -> Path:
    rules = directory / "rules.yaml"
    rules.write_text(rules_from(helm_template({**WITH_RULES, **(values or {})})))
    return rules


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tool("promtool")), *args], capture_output=True, text=True, timeout=120)


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    result = promtool("check", "rules", str(write_rules(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "SUCCESS: 17 rules found" in result.stdout
    )  # 8 alerts; latency per service (6), queue per model service (5)


def test_every_alert_has_unit_tests(tmp_path: Path) -> None:
    write_rules(tmp_path)
    shutil.copy(TESTS, tmp_path / TESTS.name)
    result = promtool("test", "rules", str(tmp_path / TESTS.name))
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((tmp_path / "rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tested = {
        case["alertname"]
        for test in yaml.safe_load(TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert alerts == tested, f"alerts without a firing test: {alerts - tested}"


def test_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    """Negative control: with the error-ratio threshold raised, the firing case must fail."""
    write_rules(
        tmp_path,
        {"monitoring": {"rulesConfigMap": {"enabled": True}, "alerts": {"errorRatio": {"threshold": 0.2}}}},
    )
    shutil.copy(TESTS, tmp_path / TESTS.name)
    result = promtool("test", "rules", str(tmp_path / TESTS.name))
    assert result.returncode != 0
    assert "alertname: CbecHighErrorRatio" in result.stdout + result.stderr


def test_queue_saturation_uses_the_configured_queue_size(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, {"services": {"vision": {"env": {"CBEC_BATCH_QUEUE_SIZE": 4096}}}})
    groups = yaml.safe_load(rules.read_text())["groups"]
    exprs = {
        r["labels"]["service"]: r["expr"]
        for g in groups
        for r in g["rules"]
        if r["alert"] == "CbecQueueSaturation"
    }
    assert "/ 4096 > 0.8" in exprs["vision"]
    assert "/ 1024 > 0.8" in exprs["risk"]
    assert "gateway" not in exprs  # no model, no batch queue


def test_runbook_links_when_configured(tmp_path: Path) -> None:
    rules = write_rules(
        tmp_path,
        {
            "monitoring": {
                "rulesConfigMap": {"enabled": True},
                "alerts": {"runbookBaseUrl": "https://runbooks.example.com/cbec/"},
            }
        },
    )
    for group in yaml.safe_load(rules.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["annotations"]["runbook_url"] == f"https://runbooks.example.com/cbec/{rule['alert']}"
