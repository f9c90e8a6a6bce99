"""Helm-managed objects: which release owns one, and the ``helm upgrade`` that records a change in it.

``helm upgrade`` computes a three-way merge of the last release's manifest, the new one and the live
object, so a field the chart renders (replicas, an autoscaler's bounds, a container's env) is set back to
the chart's value on the next upgrade, whatever was patched in between. What must last goes into values.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from typing import Any

MANAGED_BY = "app.kubernetes.io/managed-by"
INSTANCE = "app.kubernetes.io/instance"
RELEASE_NAME = "meta.helm.sh/release-name"
RELEASE_NAMESPACE = "meta.helm.sh/release-namespace"
CHART_ENV = "CBEC_HELM_CHART"
DEFAULT_CHART = "deploy/helm/cbec"


def default_chart() -> str:
    return os.environ.get(CHART_ENV) or DEFAULT_CHART


def release_of(metadata: Any) -> str | None:
    """The Helm release that manages an object (its meta.helm.sh annotation, else the chart's labels)."""
    annotations: Mapping[str, str] = getattr(metadata, "annotations", None) or {}
    labels: Mapping[str, str] = getattr(metadata, "labels", None) or {}
    if annotations.get(RELEASE_NAME):
        return annotations[RELEASE_NAME]
    if labels.get(MANAGED_BY) == "Helm":
        return labels.get(INSTANCE) or None
    return None


def release_namespace(metadata: Any) -> str:
    annotations: Mapping[str, str] = getattr(metadata, "annotations", None) or {}
    return annotations.get(RELEASE_NAMESPACE) or str(metadata.namespace)


def upgrade_command(release: str, namespace: str, chart: str, values: Mapping[str, Any]) -> list[str]:
    """``helm upgrade`` keeping the release's values and changing only ``values`` (dotted keys)."""
    command = ["helm", "upgrade", release, chart, "--namespace", namespace, "--reuse-values"]
    for key, value in values.items():
        command += ["--set", f"{key}={value}"]
    return command


def command_text(command: list[str]) -> str:
    return shlex.join(command)
