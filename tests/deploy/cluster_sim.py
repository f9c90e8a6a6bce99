"""A small Kubernetes for the SRE tool's tests: kmock's API emulator on 127.0.0.1 plus what a real
cluster adds around the API.

- ``ClusterEmulator``: what the API server does on writes and kmock does not: ``metadata.generation``
  bumps on spec changes, ``resourceVersion`` (with 409 Conflict on a stale one), uid, creation time and
  default replicas; and a bounded request history (kmock's grows without end).
- ``Controllers``: a thread that plays the deployment and HPA controllers, the scheduler and the kubelet
  through the real ``kubernetes`` client: it creates one pod per replica of each Deployment's current
  template, places GPU pods on nodes with free GPUs, marks pods ready after a moment (never, for a model
  version marked broken), removes old pods once the new ones are ready, and writes the Deployment status.
- Each pod's /metrics (read by cbecctl through the API server's pod proxy) comes from the runtime's own
  ``RuntimeMetrics``, reporting the model version that pod serves.

Everything cbecctl does goes over HTTP to the emulator with the unmodified ``kubernetes`` client.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kmock
import yaml
from kmock._internal import enums
from kubernetes import client
from prometheus_client import generate_latest

from services.runtime.metrics import RuntimeMetrics
from tools.cbecctl.kube import is_ready

GPU = "nvidia.com/gpu"
RESOURCES = ["apps/v1/deployments", "v1/pods", "v1/nodes", "autoscaling/v2/horizontalpodautoscalers"]
MERGE = "application/merge-patch+json"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API server's bookkeeping of generation and resourceVersion."""

    _versions = itertools.count(1000)

    async def _handle(self, request: kmock.Request) -> Any:
        # kmock keeps every request for assertions and scans that history to match each new one,
        # which makes a long-running emulator quadratic; these tests never assert on old requests.
        if len(self._requests) > 64:
            del self._requests[:-16]
            for payload in self._payloads:
                del payload._requests[:-16]
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.action == enums.action.CREATE:
                meta.update(
                    generation=1,
                    uid=str(uuid.uuid4()),
                    creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                )
                if request.resource.plural == "deployments":  # API server defaulting
                    data.setdefault("spec", {}).setdefault("replicas", 1)
            elif request.action == enums.action.UPDATE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    current = self.objects[key].raw
                    old_meta = current.get("metadata", {})
                    sent = meta.get("resourceVersion")
                    if sent is not None and sent != old_meta.get("resourceVersion"):
                        raise kmock.KubernetesError(
                            status=409, reason="Conflict", message="the object has been modified"
                        )
                    spec_changes = data.get("spec") if request.subresource is None else None
                    if spec_changes and merge_patch(current.get("spec"), spec_changes) != current.get("spec"):
                        meta["generation"] = int(old_meta.get("generation", 1)) + 1
            meta["resourceVersion"] = str(next(self._versions))
        return await super()._handle(request)


@dataclass
class Node:
    name: str
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    unschedulable: bool = False


def template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


