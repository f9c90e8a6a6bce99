"""What cbecctl does to a cluster, through the official ``kubernetes`` client.

Services are the Deployments the Helm chart labels ``app.kubernetes.io/part-of=cbec``; the service name is
their ``app.kubernetes.io/component`` label. Writes are JSON merge patches carrying the object's
resourceVersion, so a concurrent change makes them fail (409) instead of being overwritten. List calls
send label selectors and also filter on the client, so they are exact even against an API emulator
that ignores selectors.

The Deployments and autoscalers belong to a Helm release, and ``helm upgrade`` sets every field the chart
renders back to the chart's value. So cbecctl changes a model version through the runtime's model-admin
API (never the pod template); ``scale`` patches replicas or an autoscaler's bounds for the moment and
says which values make the change last; ``restart`` sets the pod-template annotation that
``kubectl rollout restart`` sets, which the chart does not render and Helm leaves alone.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from tools.cbecctl.admin import AdminApi, AdminApiError, version_of
from tools.cbecctl.errors import CbecctlError, Conflict, RolloutFailed
from tools.cbecctl.helm import release_namespace, release_of

__all__ = ["Cbec", "CbecctlError", "Conflict", "GpuReport", "RolloutFailed", "RolloutResult", "ServiceStatus"]

PART_OF = "app.kubernetes.io/part-of"
COMPONENT = "app.kubernetes.io/component"
INSTANCE = "app.kubernetes.io/instance"
MODEL_LABEL = "cbec.ai/model-version"
MODEL_SOURCE = "cbec.ai/model-source"
STATE_BACKEND_ENV = "CBEC_STATE_BACKEND"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
MODEL_ENV = "CBEC_MODEL_VERSION"
NEWEST = "newest"
VERSION_RE = re.compile(r"^[0-9]{8}T[0-9]{6,12}Z$")
MERGE_PATCH = "application/merge-patch+json"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"


@dataclass
class ServiceStatus:
    service: str
    deployment: str
    namespace: str
    desired: int
    ready: int
    updated: int
    available: int
    autoscaler: dict[str, int] | None
    gpus_per_pod: int
    gpus_requested: int
    pinned_model: str
    loaded_models: dict[str, int]
    image: str


@dataclass
class RolloutResult:
    service: str
    deployment: str
    previous_model: str
    model: str
    seconds: float
    loaded_models: dict[str, int]
    changed: bool = True
    serving_model: str = ""  # the version ``model`` resolved to (``newest``: the newest valid one)
    warnings: list[str] = field(default_factory=list)


@dataclass
class NodeGpus:
    node: str
    allocatable: int
    capacity: int
    requested: int
    requested_by_cbec: int
    free: int
    product: str
    schedulable: bool


@dataclass
class PendingGpuPod:
    pod: str
    namespace: str
    service: str
    gpus: int
    reason: str


@dataclass
class GpuReport:
    resource: str
    nodes: list[NodeGpus]
    pending: list[PendingGpuPod]
    by_service: dict[str, int]
    totals: dict[str, int] = field(default_factory=dict)


def matches(labels: Mapping[str, str] | None, selector: Mapping[str, str]) -> bool:
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def selector_string(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def quantity_to_int(value: str | int | None) -> int:
    """Extended resources (GPUs) are whole numbers; '2' -> 2, '' / None -> 0."""
    if value in (None, ""):
        return 0
    try:
        return int(str(value))
    except ValueError:
        raise CbecctlError(f"unexpected GPU quantity {value!r}") from None


def pod_gpus(pod_spec: client.V1PodSpec, resource: str) -> int:
    """GPUs a pod needs: the sum over its containers (limits, else requests), as the scheduler counts."""

    def of(container: client.V1Container) -> int:
        res = container.resources
        if res is None:
            return 0
        return quantity_to_int((res.limits or {}).get(resource) or (res.requests or {}).get(resource))

    main = sum(of(c) for c in pod_spec.containers or [])
    init = max((of(c) for c in pod_spec.init_containers or []), default=0)
    return max(main, init)


def is_ready(pod: client.V1Pod) -> bool:
    conditions = pod.status.conditions if pod.status else None
    return any(c.type == "Ready" and c.status == "True" for c in conditions or [])


def env_value(container: client.V1Container, name: str) -> str | None:
    for item in container.env or []:
        if item.name == name:
            return item.value or ""
    return None


class Cbec:
    """The cbec-ai services of one namespace (optionally one Helm release)."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        release: str | None = None,
        gpu_resource: str = DEFAULT_GPU_RESOURCE,
        sleep: Callable[[float], None] = time.sleep,
        poll_interval: float = 2.0,
    ) -> None:
        self.api = api
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.autoscaling = client.AutoscalingV2Api(api)
        self.namespace = namespace
        self.release = release
        self.gpu_resource = gpu_resource
        self.sleep = sleep
        self.poll_interval = poll_interval

    # --- finding things ---
    @property
    def selector(self) -> dict[str, str]:
        selector = {PART_OF: "cbec"}
        if self.release:
            selector[INSTANCE] = self.release
        return selector

    def deployments(self) -> list[client.V1Deployment]:
        listed = self.apps.list_namespaced_deployment(
            self.namespace, label_selector=selector_string(self.selector)
        )
        found = [d for d in listed.items if matches(d.metadata.labels, self.selector)]
        return sorted(found, key=lambda d: self.service_of(d))

    @staticmethod
    def service_of(deployment: client.V1Deployment) -> str:
        return (deployment.metadata.labels or {}).get(COMPONENT) or deployment.metadata.name

    def find(self, service: str) -> client.V1Deployment:
        deployments = self.deployments()
        for deployment in deployments:
            if self.service_of(deployment) == service:
                return deployment
        known = ", ".join(self.service_of(d) for d in deployments) or "none"
        where = f"namespace {self.namespace}" + (f", release {self.release}" if self.release else "")
        raise CbecctlError(f"no cbec service {service!r} in {where} (found: {known})")

    def pods(self, deployment: client.V1Deployment) -> list[client.V1Pod]:
        selector = deployment.spec.selector.match_labels or {}
        listed = self.core.list_namespaced_pod(self.namespace, label_selector=selector_string(selector))
        return [p for p in listed.items if matches(p.metadata.labels, selector)]

    def autoscaler(self, deployment: client.V1Deployment) -> client.V2HorizontalPodAutoscaler | None:
        for hpa in self.autoscaling.list_namespaced_horizontal_pod_autoscaler(self.namespace).items:
            ref = hpa.spec.scale_target_ref
            if ref.kind == "Deployment" and ref.name == deployment.metadata.name:
                return hpa
        return None

    def main_container(self, deployment: client.V1Deployment) -> client.V1Container:
        containers = deployment.spec.template.spec.containers
        service = self.service_of(deployment)
        return next((c for c in containers if c.name == service), containers[0])

    # --- reading state ---
    def loaded_models(self, deployment: client.V1Deployment) -> dict[str, int]:
        """Model versions the ready pods report serving (their model_info metric), with pod counts.

        Read through the API server's pod proxy; a pod whose metrics cannot be read counts as '?'.
        """
        counts: dict[str, int] = {}
        for version in self.serving_versions(deployment).values():
            counts[version] = counts.get(version, 0) + 1
        return dict(sorted(counts.items()))

    def pod_model_version(self, pod: client.V1Pod) -> str:
        port = next(
            (p.container_port for c in pod.spec.containers for p in c.ports or [] if p.name == "metrics"),
            None,
        )
        if port is None:
            return "?"
        try:
            text = self.core.connect_get_namespaced_pod_proxy_with_path(
                f"{pod.metadata.name}:{port}", self.namespace, "metrics", _request_timeout=5
            )
        except (client.ApiException, OSError):
            return "?"
        for family in text_string_to_metric_families(str(text)):
            if family.name == "model_info":
                for sample in family.samples:
                    if sample.value == 1 and sample.labels.get("version"):
                        return sample.labels["version"]
        return "none"

    def status(self, with_loaded: bool = True) -> list[ServiceStatus]:
        result = []
        for deployment in self.deployments():
            st = deployment.status or client.V1DeploymentStatus()
            desired = deployment.spec.replicas if deployment.spec.replicas is not None else 1
            hpa = self.autoscaler(deployment)
            container = self.main_container(deployment)
            gpus = pod_gpus(deployment.spec.template.spec, self.gpu_resource)
            pinned = env_value(container, MODEL_ENV)
            result.append(
                ServiceStatus(
                    service=self.service_of(deployment),
                    deployment=deployment.metadata.name,
                    namespace=self.namespace,
                    desired=desired,
                    ready=st.ready_replicas or 0,
                    updated=st.updated_replicas or 0,
                    available=st.available_replicas or 0,
                    autoscaler=(
                        {"min": hpa.spec.min_replicas or 1, "max": hpa.spec.max_replicas} if hpa else None
                    ),
                    gpus_per_pod=gpus,
                    gpus_requested=gpus * desired,
                    pinned_model="-" if pinned is None else (pinned or NEWEST),
                    loaded_models=self.loaded_models(deployment)
                    if with_loaded and pinned is not None
                    else {},
                    image=container.image or "",
                )
            )
        return result

    # --- changing state ---
    def _patch(self, deployment: client.V1Deployment, body: dict[str, Any]) -> client.V1Deployment:
        """Merge-patch a deployment as of the version read (409 Conflict if it changed since)."""
        if deployment.metadata.resource_version:
            body.setdefault("metadata", {})["resourceVersion"] = deployment.metadata.resource_version
        try:
            return self.apps.patch_namespaced_deployment(
                deployment.metadata.name, self.namespace, body, _content_type=MERGE_PATCH
            )
        except client.ApiException as exc:
            if exc.status == 409:
                raise Conflict(deployment.metadata.name) from None
            raise

    def update(
        self, service: str, change: Callable[[client.V1Deployment], dict[str, Any]], attempts: int = 5
    ) -> client.V1Deployment:
        """Read the service's deployment, patch it with ``change(deployment)``; when someone else (a
        controller writing status, another SRE) changed it in between, read it again and redo the change."""
        for _ in range(attempts):
            deployment = self.find(service)
            try:
                return self._patch(deployment, change(deployment))
            except Conflict:
                continue
        raise CbecctlError(f"{service}'s deployment kept changing during {attempts} attempts; try again")

    def scale(
        self,
        service: str,
        replicas: int | None,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
    ) -> dict[str, Any]:
        """Set a service's replicas, or its autoscaler's bounds when an HPA owns the replica count.

        The result names the Helm release that manages the object (``helm_release``) and the values that
        keep the change through the next ``helm upgrade`` (``helm_values``), which would otherwise undo it.
        """
        deployment = self.find(service)
        hpa = self.autoscaler(deployment)
        if hpa is not None:
            if min_replicas is None and max_replicas is None:
                raise CbecctlError(
                    f"{service} is autoscaled by HorizontalPodAutoscaler {hpa.metadata.name} "
                    f"(min {hpa.spec.min_replicas or 1}, max {hpa.spec.max_replicas}): "
                    "pass --min/--max to change its bounds"
                )
            low = min_replicas if min_replicas is not None else hpa.spec.min_replicas or 1
            high = max_replicas if max_replicas is not None else hpa.spec.max_replicas
            if low < 1 or low > high:
                raise CbecctlError(f"invalid autoscaling bounds: min {low}, max {high}")
            self.autoscaling.patch_namespaced_horizontal_pod_autoscaler(
                hpa.metadata.name,
                self.namespace,
                {"spec": {"minReplicas": low, "maxReplicas": high}},
                _content_type=MERGE_PATCH,
            )
            return {
                "service": service,
                "autoscaler": hpa.metadata.name,
                "min": low,
                "max": high,
                **self._helm_note(
                    hpa.metadata,
                    {
                        f"services.{service}.autoscaling.minReplicas": low,
                        f"services.{service}.autoscaling.maxReplicas": high,
                    },
                ),
            }
        if min_replicas is not None or max_replicas is not None:
            raise CbecctlError(f"{service} has no autoscaler; give a replica count instead of --min/--max")
        if replicas is None or replicas < 0:
            raise CbecctlError("give the number of replicas (0 or more)")
        container = self.main_container(deployment)
        strategy = deployment.spec.strategy.type if deployment.spec.strategy else None
        if replicas > 1 and env_value(container, STATE_BACKEND_ENV) == "embedded" and strategy == "Recreate":
            raise CbecctlError(
                f"{service} keeps its state on one ReadWriteOnce volume (state.backend=embedded): it runs "
                "one replica; more need the shared state backend (state.backend=shared)"
            )
        previous = deployment.spec.replicas
        self.update(service, lambda _: {"spec": {"replicas": replicas}})
        return {
            "service": service,
            "deployment": deployment.metadata.name,
            "from": previous,
            "to": replicas,
            **self._helm_note(deployment.metadata, {f"services.{service}.replicas": replicas}),
        }

    @staticmethod
    def _helm_note(metadata: client.V1ObjectMeta, values: dict[str, Any]) -> dict[str, Any]:
        release = release_of(metadata)
        if release is None:
            return {}
        return {"helm_release": release, "helm_namespace": release_namespace(metadata), "helm_values": values}

    def pin_values(self, service: str, version: str) -> dict[str, Any]:
        """The Helm values that pin a service's model version in its release (``newest``: un-pin)."""
        if version != NEWEST and not VERSION_RE.match(version):
            raise CbecctlError(
                f"{version!r} is not a model version (a UTC timestamp like 20261129T030512123456Z)"
                " or 'newest'"
            )
        deployment = self.find(service)
        current = env_value(self.main_container(deployment), MODEL_ENV)
        if current is None:
            raise CbecctlError(f"{service} serves no model ({MODEL_ENV} is not set on its container)")
        note = self._helm_note(
            deployment.metadata, {f"services.{service}.modelVersion": "" if version == NEWEST else version}
        )
        if not note:
            raise CbecctlError(
                f"{service}'s Deployment {deployment.metadata.name} is not managed by Helm: there are no "
                "values to set"
            )
        return {"service": service, "pinned": current or NEWEST, "version": version, **note}

    def restart(self, service: str, timeout: float | None) -> dict[str, Any]:
        """Roll every pod of a service (as ``kubectl rollout restart``), optionally waiting."""
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        patched = self.update(
            service, lambda _: {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}
        )
        started = time.monotonic()
        if timeout is not None:
            self.wait_rollout(service, patched, timeout)
        return {"service": service, "restartedAt": stamp, "seconds": round(time.monotonic() - started, 1)}

    # --- model roll-outs: the model-admin API, never the Helm-managed Deployment ---
    def model_rollout_checks(self, deployment: client.V1Deployment) -> list[str]:
        """Refuse a roll-out through the admin API where it could not reach every replica or would be
        undone by the pods themselves; return warnings for what it allows with a caveat."""
        service = self.service_of(deployment)
        container = self.main_container(deployment)
        values_pin = env_value(container, MODEL_ENV)
        if values_pin is None:
            raise CbecctlError(f"{service} serves no model ({MODEL_ENV} is not set on its container)")
        if values_pin:
            raise CbecctlError(
                f"{service} is pinned to model {values_pin} by its Deployment ({MODEL_ENV}, the Helm value "
                f"services.{service}.modelVersion), which every replica prefers to the admin API's choice: "
                f"change that pin with values (`cbecctl pin-model {service} VERSION` prints the helm "
                f"command), or remove it (`cbecctl pin-model {service} newest`) to roll out through the "
                "admin API"
            )
        annotations = deployment.spec.template.metadata.annotations or {}
        if annotations.get(MODEL_SOURCE) == "objectStore":
            raise CbecctlError(
                f"{service}'s pods copy one model version from the object store when they start "
                "(models.source=objectStore), so they cannot switch to another one through the admin API: "
                f"pin it with values (`cbecctl pin-model {service} VERSION` prints the helm command)"
            )
        backend = env_value(container, STATE_BACKEND_ENV) or "embedded"
        if backend == "shared":
            return []
        replicas = deployment.spec.replicas if deployment.spec.replicas is not None else 1
        if replicas > 1 or self.autoscaler(deployment) is not None:
            raise CbecctlError(
                f"{service} uses the {backend} state backend: an admin API call reaches one of its replicas "
                "and the others never hear of it; pin the version with values instead "
                f"(`cbecctl pin-model {service} VERSION` prints the helm command)"
            )
        return [
            f"{service} uses the {backend} state backend: the version is chosen in its one pod only, and a "
            "restarted pod loads the newest version again; to keep it, pin it with values "
            f"(`cbecctl pin-model {service} VERSION`)"
        ]

    def rollout_model(
        self,
        service: str,
        version: str,
        admin: AdminApi,
        timeout: float,
        undo_on_failure: bool = True,
    ) -> RolloutResult:
        """Serve a model version (or un-pin with ``newest``) on every replica through the model-admin API,
        then wait until every ready pod reports serving it; on failure or timeout put the previous version
        back the same way. The Deployment is never patched, so ``helm upgrade`` has nothing to undo."""
        if version != NEWEST and not VERSION_RE.match(version):
            raise CbecctlError(
                f"{version!r} is not a model version (a UTC timestamp like 20261129T030512123456Z)"
                " or 'newest'"
            )
        deployment = self.find(service)
        warnings = self.model_rollout_checks(deployment)
        before = self.serving_versions(deployment)
        if before and set(before.values()) == {"?"}:
            raise CbecctlError(
                f"cannot verify a roll-out of {service}: no pod's /metrics can be read through the API "
                "server's pod proxy (cbecctl needs get on pods/proxy in this namespace)"
            )
        store = admin.status(service)
        entries = [e for e in store.get("versions") or [] if isinstance(e, dict)]
        valid = sorted(str(e["version"]) for e in entries if e.get("valid") and e.get("version"))
        if version != NEWEST and version not in valid:
            entry = next((e for e in entries if e.get("version") == version), None)
            state = (
                f"not valid ({entry.get('error') or 'no manifest'})" if entry else "not in the model store"
            )
            raise CbecctlError(
                f"{service}: model version {version} is {state}; valid versions: "
                + (", ".join(valid[-5:]) if valid else "none")
            )
        if not valid:
            raise CbecctlError(f"{service}: the model store holds no valid version")
        known = {v for v in before.values() if VERSION_RE.match(v)}
        previous = known.pop() if len(known) == 1 else version_of(store.get("serving"))
        started = time.monotonic()
        deadline = started + timeout
        try:
            answer = admin.load(service, "" if version == NEWEST else version, min(max(timeout, 1), 60))
        except AdminApiError as exc:
            if exc.nothing_changed:
                raise RolloutFailed(
                    f"{service}: model {version} not rolled out, nothing changed: {exc}"
                ) from None
            self._roll_back(
                deployment, admin, previous, RolloutFailed(f"{service}: {exc}"), timeout, undo_on_failure
            )
        expected = version if version != NEWEST else version_of(answer.get("serving")) or valid[-1]
        try:
            # un-pinned replicas may already have moved on to a version a training job just wrote
            loaded = self.wait_serving(deployment, expected, timeout, deadline, newer_ok=version == NEWEST)
        except RolloutFailed as failure:
            self._roll_back(deployment, admin, previous, failure, timeout, undo_on_failure)
        return RolloutResult(
            service,
            deployment.metadata.name,
            previous or "?",
            version,
            round(time.monotonic() - started, 1),
            loaded,
            changed=set(before.values()) != {expected},
            serving_model=expected,
            warnings=warnings,
        )

    def _roll_back(
        self,
        deployment: client.V1Deployment,
        admin: AdminApi,
        previous: str,
        failure: RolloutFailed,
        timeout: float,
        undo: bool,
    ) -> NoReturn:
        """Put the version served before back through the admin API and wait for it; always raises."""
        service = self.service_of(deployment)
        if not undo:
            raise RolloutFailed(f"{failure}; not rolled back (--no-undo)")
        if not VERSION_RE.match(previous or ""):
            raise RolloutFailed(f"{failure}; not rolled back: the version served before is unknown")
        try:
            admin.load(service, previous, min(max(timeout, 1), 60))
            self.wait_serving(deployment, previous, timeout)
        except CbecctlError as undo_failure:
            raise RolloutFailed(
                f"{failure}; rolling back to model {previous} failed too: {undo_failure}"
            ) from None
        raise RolloutFailed(
            f"{failure}; rolled back to model {previous} through the admin API"
            f" (it stays pinned; `cbecctl rollout-model {service} newest` un-pins)"
        )

    def serving_versions(self, deployment: client.V1Deployment) -> dict[str, str]:
        """Ready pod -> the model version it reports serving ('?' unreadable, 'none' no model)."""
        return {
            pod.metadata.name: self.pod_model_version(pod)
            for pod in sorted(self.pods(deployment), key=lambda p: p.metadata.name)
            if is_ready(pod)
        }

    def wait_serving(
        self,
        deployment: client.V1Deployment,
        version: str,
        timeout: float,
        deadline: float | None = None,
        newer_ok: bool = False,
    ) -> dict[str, int]:
        """Wait until there are ready pods and every one reports serving ``version`` (or, ``newer_ok``, a
        later one) for at most ``timeout`` seconds, or until ``deadline`` on the monotonic clock; returns
        the versions served with their pod counts."""
        service = self.service_of(deployment)
        deadline = time.monotonic() + timeout if deadline is None else deadline

        def good(v: str) -> bool:
            return v == version or (newer_ok and VERSION_RE.match(v) is not None and v > version)

        while True:
            serving = self.serving_versions(deployment)
            if serving and all(good(v) for v in serving.values()):
                counts: dict[str, int] = {}
                for v in serving.values():
                    counts[v] = counts.get(v, 0) + 1
                return dict(sorted(counts.items()))
            if time.monotonic() >= deadline:
                words = {"?": "metrics unreadable", "none": "no model loaded"}
                behind = [f"{pod} {words.get(v, 'serves ' + v)}" for pod, v in serving.items() if not good(v)]
                raise RolloutFailed(
                    f"{service}: not every ready pod serves model {version} after {timeout:g}s ("
                    + (", ".join(behind) if serving else "no ready pods")
                    + ")"
                )
            self.sleep(self.poll_interval)

    def wait_rollout(self, service: str, patched: client.V1Deployment, timeout: float) -> None:
        """Wait until the deployment's new pods are all updated and available (``kubectl rollout status``).

        Fails at once when Kubernetes reports the progress deadline exceeded, and on timeout, naming the
        pods that are not ready and why.
        """
        name = patched.metadata.name
        wanted_generation = patched.metadata.generation or 0
        deadline = time.monotonic() + timeout
        progress = "waiting for the deployment controller"
        while True:
            deployment = self.apps.read_namespaced_deployment(name, self.namespace)
            st = deployment.status or client.V1DeploymentStatus()
            desired = deployment.spec.replicas if deployment.spec.replicas is not None else 1
            for condition in st.conditions or []:
                if condition.type == "Progressing" and condition.reason == "ProgressDeadlineExceeded":
                    raise RolloutFailed(
                        f"{service}: roll-out stalled ({condition.message or 'progress deadline exceeded'})"
                        + self._not_ready_pods(deployment)
                    )
            generation = max(deployment.metadata.generation or 0, wanted_generation)
            updated, replicas, available = (
                st.updated_replicas or 0,
                st.replicas or 0,
                st.available_replicas or 0,
            )
            if (st.observed_generation or 0) < generation:
                progress = "waiting for the deployment controller to see the change"
            elif updated < desired:
                progress = f"{updated} of {desired} pods updated"
            elif replicas > updated:
                progress = f"{updated} of {desired} pods updated, {replicas - updated} old pods still running"
            elif available < updated:
                progress = f"{available} of {updated} updated pods available"
            else:
                return
            if time.monotonic() >= deadline:
                raise RolloutFailed(
                    f"{service}: roll-out not finished after {timeout:g}s ({progress})"
                    + self._not_ready_pods(deployment)
                )
            self.sleep(self.poll_interval)

    def _not_ready_pods(self, deployment: client.V1Deployment) -> str:
        problems = []
        for pod in self.pods(deployment):
            if is_ready(pod):
                continue
            reasons = []
            status = pod.status or client.V1PodStatus()
            for cs in (status.init_container_statuses or []) + (status.container_statuses or []):
                state = cs.state
                if state and state.waiting and state.waiting.reason:
                    reasons.append(f"{cs.name}: {state.waiting.reason}")
                elif state and state.terminated and state.terminated.exit_code:
                    reasons.append(
                        f"{cs.name}: exited {state.terminated.exit_code} ({state.terminated.reason})"
                    )
                elif not cs.ready:
                    reasons.append(f"{cs.name}: not ready")
                if cs.restart_count:
                    reasons.append(f"{cs.restart_count} restarts")
            for condition in status.conditions or []:
                if condition.type == "PodScheduled" and condition.status == "False":
                    reasons.append(f"unschedulable: {condition.message or condition.reason}")
            model = (pod.metadata.labels or {}).get(MODEL_LABEL, "?")
            problems.append(
                f"{pod.metadata.name} (model {model}, {status.phase or 'Unknown'}"
                + (f": {'; '.join(reasons)}" if reasons else "")
                + ")"
            )
        return "; pods not ready: " + ", ".join(problems) if problems else ""

    # --- GPUs ---
    def gpu_report(self) -> GpuReport:
        """GPU requests of all pods per node against node capacity, and cbec pods waiting for GPUs."""
        resource = self.gpu_resource
        nodes = {}
        for node in self.core.list_node().items:
            status = node.status or client.V1NodeStatus()
            labels = node.metadata.labels or {}
            nodes[node.metadata.name] = NodeGpus(
                node=node.metadata.name,
                allocatable=quantity_to_int((status.allocatable or {}).get(resource)),
                capacity=quantity_to_int((status.capacity or {}).get(resource)),
                requested=0,
                requested_by_cbec=0,
                free=0,
                product=labels.get("nvidia.com/gpu.product", ""),
                schedulable=not (node.spec and node.spec.unschedulable),
            )
        pending: list[PendingGpuPod] = []
        by_service: dict[str, int] = {}
        for pod in self.core.list_pod_for_all_namespaces().items:
            phase = pod.status.phase if pod.status else None
            if phase in ("Succeeded", "Failed"):
                continue
            gpus = pod_gpus(pod.spec, resource)
            if gpus == 0:
                continue
            labels = pod.metadata.labels or {}
            is_cbec = matches(labels, self.selector) and pod.metadata.namespace == self.namespace
            service = labels.get(COMPONENT, "") if is_cbec else ""
            node = nodes.get(pod.spec.node_name or "")
            if node is not None:
                node.requested += gpus
                if is_cbec:
                    node.requested_by_cbec += gpus
            elif is_cbec:
                reason = next(
                    (
                        c.message or c.reason or ""
                        for c in (pod.status.conditions if pod.status else None) or []
                        if c.type == "PodScheduled" and c.status == "False"
                    ),
                    "not scheduled yet",
                )
                pending.append(
                    PendingGpuPod(pod.metadata.name, pod.metadata.namespace, service, gpus, reason)
                )
            if is_cbec:
                by_service[service] = by_service.get(service, 0) + gpus
        for node in nodes.values():
            node.free = max(node.allocatable - node.requested, 0)
        report = GpuReport(
            resource, sorted(nodes.values(), key=lambda n: n.node), pending, dict(sorted(by_service.items()))
        )
        report.totals = {
            "allocatable": sum(n.allocatable for n in report.nodes),
            "requested": sum(n.requested for n in report.nodes),
            "requested_by_cbec": sum(n.requested_by_cbec for n in report.nodes),
            "free": sum(n.free for n in report.nodes if n.schedulable),
            "pending_cbec": sum(p.gpus for p in pending),
        }
        return report
