"""cbecctl against a Kubernetes API on 127.0.0.1 (kmock's emulator, see cluster_sim.py), driven through
its command line with a kubeconfig, with the real ``kubernetes`` client and the chart's own manifests."""

from __future__ import annotations

import copy
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.deploy.cluster_sim import Cluster, Node, running_cluster
from tests.deploy.conftest import helm_template
from tools.cbecctl.cli import run
from tools.cbecctl.kube import Cbec, CbecctlError

NS = "shop"
V1 = "20261101T000000000000Z"
V2 = "20261115T120000000000Z"
NEWEST = "20261120T080000000000Z"
BROKEN = "20261125T000000000000Z"
VALUES = {
    "services": {
        "recommender": {"gpu": {"count": 1}, "modelVersion": V1},
        "vision": {"gpu": {"count": 1}},
        "chat": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}},
        "risk": {"replicas": 2},
    }
}


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return helm_template(VALUES, release="shop", namespace=NS).docs


@pytest.fixture
def cluster(tmp_path: Path, manifests: list[dict[str, Any]]) -> Iterator[Cluster]:
    with running_cluster(tmp_path, NS) as cluster:
        cluster.add_node(Node("gpu-a", gpus=4, labels={"nvidia.com/gpu.product": "NVIDIA-H100"}))
        cluster.add_node(Node("gpu-b", gpus=1, labels={"nvidia.com/gpu.product": "NVIDIA-L4"}))
        cluster.add_node(Node("cpu-1"))
        # another team's job holds gpu-b's only GPU
        client.CoreV1Api(cluster.api).create_namespaced_pod(
            "ml",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "training-0", "namespace": "ml"},
                "spec": {
                    "nodeName": "gpu-b",
                    "containers": [
                        {"name": "t", "image": "t", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
                    ],
                },
                "status": {"phase": "Running"},
            },
        )
        cluster.controllers.newest = {
            s: NEWEST for s in ("recommender", "chat", "sentiment", "vision", "risk")
        }
        cluster.apply(copy.deepcopy(manifests))
        cluster.wait_settled()
        yield cluster