class Controllers(threading.Thread):
    """Deployment controller, scheduler and kubelet, acting through the API like the real ones."""

    def __init__(self, api: client.ApiClient, namespace: str, ready_after: float = 0.1) -> None:
        super().__init__(daemon=True, name="controllers")
        self.api = api
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.ready_after = ready_after
        self.broken_versions: set[str] = set()
        self.newest: dict[str, str] = {}  # service -> newest version in the model store
        self.started_at: dict[str, float] = {}  # pod -> creation time
        self.rollout_started: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.errors: list[BaseException] = []
        self.pod_versions: dict[str, str] = {}  # pod -> model version it serves (when ready)

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                with self.lock:
                    self.reconcile()
            except BaseException as exc:  # surfaced by the fixture
                self.errors.append(exc)
                return
            time.sleep(0.02)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)

    # --- one pass ---
    def reconcile(self) -> None:
        deployments = self.apps.list_namespaced_deployment(self.namespace).items
        if self.autoscale(deployments):
            deployments = self.apps.list_namespaced_deployment(self.namespace).items
        nodes = self.core.list_node().items
        all_pods = self.core.list_pod_for_all_namespaces().items
        for deployment in deployments:
            self.reconcile_deployment(deployment, nodes, all_pods)

    def autoscale(self, deployments: list[client.V1Deployment]) -> bool:
        """The HPA controller, minus metrics: keeps each target's replicas within [min, max]."""
        by_name = {d.metadata.name: d for d in deployments}
        changed = False
        for hpa in (
            client.AutoscalingV2Api(self.api).list_namespaced_horizontal_pod_autoscaler(self.namespace).items
        ):
            target = by_name[hpa.spec.scale_target_ref.name]
            wanted = min(max(target.spec.replicas or 1, hpa.spec.min_replicas or 1), hpa.spec.max_replicas)
            if wanted != target.spec.replicas:
                self.apps.patch_namespaced_deployment(
                    target.metadata.name, self.namespace, {"spec": {"replicas": wanted}}, _content_type=MERGE
                )
                changed = True
        return changed

    def reconcile_deployment(
        self, deployment: client.V1Deployment, nodes: list[client.V1Node], all_pods: list[client.V1Pod]
    ) -> None:
        raw = self.api.sanitize_for_serialization(deployment)
        name = deployment.metadata.name
        template = raw["spec"]["template"]
        current = template_hash(template)
        desired = raw["spec"].get("replicas", 1)
        selector = raw["spec"]["selector"]["matchLabels"]
        pods = [
            p
            for p in all_pods
            if p.metadata.namespace == self.namespace
            and all((p.metadata.labels or {}).get(k) == v for k, v in selector.items())
        ]
        new = [p for p in pods if p.metadata.labels.get("pod-template-hash") == current]
        old = [p for p in pods if p not in new]
        self.rollout_started.setdefault((name, current), time.monotonic())
        taken = {p.metadata.name for p in pods}
        index = 0
        while len(new) < desired:
            while f"{name}-{current}-{index}" in taken:
                index += 1
            pod = self.create_pod(f"{name}-{current}-{index}", current, template, nodes, all_pods)
            all_pods.append(pod)
            taken.add(pod.metadata.name)
            new.append(pod)
        for extra in sorted(new, key=lambda p: p.metadata.name)[desired:]:
            self.delete_pod(extra)
            new.remove(extra)
        now = time.monotonic()
        ready = []
        for pod in new:
            if pod.spec.node_name and now - self.started_at.get(pod.metadata.name, now) >= self.ready_after:
                version = self.serving_version(pod)
                ok = version not in self.broken_versions
                if is_ready(pod) != ok or not pod.status.container_statuses:
                    self.set_pod_status(pod, ready=ok, restarts=0 if ok else 2)
                if ok:
                    self.pod_versions[pod.metadata.name] = version
                    ready.append(pod)
        if len(ready) == desired:
            for pod in old:
                self.delete_pod(pod)
            old = []
        old_ready = sum(1 for p in old if p.metadata.name in self.pod_versions)
        status: dict[str, Any] = {
            "observedGeneration": deployment.metadata.generation,
            "replicas": len(new) + len(old),
            "updatedReplicas": len(new),
            "readyReplicas": len(ready) + old_ready,
            "availableReplicas": len(ready) + old_ready,
        }
        deadline = raw["spec"].get("progressDeadlineSeconds", 600)
        if len(ready) < desired and now - self.rollout_started[(name, current)] > deadline:
            status["conditions"] = [
                {
                    "type": "Progressing",
                    "status": "False",
                    "reason": "ProgressDeadlineExceeded",
                    "message": f'ReplicaSet "{name}-{current}" has timed out progressing.',
                }
            ]
        else:
            status["conditions"] = [
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}
            ]
        if raw.get("status") != status:  # like the real controller: write only what changed
            self.apps.patch_namespaced_deployment_status(
                name, self.namespace, {"status": status}, _content_type=MERGE
            )

    def serving_version(self, pod: client.V1Pod) -> str:
        container = pod.spec.containers[0]
        pinned = next((e.value for e in container.env or [] if e.name == "CBEC_MODEL_VERSION"), None)
        return pinned or self.newest.get(pod.metadata.labels["app.kubernetes.io/component"], "none")

    def create_pod(
        self,
        name: str,
        current: str,
        template: dict[str, Any],
        nodes: list[client.V1Node],
        all_pods: list[client.V1Pod],
    ) -> client.V1Pod:
        spec = copy.deepcopy(template["spec"])
        gpus = sum(int(c.get("resources", {}).get("limits", {}).get(GPU, 0)) for c in spec["containers"])
        node = self.schedule(spec, gpus, nodes, all_pods)
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {**template["metadata"]["labels"], "pod-template-hash": current},
                "annotations": template["metadata"].get("annotations", {}),
            },
            "spec": {**spec, **({"nodeName": node} if node else {})},
            "status": {"phase": "Pending"},
        }
        if node is None:
            body["status"]["conditions"] = [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": f"0/{len(nodes)} nodes are available: {len(nodes)} Insufficient {GPU}.",
                }
            ]
        pod = self.core.create_namespaced_pod(self.namespace, body)
        self.started_at[name] = time.monotonic()
        return pod

    def schedule(
        self, spec: dict[str, Any], gpus: int, nodes: list[client.V1Node], pods: list[client.V1Pod]
    ) -> str | None:
        for node in nodes:
            labels = node.metadata.labels or {}
            if node.spec and node.spec.unschedulable:
                continue
            if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
                continue
            capacity = int((node.status.allocatable or {}).get(GPU, "0"))
            taken = sum(
                int(c.resources.limits.get(GPU, "0"))
                for p in pods
                if p.spec.node_name == node.metadata.name
                for c in p.spec.containers
                if c.resources and c.resources.limits
            )
            if gpus <= capacity - taken and (gpus > 0) == (capacity > 0):
                return str(node.metadata.name)
        return None

    def set_pod_status(self, pod: client.V1Pod, ready: bool, restarts: int = 0) -> None:
        container = pod.spec.containers[0]
        status = {
            "phase": "Running",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "True" if ready else "False"},
            ],
            "containerStatuses": [
                {
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "ready": ready,
                    "restartCount": restarts,
                    "started": True,
                    "state": {"running": {"startedAt": "2026-11-29T03:00:00Z"}},
                }
            ],
        }
        self.core.patch_namespaced_pod_status(
            pod.metadata.name, self.namespace, {"status": status}, _content_type=MERGE
        )

    def delete_pod(self, pod: client.V1Pod) -> None:
        self.core.delete_namespaced_pod(pod.metadata.name, self.namespace)
        self.started_at.pop(pod.metadata.name, None)
        self.pod_versions.pop(pod.metadata.name, None)

    def metrics(self, pod: str) -> str:
        """The pod's /metrics as the runtime renders it, for the model version the pod serves."""
        service = re.sub(r"^.*-cbec-(\w+)-[0-9a-f]{10}-\d+$", r"\1", pod)
        metrics = RuntimeMetrics(service)
        metrics.set_model_version(self.pod_versions.get(pod))
        return generate_latest(metrics.registry).decode()


