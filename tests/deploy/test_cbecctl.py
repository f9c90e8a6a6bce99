"""cbecctl against a Kubernetes API on 127.0.0.1 (kmock's emulator, see cluster_sim.py), driven through
its command line with a kubeconfig, with the real ``kubernetes`` client and the chart's own manifests.

Model roll-outs go through the gateway's model-admin HTTP routes, played here by a real aiohttp server
(``FakeGateway``) that behaves like the runtime with the shared state backend: the replica that takes
``model:load`` switches at once, the other replicas follow the shared choice a moment later, and a
version pinned in the Deployment (``CBEC_MODEL_VERSION``, from Helm values) wins over it."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
from aiohttp import web
from kubernetes import client

from tests.deploy.cluster_sim import Cluster, Node, running_cluster
from tests.deploy.conftest import CHART, helm_template, tool
from tools.cbecctl.cli import run
from tools.cbecctl.kube import Cbec, CbecctlError

NS = "shop"
V1 = "20261101T000000000000Z"
V2 = "20261115T120000000000Z"
NEWEST = "20261120T080000000000Z"
BROKEN = "20261125T000000000000Z"
MISSING = "20261127T000000000000Z"
ADMIN_KEY = "cbec-admin-7f3c9a51e2"
READ_ONLY_KEY = "cbec-storefront-0b8d"  # a valid key without the 'admin' scope
VALUES = {
    "services": {
        "recommender": {"gpu": {"count": 1}, "modelVersion": V1},
        "vision": {"gpu": {"count": 1}},
        "chat": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}},
        "risk": {"replicas": 2},
    }
}
MERGE = "application/merge-patch+json"


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


@dataclass
class Pin:
    version: str  # '' = un-pinned: the newest valid version
    at: float
    taker: str  # the replica that took the call


class FakeGateway:
    """``GET /v1/admin/{service}/model`` and ``POST /v1/admin/{service}/model:load`` on 127.0.0.1, acting
    on the emulator's pods: it replaces the simulated kubelet's choice of the version a pod serves."""

    def __init__(self, cluster: Cluster, key_file: Path) -> None:
        self.controllers = cluster.controllers
        self.key_file = key_file
        self.store = {V1, V2, NEWEST, BROKEN}  # valid versions in the model store
        self.unloadable: set[str] = set()  # valid manifests whose model fails to load
        self.lagging: set[str] = set()  # pods that do not follow the shared choice
        self.fail_after_switch: int | None = None  # answer this HTTP status after switching
        self.follow_s = 0.3
        self.pins: dict[str, Pin] = {}
        self.served: dict[str, str] = {}
        self.calls: list[tuple[str, str, Any, str | None]] = []
        self.controllers.serving_version = self.serving_version  # type: ignore[method-assign]
        self.url = ""
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._started = threading.Event()

    # --- the runtime's behaviour (called by the simulated kubelet, under controllers.lock) ---
    def serving_version(self, pod: client.V1Pod) -> str:
        name = pod.metadata.name
        service = pod.metadata.labels["app.kubernetes.io/component"]
        env = next((e.value for e in pod.spec.containers[0].env or [] if e.name == "CBEC_MODEL_VERSION"), "")
        newest = self.controllers.newest.get(service, "none")
        pin = self.pins.get(service)
        if env:  # a values pin wins
            version = env
        elif pin is None:
            version = newest
        else:
            wanted = pin.version or newest
            follows = name == pin.taker or time.monotonic() - pin.at >= self.follow_s
            version = wanted if follows and name not in self.lagging else self.served.get(name, wanted)
        self.served[name] = version
        return version

    def ready_pods(self, service: str) -> list[str]:
        return sorted(p for p in self.controllers.pod_versions if p.startswith(f"shop-cbec-{service}-"))

    # --- HTTP ---
    @staticmethod
    def status(http: int, code: int, message: str) -> web.Response:
        return web.json_response({"code": code, "message": message, "details": []}, status=http)

    def authorize(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("x-api-key")
        if key == READ_ONLY_KEY:
            return self.status(403, 7, "the credentials lack the scope 'admin'")
        if key != ADMIN_KEY:
            return self.status(401, 16, "a valid API key or bearer token is required")
        return None

    async def get_model(self, request: web.Request) -> web.Response:
        service = request.match_info["service"]
        self.calls.append(("GET", request.path, None, request.headers.get("x-api-key")))
        refused = self.authorize(request)
        if refused is not None:
            return refused
        with self.controllers.lock:
            pods = self.ready_pods(service)
            serving = self.controllers.pod_versions[pods[0]] if pods else ""
        versions = [
            {"version": v, "valid": True, "createdTime": "2026-11-01T00:00:00Z"} for v in sorted(self.store)
        ]
        versions.append(
            {"version": "20261130T000000000000Z", "valid": False, "error": "manifest.json missing"}
        )
        return web.json_response(
            {"serving": {"name": service, "version": serving} if serving else None, "versions": versions}
        )

    async def load(self, request: web.Request) -> web.Response:
        service = request.match_info["service"]
        body = await request.json()
        self.calls.append(("POST", request.path, body, request.headers.get("x-api-key")))
        refused = self.authorize(request)
        if refused is not None:
            return refused
        version = body.get("version", "")
        if version and (version not in self.store or version in self.unloadable):
            return self.status(400, 9, f"model not switched: {version}: ValueError: weights do not fit")
        with self.controllers.lock:
            pods = self.ready_pods(service)
            if not pods:
                return self.status(503, 14, f"no {service} backend is serving")
            taker = pods[0]
            previous = self.controllers.pod_versions[taker]
            self.pins[service] = Pin(version, time.monotonic(), taker)
            serving = version or self.controllers.newest[service]
            self.served[taker] = self.controllers.pod_versions[taker] = serving
        if self.fail_after_switch:
            status, self.fail_after_switch = self.fail_after_switch, None
            return self.status(status, 14, "the model pin could not be recorded: connection refused")
        return web.json_response(
            {
                "serving": {"name": service, "version": serving},
                "previous": {"name": service, "version": previous},
            }
        )

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/admin/{service}/model", self.get_model)
        app.router.add_post("/v1/admin/{service}/model:load", self.load)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._stop, self._loop = asyncio.Event(), asyncio.get_running_loop()
        self._started.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> FakeGateway:
        self._thread.start()
        assert self._started.wait(10), "the fake gateway did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


@pytest.fixture
def gateway(cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGateway]:
    for name in ("CBEC_ADMIN_API_KEY", "CBEC_GATEWAY_URL", "CBEC_GATEWAY_CA_FILE", "CBEC_HELM_CHART"):
        monkeypatch.delenv(name, raising=False)
    key_file = tmp_path / "admin-key"
    key_file.write_text(ADMIN_KEY + "\n")
    key_file.chmod(0o600)
    with FakeGateway(cluster, key_file) as gw:
        yield gw


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


def rollout(cluster: Cluster, gw: FakeGateway, *args: str) -> tuple[int, str]:
    return cli(cluster, "rollout-model", *args, "--gateway", gw.url, "--api-key-file", str(gw.key_file))


def deployment(cluster: Cluster, service: str) -> client.V1Deployment:
    return client.AppsV1Api(cluster.api).read_namespaced_deployment(f"shop-cbec-{service}", NS)


def pods(cluster: Cluster, service: str) -> list[client.V1Pod]:
    return [
        p
        for p in client.CoreV1Api(cluster.api).list_namespaced_pod(NS).items
        if p.metadata.labels.get("app.kubernetes.io/component") == service
    ]


def served(cluster: Cluster, service: str) -> dict[str, int]:
    """What the ready pods report serving (status --json, through the pod proxy)."""
    code, text = cli(cluster, "--json", "status")
    assert code == 0
    return dict(next(r for r in json.loads(text) if r["service"] == service)["loaded_models"])


def snapshot(cluster: Cluster, service: str) -> tuple[str, int, Any, set[str]]:
    """Everything a roll-out through the admin API must leave alone: the Deployment's resourceVersion,
    generation and pod template, and the pods themselves."""
    d = deployment(cluster, service)
    template = cluster.api.sanitize_for_serialization(d.spec.template)
    return (
        d.metadata.resource_version,
        d.metadata.generation,
        template,
        {p.metadata.name for p in pods(cluster, service)},
    )


def helm_set_render(command: str, values: dict[str, Any]) -> dict[str, Any]:
    """Render the chart with VALUES plus the --set flags of a printed ``helm upgrade --reuse-values``
    command (what the upgrade would apply on top of the release's values), indexed by kind/name."""
    words = command.split()
    assert words[:2] == ["helm", "upgrade"] and "--reuse-values" in words, command
    sets = [w for i, w in enumerate(words) if i and words[i - 1] == "--set"]
    with tempfile.TemporaryDirectory() as tmp:
        values_file = Path(tmp) / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        args = [str(tool("helm")), "template", words[2], str(CHART), "-n", NS, "-f", str(values_file)]
        for item in sets:
            args += ["--set", item]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(result.stdout) if d}


