"""Shared fixtures for the deployment tests: the external tools and chart rendering.

helm, promtool, prometheus and rclone are installed into build/tools/bin by tools/install-*.sh on first
use. A tool that cannot be installed fails the test that needs it with the installer's message: nothing
is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.runtime.registry import SERVICES

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "cbec"
TOOLS_BIN = Path(os.environ.get("CBEC_TOOLS_DIR", ROOT / "build" / "tools")) / "bin"
INSTALLERS = {
    "helm": "install-helm.sh",
    "promtool": "install-promtool.sh",
    "prometheus": "install-promtool.sh",
    "rclone": "install-rclone.sh",
}
MODEL_SERVICES = SERVICES["gateway"].calls  # the services behind the gateway (services/runtime/registry.py)
ALL_SERVICES = ("gateway", *MODEL_SERVICES)


def tool(name: str) -> Path:
    """Path of an external tool, installed by its tools/ script if it is missing (fails if it cannot be)."""
    path = TOOLS_BIN / name
    if not path.exists():
        script = ROOT / "tools" / INSTALLERS[name]
        result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
        if result.returncode != 0 or not path.exists():
            pytest.fail(
                f"{name} is required and {script.relative_to(ROOT)} could not install it:\n"
                f"{result.stdout}{result.stderr}",
                pytrace=False,
            )
    return path


def kubernetes_validate() -> list[str]:
    """The kubernetes-validate command of this interpreter's environment (a dev dependency)."""
    exe = Path(sys.executable).parent / "kubernetes-validate"
    if not exe.exists():
        found = shutil.which("kubernetes-validate")
        if found is None:
            pytest.fail(
                "kubernetes-validate is required: pip install kubernetes-validate==1.37.0", pytrace=False
            )
        return [found]
    return [str(exe)]


@dataclass
class Rendered:
    """The documents `helm template` produced, with lookups by kind and name."""

    text: str
    docs: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for doc in self.of_kind(kind):
            if doc["metadata"]["name"] == name:
                return doc
        names = [d["metadata"]["name"] for d in self.of_kind(kind)]
        raise KeyError(f"no {kind} {name!r}; have {names}")

    def deployment(self, service: str, release: str = "shop") -> dict[str, Any]:
        return self.get("Deployment", f"{release}-cbec-{service}")


class RenderError(Exception):
    """helm refused the values (schema or template `fail`); the message is helm's stderr."""


def helm_template(
    values: dict[str, Any] | None = None, release: str = "shop", namespace: str = "cbec"
) -> Rendered:
    """Render the chart with these values (passed as a values file, as an SRE would)."""
    helm = tool("helm")
    with tempfile.TemporaryDirectory() as tmp:
        values_file = Path(tmp) / "values.yaml"
        values_file.write_text(yaml.safe_dump(values or {}))
        args = [str(helm), "template", release, str(CHART), "--namespace", namespace, "-f", str(values_file)]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RenderError(result.stderr)
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    return Rendered(result.stdout, docs)


@pytest.fixture(scope="session")
def render() -> Callable[..., Rendered]:
    return helm_template


@pytest.fixture(scope="session")
def default_chart() -> Rendered:
    return helm_template()


def rules_from(rendered: Rendered) -> str:
    """The plain Prometheus rules file the chart ships in its rules ConfigMap."""
    for doc in rendered.of_kind("ConfigMap"):
        if "cbec-alerts.yaml" in doc.get("data", {}):
            return str(doc["data"]["cbec-alerts.yaml"])
    raise KeyError("no alert rules ConfigMap rendered (monitoring.rulesConfigMap.enabled?)")