def wait_until(what: str, check: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def cli(cluster: Cluster, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = run(["--kubeconfig", str(cluster.kubeconfig), "-n", NS, "--poll-interval", "0.05", *args], out=out)
    return code, out.getvalue()


def deployment(cluster: Cluster, service: str) -> client.V1Deployment:
    return client.AppsV1Api(cluster.api).read_namespaced_deployment(f"shop-cbec-{service}", NS)


def pods(cluster: Cluster, service: str) -> list[client.V1Pod]:
    return [
        p
        for p in client.CoreV1Api(cluster.api).list_namespaced_pod(NS).items
        if p.metadata.labels.get("app.kubernetes.io/component") == service
    ]


def test_status_shows_replicas_gpus_and_model_versions(cluster: Cluster) -> None:
    code, text = cli(cluster, "status")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in text.splitlines()[1:]}
    assert set(rows) == {"gateway", "recommender", "chat", "sentiment", "vision", "risk"}
    header = text.splitlines()[0]
    assert header.split("  ")[0] == "SERVICE" and "LOADED MODEL" in header
    assert rows["recommender"][:8] == ["recommender", "1/1", "1", "-", "1", "1", V1, V1]
    assert rows["sentiment"][6:8] == ["newest", NEWEST]
    assert rows["chat"][1:4] == ["2/2", "2", "2-6"]
    assert rows["risk"][1] == "2/2"
    assert rows["gateway"][6:8] == ["-", "-"]
    assert rows["vision"][-1] == "cbec-vision:0.1.0-gpu"

    code, text = cli(cluster, "--json", "status")
    data = {row["service"]: row for row in json.loads(text)}
    assert data["vision"]["gpus_per_pod"] == 1 and data["vision"]["gpus_requested"] == 1
    assert data["chat"]["autoscaler"] == {"min": 2, "max": 6}
    assert data["recommender"]["loaded_models"] == {V1: 1}
    assert data["risk"]["loaded_models"] == {NEWEST: 2}


def test_scale_a_service_and_an_autoscaled_one(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = cli(cluster, "scale", "risk", "3")
    assert (code, text.strip()) == (0, "risk: replicas 2 -> 3")
    cluster.wait_settled()
    assert len([p for p in pods(cluster, "risk")]) == 3
    assert deployment(cluster, "risk").status.ready_replicas == 3

    code, _ = cli(cluster, "scale", "chat", "4")
    assert code == 1
    assert (
        "chat is autoscaled by HorizontalPodAutoscaler shop-cbec-chat (min 2, max 6)"
        in capsys.readouterr().err
    )
    code, text = cli(cluster, "--json", "scale", "chat", "--min", "3", "--max", "8")
    assert code == 0 and json.loads(text) == {
        "service": "chat",
        "autoscaler": "shop-cbec-chat",
        "min": 3,
        "max": 8,
    }
    hpa = client.AutoscalingV2Api(cluster.api).read_namespaced_horizontal_pod_autoscaler("shop-cbec-chat", NS)
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (3, 8)
    wait_until("the autoscaler to raise chat to its new minimum", lambda: len(pods(cluster, "chat")) == 3)

    code, _ = cli(cluster, "scale", "translate", "2")
    assert code == 1
    assert "no cbec service 'translate' in namespace shop (found: chat, gateway" in capsys.readouterr().err


def test_rollout_model_updates_every_pod_and_waits(cluster: Cluster) -> None:
    before = deployment(cluster, "recommender")
    old_pods = {p.metadata.name for p in pods(cluster, "recommender")}
    code, text = cli(cluster, "rollout-model", "recommender", V2, "--timeout", "20")
    assert code == 0, text
    assert f"recommender: model {V1} -> {V2} rolled out in" in text and text.strip().endswith(f"serving {V2}")
    after = deployment(cluster, "recommender")
    container = after.spec.template.spec.containers[0]
    assert next(e.value for e in container.env if e.name == "CBEC_MODEL_VERSION") == V2
    assert after.spec.template.metadata.labels["cbec.ai/model-version"] == V2
    assert after.metadata.labels["cbec.ai/model-version"] == V2
    assert after.spec.template.metadata.annotations["cbec.ai/model-path"] == f"/models/recommender/{V2}"
    # nothing else of the pod template changed
    old_container = before.spec.template.spec.containers[0]
    assert container.image == old_container.image and container.resources == old_container.resources
    assert container.startup_probe == old_container.startup_probe
    assert after.metadata.generation == before.metadata.generation + 1
    now = pods(cluster, "recommender")
    assert not old_pods & {p.metadata.name for p in now}
    assert [p.metadata.labels["cbec.ai/model-version"] for p in now] == [V2]

    code, text = cli(cluster, "rollout-model", "recommender", V2)
    assert (code, text.strip()) == (0, f"recommender: already on model {V2}")

    code, text = cli(cluster, "--json", "rollout-model", "recommender", "newest", "--timeout", "20")
    result = json.loads(text)
    assert code == 0 and result["previous_model"] == V2 and result["loaded_models"] == {NEWEST: 1}
    env = deployment(cluster, "recommender").spec.template.spec.containers[0].env
    assert next(e.value for e in env if e.name == "CBEC_MODEL_VERSION") in ("", None)


def test_a_failing_rollout_times_out_naming_the_stuck_pods(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.controllers.broken_versions.add(BROKEN)
    started = time.monotonic()
    code, _ = cli(cluster, "rollout-model", "vision", BROKEN, "--timeout", "2")
    assert code == 3
    assert time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert "vision: roll-out not finished after 2s (1 of 1 pods updated, 1 old pods still running)" in err
    assert f"(model {BROKEN}, Running: vision: not ready; 2 restarts)" in err
    # the old pod still serves: a failed roll-out never takes the service down
    serving = [p for p in pods(cluster, "vision") if p.metadata.labels["cbec.ai/model-version"] == "newest"]
    assert len(serving) == 1


def test_undo_on_failure_puts_the_previous_version_back(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.controllers.broken_versions.add(BROKEN)
    code, _ = cli(cluster, "rollout-model", "recommender", BROKEN, "--timeout", "2", "--undo-on-failure")
    assert code == 3
    assert f"; rolled back to model {V1}" in capsys.readouterr().err
    cluster.wait_settled()
    assert [p.metadata.labels["cbec.ai/model-version"] for p in pods(cluster, "recommender")] == [V1]
    code, text = cli(cluster, "--json", "status")
    row = next(r for r in json.loads(text) if r["service"] == "recommender")
    assert row["pinned_model"] == V1 and row["loaded_models"] == {V1: 1} and row["ready"] == 1


def test_a_stalled_rollout_fails_before_the_timeout(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    apps = client.AppsV1Api(cluster.api)
    apps.patch_namespaced_deployment(
        "shop-cbec-sentiment",
        NS,
        {"spec": {"progressDeadlineSeconds": 1}},
        _content_type="application/merge-patch+json",
    )
    cluster.wait_settled()
    cluster.controllers.broken_versions.add(BROKEN)
    started = time.monotonic()
    code, _ = cli(cluster, "rollout-model", "sentiment", BROKEN, "--timeout", "60")
    assert code == 3 and time.monotonic() - started < 30
    assert "sentiment: roll-out stalled (ReplicaSet" in capsys.readouterr().err


def test_bad_arguments_are_refused_before_any_change(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    generation = deployment(cluster, "risk").metadata.generation
    assert cli(cluster, "rollout-model", "risk", "latest")[0] == 1
    assert "'latest' is not a model version" in capsys.readouterr().err
    assert cli(cluster, "rollout-model", "gateway", V2)[0] == 1
    assert "gateway serves no model" in capsys.readouterr().err
    assert deployment(cluster, "risk").metadata.generation == generation


def test_restart_replaces_every_pod(cluster: Cluster) -> None:
    old = {p.metadata.name for p in pods(cluster, "risk")}
    code, text = cli(cluster, "restart", "risk", "--timeout", "20")
    assert code == 0 and text.startswith("risk: restarted at ")
    new = {p.metadata.name for p in pods(cluster, "risk")}
    assert len(new) == 2 and not old & new
    annotations = deployment(cluster, "risk").spec.template.metadata.annotations
    assert "kubectl.kubernetes.io/restartedAt" in annotations


def test_gpu_report_against_node_capacity(cluster: Cluster) -> None:
    code, text = cli(cluster, "--json", "gpus")
    report: dict[str, Any] = json.loads(text)
    nodes = {n["node"]: n for n in report["nodes"]}
    assert nodes["gpu-a"] == {
        "node": "gpu-a",
        "allocatable": 4,
        "capacity": 4,
        "requested": 2,
        "requested_by_cbec": 2,
        "free": 2,
        "product": "NVIDIA-H100",
        "schedulable": True,
    }
    assert (nodes["gpu-b"]["requested"], nodes["gpu-b"]["requested_by_cbec"]) == (1, 0)
    assert report["by_service"] == {"recommender": 1, "vision": 1}
    assert report["pending"] == []
    assert report["totals"] == {
        "allocatable": 5,
        "requested": 3,
        "requested_by_cbec": 2,
        "free": 2,
        "pending_cbec": 0,
    }

    assert cli(cluster, "scale", "vision", "4")[0] == 0  # 4 + recommender's 1 > gpu-a's 4 GPUs
    wait_until("4 vision pods", lambda: len(pods(cluster, "vision")) == 4)
    code, text = cli(cluster, "gpus")
    assert code == 0
    assert "pods waiting for GPUs:" in text
    pending_line = next(line for line in text.splitlines() if line.startswith("shop-cbec-vision-"))
    assert pending_line.split()[1:3] == ["vision", "1"]
    assert "Insufficient nvidia.com/gpu" in pending_line
    assert "totals: allocatable 5, requested 5, requested by cbec 4, free 0, pending cbec 1" in text
    assert ["vision", "4"] in [line.split() for line in text.splitlines()]  # GPUs per service


def test_a_concurrent_change_is_redone_not_overwritten(cluster: Cluster) -> None:
    """A write that races another writer gets 409 Conflict; cbecctl re-reads and redoes its change."""
    cbec = Cbec(cluster.api, NS)
    other = client.AppsV1Api(cluster.api)
    seen: list[str] = []

    def change(d: client.V1Deployment) -> dict[str, Any]:
        seen.append(d.metadata.resource_version)
        if len(seen) == 1:  # someone else writes between our read and our patch
            other.patch_namespaced_deployment(
                d.metadata.name,
                NS,
                {"metadata": {"annotations": {"team": "risk-sre"}}},
                _content_type="application/merge-patch+json",
            )
        return {"spec": {"replicas": 3}}

    cbec.update("risk", change)
    assert len(seen) == 2 and seen[0] != seen[1]
    after = deployment(cluster, "risk")
    assert after.spec.replicas == 3 and after.metadata.annotations["team"] == "risk-sre"
    with pytest.raises(CbecctlError, match="kept changing"):
        cbec.update(
            "risk",
            lambda d: (
                other.patch_namespaced_deployment(
                    d.metadata.name,
                    NS,
                    {"metadata": {"labels": {"n": str(time.monotonic_ns())}}},
                    _content_type="application/merge-patch+json",
                )
                and {"spec": {"replicas": 1}}
            ),
        )
    assert deployment(cluster, "risk").spec.replicas == 3


def test_no_cluster_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["--kubeconfig", str(tmp_path / "missing"), "status"], out=io.StringIO())
    assert code == 1
    assert capsys.readouterr().err.startswith("cbecctl: cannot reach a cluster")