@dataclass
class Cluster:
    url: str
    emulator: ClusterEmulator
    api: client.ApiClient
    controllers: Controllers
    kubeconfig: Path
    namespace: str

    def add_node(self, node: Node) -> None:
        status = (
            {"capacity": {GPU: str(node.gpus)}, "allocatable": {GPU: str(node.gpus)}} if node.gpus else {}
        )
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": node.labels},
            "spec": {"unschedulable": node.unschedulable},
            "status": status,
        }
        client.CoreV1Api(self.api).create_node(body)

    def apply(self, manifests: list[dict[str, Any]]) -> None:
        """Create the chart's Deployments and HorizontalPodAutoscalers (what cbecctl works with)."""
        apps, autoscaling = client.AppsV1Api(self.api), client.AutoscalingV2Api(self.api)
        for doc in manifests:
            if doc["kind"] == "Deployment":
                apps.create_namespaced_deployment(self.namespace, doc)
            elif doc["kind"] == "HorizontalPodAutoscaler":
                autoscaling.create_namespaced_horizontal_pod_autoscaler(self.namespace, doc)

    def wait_settled(self, timeout: float = 20) -> None:
        """Until every Deployment's pods are all ready on its current template."""
        apps = client.AppsV1Api(self.api)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.controllers.errors:
                raise self.controllers.errors[0]
            deployments = apps.list_namespaced_deployment(self.namespace).items
            if all(
                d.status
                and d.status.observed_generation == d.metadata.generation
                and (d.status.ready_replicas or 0) == d.spec.replicas == (d.status.replicas or 0)
                for d in deployments
            ):
                return
            time.sleep(0.05)
        raise TimeoutError("the simulated cluster did not settle")


@contextmanager
def running_cluster(tmp: Path, namespace: str) -> Iterator[Cluster]:
    """An emulated cluster on 127.0.0.1 with its controllers running, and a kubeconfig for it."""
    started = threading.Event()
    stop: dict[str, Any] = {}
    box: dict[str, Any] = {}

    async def serve() -> None:
        async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
            for resource in RESOURCES:
                emulator.resources[resource] = {}
            box["emulator"], box["url"] = emulator, str(server.url).rstrip("/")
            done = asyncio.Event()
            stop["loop"], stop["event"] = asyncio.get_running_loop(), done
            started.set()
            await done.wait()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True, name="kmock")
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the Kubernetes emulator did not start")
    emulator: ClusterEmulator = box["emulator"]
    kubeconfig = tmp / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": box["url"]}}],
                "users": [{"name": "sre", "user": {"token": "test-token"}}],
                "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "sre"}}],
                "current-context": "emulator",
            }
        )
    )
    configuration = client.Configuration()
    configuration.host = box["url"]
    api = client.ApiClient(configuration)
    controllers = Controllers(client.ApiClient(configuration), namespace)
    emulator["get", re.compile(r"/api/v1/namespaces/[^/]+/pods/[^/]+/proxy/metrics")] << (
        lambda request: controllers.metrics(request.name.split(":")[0])
    )
    controllers.start()
    try:
        yield Cluster(box["url"], emulator, api, controllers, kubeconfig, namespace)
    finally:
        controllers.stop()
        stop["loop"].call_soon_threadsafe(stop["event"].set)
        thread.join(timeout=10)