def env_of(doc: dict[str, Any], name: str) -> str | None:
    container = doc["spec"]["template"]["spec"]["containers"][0]
    return next((e.get("value") for e in container["env"] if e["name"] == name), None)


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
    # the Deployment is Helm's: the next `helm upgrade` would put 2 back, so cbecctl says how to keep 3
    err = capsys.readouterr().err
    assert "Helm release shop manages this; the next `helm upgrade` sets replicas back" in err
    command = err.strip().splitlines()[-1].strip()
    assert command == (
        "helm upgrade shop deploy/helm/cbec --namespace shop --reuse-values --set services.risk.replicas=3"
    )
    assert helm_set_render(command, VALUES)["Deployment/shop-cbec-risk"]["spec"]["replicas"] == 3
    cluster.wait_settled()
    assert len([p for p in pods(cluster, "risk")]) == 3
    assert deployment(cluster, "risk").status.ready_replicas == 3

    code, _ = cli(cluster, "scale", "chat", "4")
    assert code == 1
    assert (
        "chat is autoscaled by HorizontalPodAutoscaler shop-cbec-chat (min 2, max 6)"
        in capsys.readouterr().err
    )
    code, text = cli(
        cluster,
        "--json",
        "--chart",
        "oci://registry.example/cbec",
        "scale",
        "chat",
        "--min",
        "3",
        "--max",
        "8",
    )
    assert code == 0 and json.loads(text) == {
        "service": "chat",
        "autoscaler": "shop-cbec-chat",
        "min": 3,
        "max": 8,
        "helm_release": "shop",
        "helm_namespace": "shop",
        "helm_values": {
            "services.chat.autoscaling.minReplicas": 3,
            "services.chat.autoscaling.maxReplicas": 8,
        },
        "helm_command": "helm upgrade shop oci://registry.example/cbec --namespace shop --reuse-values "
        "--set services.chat.autoscaling.minReplicas=3 --set services.chat.autoscaling.maxReplicas=8",
    }
    assert "sets the autoscaler's bounds back" in capsys.readouterr().err
    rendered = helm_set_render(json.loads(text)["helm_command"], VALUES)
    hpa_doc = rendered["HorizontalPodAutoscaler/shop-cbec-chat"]["spec"]
    assert (hpa_doc["minReplicas"], hpa_doc["maxReplicas"]) == (3, 8)
    hpa = client.AutoscalingV2Api(cluster.api).read_namespaced_horizontal_pod_autoscaler("shop-cbec-chat", NS)
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (3, 8)
    wait_until("the autoscaler to raise chat to its new minimum", lambda: len(pods(cluster, "chat")) == 3)

    code, _ = cli(cluster, "scale", "translate", "2")
    assert code == 1
    assert "no cbec service 'translate' in namespace shop (found: chat, gateway" in capsys.readouterr().err


def test_rollout_model_goes_through_the_admin_api_and_leaves_the_deployment_alone(
    cluster: Cluster, gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(cluster, "risk")
    code, text = rollout(cluster, gateway, "risk", V2, "--timeout", "20")
    assert code == 0, text
    assert text.startswith(f"risk: model {NEWEST} -> {V2} rolled out in ")
    assert text.strip().endswith(f"through the model-admin API; serving {V2}")
    # the gateway got the model-admin calls with the key from the file, nothing else
    assert gateway.calls == [
        ("GET", "/v1/admin/risk/model", None, ADMIN_KEY),
        ("POST", "/v1/admin/risk/model:load", {"version": V2}, ADMIN_KEY),
    ]
    # every replica serves it: the one that took the call and the one that followed the shared choice
    assert served(cluster, "risk") == {V2: 2}
    # the Helm-managed Deployment was not touched, no pod was replaced
    assert snapshot(cluster, "risk") == before

    code, text = rollout(cluster, gateway, "risk", V2)
    assert (code, text.strip()) == (0, f"risk: already serving model {V2} on every pod; choice recorded")

    # un-pin, with the gateway and key from the environment
    monkeypatch.setenv("CBEC_GATEWAY_URL", gateway.url)
    monkeypatch.setenv("CBEC_ADMIN_API_KEY", ADMIN_KEY)
    gateway.calls.clear()
    code, text = cli(cluster, "--json", "rollout-model", "risk", "--unpin", "--timeout", "20")
    assert code == 0, text
    result = json.loads(text)
    assert result["previous_model"] == V2 and result["model"] == "newest"
    assert result["serving_model"] == NEWEST and result["loaded_models"] == {NEWEST: 2}
    assert gateway.calls[-1] == ("POST", "/v1/admin/risk/model:load", {"version": ""}, ADMIN_KEY)
    code, text = cli(cluster, "rollout-model", "risk", "newest", "--timeout", "20")
    assert code == 0 and text.startswith(f"risk: already serving model newest ({NEWEST}) on every pod")
    assert snapshot(cluster, "risk") == before


def test_a_rollout_that_not_every_replica_follows_is_rolled_back_through_the_api(
    cluster: Cluster, gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(cluster, "risk")
    stuck = gateway.ready_pods("risk")[1]  # the first takes the call; this one never follows
    gateway.lagging.add(stuck)  # e.g. a replica whose connection to the shared store hangs
    started = time.monotonic()
    code, _ = rollout(cluster, gateway, "risk", V2, "--timeout", "2")
    assert code == 3 and time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert f"risk: not every ready pod serves model {V2} after 2s ({stuck} serves {NEWEST})" in err
    assert f"; rolled back to model {NEWEST} through the admin API" in err
    assert [c[2] for c in gateway.calls if c[0] == "POST"] == [{"version": V2}, {"version": NEWEST}]
    assert served(cluster, "risk") == {NEWEST: 2}
    assert snapshot(cluster, "risk") == before

    # --no-undo leaves the mixed state for the SRE to look at
    gateway.calls.clear()
    code, _ = rollout(cluster, gateway, "risk", V2, "--timeout", "1", "--no-undo")
    assert code == 3
    assert "; not rolled back (--no-undo)" in capsys.readouterr().err
    assert [c[2] for c in gateway.calls if c[0] == "POST"] == [{"version": V2}]
    assert served(cluster, "risk") == {V2: 1, NEWEST: 1}


def test_a_load_that_fails_changes_nothing_and_an_ambiguous_failure_is_rolled_back(
    cluster: Cluster, gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    # the replica refuses the version (FAILED_PRECONDITION): it keeps serving, nothing to roll back
    gateway.unloadable.add(BROKEN)
    code, _ = rollout(cluster, gateway, "vision", BROKEN, "--timeout", "5")
    assert code == 3
    err = capsys.readouterr().err
    assert (
        f"vision: model {BROKEN} not rolled out, nothing changed: POST {gateway.url}/v1/admin/vision/" in err
    )
    assert "HTTP 400: model not switched" in err
    assert [c[2] for c in gateway.calls if c[0] == "POST"] == [{"version": BROKEN}]
    assert served(cluster, "vision") == {NEWEST: 1}

    # a version the store does not hold is refused before any change
    gateway.calls.clear()
    code, _ = rollout(cluster, gateway, "vision", MISSING)
    assert code == 1
    err = capsys.readouterr().err
    assert f"vision: model version {MISSING} is not in the model store; valid versions: {V1}, {V2}" in err
    code, _ = rollout(cluster, gateway, "vision", "20261130T000000000000Z")
    assert code == 1
    assert "is not valid (manifest.json missing)" in capsys.readouterr().err
    assert [c[0] for c in gateway.calls] == ["GET", "GET"]

    # the replica switched but the call failed (the pin could not be recorded): cbecctl cannot know
    # what happened, so it puts the previous version back
    gateway.calls.clear()
    gateway.fail_after_switch = 503
    code, _ = rollout(cluster, gateway, "risk", V2, "--timeout", "5")
    assert code == 3
    err = capsys.readouterr().err
    assert "risk: POST" in err and "HTTP 503: the model pin could not be recorded" in err
    assert f"; rolled back to model {NEWEST} through the admin API" in err
    assert [c[2] for c in gateway.calls if c[0] == "POST"] == [{"version": V2}, {"version": NEWEST}]
    assert served(cluster, "risk") == {NEWEST: 2}


def test_rollout_model_is_refused_where_the_admin_api_cannot_reach_every_replica(
    cluster: Cluster,
    gateway: FakeGateway,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = snapshot(cluster, "recommender")
    # pinned in values: every replica prefers CBEC_MODEL_VERSION to the admin API's choice
    assert rollout(cluster, gateway, "recommender", V2)[0] == 1
    err = capsys.readouterr().err
    assert f"recommender is pinned to model {V1} by its Deployment (CBEC_MODEL_VERSION, the Helm value" in err
    assert "`cbecctl pin-model recommender VERSION`" in err
    assert snapshot(cluster, "recommender") == before

    assert rollout(cluster, gateway, "risk", "latest")[0] == 1
    assert "'latest' is not a model version" in capsys.readouterr().err
    assert rollout(cluster, gateway, "gateway", V2)[0] == 1
    assert "gateway serves no model" in capsys.readouterr().err
    assert rollout(cluster, gateway, "risk", V2, "--unpin")[0] == 1
    assert "--unpin serves the newest valid version" in capsys.readouterr().err
    assert rollout(cluster, gateway, "risk")[0] == 1
    assert "give a model version, or --unpin" in capsys.readouterr().err
    assert gateway.calls == []

    # a roll-out that cannot be verified is not started: the pod proxy is forbidden to this SRE
    def forbidden(pod: str) -> str:
        raise kmock.KubernetesError(status=403, reason="Forbidden", message="pods/proxy is forbidden")

    with monkeypatch.context() as m:
        m.setattr(cluster.controllers, "metrics", forbidden)
        assert rollout(cluster, gateway, "risk", V2)[0] == 1
    assert "cannot verify a roll-out of risk: no pod's /metrics can be read" in capsys.readouterr().err
    assert gateway.calls == []

    # two replicas on the embedded state backend: the call would reach one, the other never hears of it
    apps = client.AppsV1Api(cluster.api)
    raw = cluster.api.sanitize_for_serialization(deployment(cluster, "risk"))
    containers = raw["spec"]["template"]["spec"]["containers"]
    for item in containers[0]["env"]:
        if item["name"] == "CBEC_STATE_BACKEND":
            item["value"] = "embedded"
    apps.patch_namespaced_deployment(
        "shop-cbec-risk",
        NS,
        {
            "spec": {
                "strategy": {"type": "Recreate", "rollingUpdate": None},
                "template": {"spec": {"containers": containers}},
            }
        },
        _content_type=MERGE,
    )
    cluster.wait_settled()
    assert rollout(cluster, gateway, "risk", V2)[0] == 1
    assert "risk uses the embedded state backend: an admin API call reaches one of its replicas" in (
        capsys.readouterr().err
    )
    # and scaling such a service beyond one replica is refused too (its state is on one RWO volume)
    assert cli(cluster, "scale", "risk", "3")[0] == 1
    assert "(state.backend=embedded): it runs one replica" in capsys.readouterr().err
    assert cli(cluster, "scale", "risk", "1")[0] == 0
    cluster.wait_settled()
    code, _ = rollout(cluster, gateway, "risk", V2, "--timeout", "20")
    assert code == 0
    assert "a restarted pod loads the newest version again" in capsys.readouterr().err
    assert gateway.calls[-1][2] == {"version": V2}


def test_the_api_key_comes_from_a_file_or_the_environment_never_the_command_line(
    cluster: Cluster, gateway: FakeGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = cli(cluster, "rollout-model", "risk", V2, "--gateway", gateway.url)
    assert code == 1
    err = capsys.readouterr().err
    assert (
        "needs an API key with the 'admin' scope: pass --api-key-file PATH or set CBEC_ADMIN_API_KEY" in err
    )
    code, _ = cli(cluster, "rollout-model", "risk", V2, "--gateway", gateway.url, "--api-key", ADMIN_KEY)
    assert code == 1
    err = capsys.readouterr().err
    assert "an API key on the command line is visible in ps and shell history" in err and ADMIN_KEY not in err
    code, _ = cli(cluster, "rollout-model", "risk", V2, "--api-key-file", str(gateway.key_file))
    assert code == 1
    assert "pass --gateway URL" in capsys.readouterr().err
    code, _ = cli(
        cluster,
        "rollout-model",
        "risk",
        V2,
        "--gateway",
        gateway.url,
        "--api-key-file",
        str(tmp_path / "nope"),
    )
    assert code == 1
    assert (
        f"cannot read the API key file {tmp_path / 'nope'}: No such file or directory"
        in capsys.readouterr().err
    )
    assert gateway.calls == []

    wrong = tmp_path / "wrong-key"
    for key, expected in (
        (READ_ONLY_KEY, "HTTP 403 (the API key lacks the 'admin' scope)"),
        ("nope", "HTTP 401"),
    ):
        wrong.write_text(key)
        code, _ = cli(
            cluster, "rollout-model", "risk", V2, "--gateway", gateway.url, "--api-key-file", str(wrong)
        )
        assert code == 1
        err = capsys.readouterr().err
        assert f"GET {gateway.url}/v1/admin/risk/model: {expected}" in err and key not in err
    assert [c[0] for c in gateway.calls] == ["GET", "GET"]  # refused before any load
    assert served(cluster, "risk") == {NEWEST: 2}


def test_pin_model_prints_the_helm_upgrade_that_pins_it_in_values(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(cluster, "recommender")
    code, text = cli(cluster, "pin-model", "recommender", V2)
    assert code == 0
    command = text.strip()
    assert command == (
        "helm upgrade shop deploy/helm/cbec --namespace shop --reuse-values "
        f"--set services.recommender.modelVersion={V2}"
    )
    assert f"pin recommender (now {V1}) in release shop" in capsys.readouterr().err
    rendered = helm_set_render(command, VALUES)["Deployment/shop-cbec-recommender"]
    assert env_of(rendered, "CBEC_MODEL_VERSION") == V2
    assert rendered["spec"]["template"]["metadata"]["labels"]["cbec.ai/model-version"] == V2
    assert snapshot(cluster, "recommender") == before  # printed, not run

    code, text = cli(cluster, "--json", "pin-model", "recommender", "newest")
    done = json.loads(text)
    assert code == 0 and done["helm_values"] == {"services.recommender.modelVersion": ""}
    rendered = helm_set_render(done["helm_command"], VALUES)["Deployment/shop-cbec-recommender"]
    assert env_of(rendered, "CBEC_MODEL_VERSION") == ""
    assert cli(cluster, "pin-model", "gateway", V2)[0] == 1
    assert "gateway serves no model" in capsys.readouterr().err
    assert cli(cluster, "pin-model", "risk", "latest")[0] == 1


def test_restart_replaces_every_pod(cluster: Cluster) -> None:
    old = {p.metadata.name for p in pods(cluster, "risk")}
    code, text = cli(cluster, "restart", "risk", "--timeout", "20")
    assert code == 0 and text.startswith("risk: restarted at ")
    new = {p.metadata.name for p in pods(cluster, "risk")}
    assert len(new) == 2 and not old & new
    annotations = deployment(cluster, "risk").spec.template.metadata.annotations
    assert "kubectl.kubernetes.io/restartedAt" in annotations


def cordon(cluster: Cluster, node: str) -> None:
    client.CoreV1Api(cluster.api).patch_node(node, {"spec": {"unschedulable": True}}, _content_type=MERGE)


def test_a_restart_that_cannot_finish_times_out_naming_the_stuck_pods(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cordon(cluster, "cpu-1")  # the new pods cannot be placed
    started = time.monotonic()
    code, _ = cli(cluster, "restart", "risk", "--timeout", "2")
    assert code == 3 and time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert "risk: roll-out not finished after 2s (2 of 2 pods updated, 2 old pods still running)" in err
    assert (
        "; pods not ready: shop-cbec-risk-" in err
        and "Pending: unschedulable: 0/3 nodes are available" in err
    )
    # the old pods still serve: a failed roll-out never takes the service down
    assert served(cluster, "risk") == {NEWEST: 2}


def test_a_stalled_restart_fails_before_the_timeout(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    apps = client.AppsV1Api(cluster.api)
    apps.patch_namespaced_deployment(
        "shop-cbec-sentiment", NS, {"spec": {"progressDeadlineSeconds": 1}}, _content_type=MERGE
    )
    cluster.wait_settled()
    cordon(cluster, "cpu-1")
    started = time.monotonic()
    code, _ = cli(cluster, "restart", "sentiment", "--timeout", "60")
    assert code == 3 and time.monotonic() - started < 30
    assert "sentiment: roll-out stalled (ReplicaSet" in capsys.readouterr().err


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
