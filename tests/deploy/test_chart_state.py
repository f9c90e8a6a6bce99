"""The chart's state layer, commands and training jobs: the state backends (shared PostgreSQL + Redis,
bundled or external; embedded SQLite on a volume per service), the passwords, what each container runs,
and the training Jobs/CronJobs. Every render is validated against the Kubernetes schemas."""

from __future__ import annotations

import base64
import gzip
import json
import re
import shlex
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tests.deploy.conftest import (
    ALL_SERVICES,
    CHART,
    MODEL_SERVICES,
    ROOT,
    Rendered,
    RenderError,
    helm_template,
    tool,
)
from tests.deploy.test_chart import OLDEST_KUBERNETES, container, env_of, validate

STATE_DIR = "/var/lib/cbec"
STATEFUL = MODEL_SERVICES  # the services that keep state; the gateway only uses Redis
EXTERNAL_STATE = {
    "postgres": {
        "bundled": {"enabled": False},
        "external": {
            "url": "postgresql://cbec@db.internal.example:5432/cbec?sslmode=require",
            "existingSecret": "cbec-db",
            "passwordKey": "db-password",
            "egressTo": [{"ipBlock": {"cidr": "10.20.0.0/24"}}],
        },
    },
    "redis": {
        "bundled": {"enabled": False},
        "external": {
            "url": "rediss://cache.internal.example:6380/2",
            "existingSecret": "cbec-redis",
            "passwordKey": "redis-auth",
        },
    },
}
TRAINING = {
    name: {"training": {"enabled": True, **({"schedule": "0 3 * * 0"} if name == "risk" else {})}}
    for name in MODEL_SERVICES
}
RENDERS: dict[str, dict[str, Any]] = {
    "default": {},
    "external stores": {"state": EXTERNAL_STATE},
    "embedded": {"state": {"backend": "embedded"}},
    "training": {"services": TRAINING},
    "embedded training": {
        "state": {"backend": "embedded"},
        "services": {"risk": {"training": {"enabled": True, "schedule": "@daily"}}},
    },
    "gpu training": {
        "services": {"vision": {"gpu": {"count": 1}, "training": {"enabled": True, "gpus": 1}}},
        "state": {"redis": {"bundled": {"appendfsync": "always", "existingSecret": "my-redis"}}},
    },
}


@pytest.fixture(scope="module")
def renders() -> dict[str, Rendered]:
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(RENDERS, pool.map(helm_template, RENDERS.values()), strict=True))


def pod_specs(rendered: Rendered) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(kind, name, pod spec) of every workload."""
    for doc in rendered.docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "Job"):
            yield kind, name, doc["spec"]["template"]["spec"]
        elif kind == "CronJob":
            yield kind, name, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def suite_pod_specs(rendered: Rendered) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """The services' and training jobs' pods (not the bundled stores)."""
    for kind, name, spec in pod_specs(rendered):
        if not name.endswith(("-postgres", "-redis")):
            yield kind, name, spec


def state_secrets(rendered: Rendered) -> list[dict[str, Any]]:
    """The chart's Secrets for the stores' passwords (not its TLS and internal-token Secrets)."""
    return [
        s
        for s in rendered.of_kind("Secret")
        if s["metadata"]["labels"].get("app.kubernetes.io/component") == "state"
    ]


def jobs(rendered: Rendered) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in rendered.of_kind("Job")}


# --- manifests ---------------------------------------------------------------------------------------


def test_every_render_validates_against_the_kubernetes_schemas(renders: dict[str, Rendered]) -> None:
    everything = "\n---\n".join(r.text for r in renders.values())
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda v: validate(everything, v), [OLDEST_KUBERNETES, "1.37.0"]))
    for result in results:
        if result.returncode != 0:
            report = {
                name: out.stdout + out.stderr
                for name, r in renders.items()
                if (out := validate(r.text, OLDEST_KUBERNETES)).returncode != 0
            }
            pytest.fail(f"invalid manifests: {report or result.stdout + result.stderr}")


def test_helm_lint_strict_with_state_and_training() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        values = Path(tmp) / "values.yaml"
        values.write_text(yaml.safe_dump({"services": TRAINING, "state": EXTERNAL_STATE}))
        result = subprocess.run(
            [str(tool("helm")), "lint", "--strict", str(CHART), "-f", str(values)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stdout + result.stderr


# --- what the containers run -------------------------------------------------------------------------


def image_entrypoints() -> dict[str, tuple[list[str], str]]:
    """ENTRYPOINT and WORKDIR of every Containerfile (CPU and GPU must agree)."""
    out: dict[str, tuple[list[str], str]] = {}
    for path in sorted((ROOT / "deploy" / "images").glob("*/Containerfile*")):
        text = path.read_text()
        entrypoint = json.loads(re.findall(r"^ENTRYPOINT (\[.*\])$", text, re.M)[-1])
        workdir = re.findall(r"^WORKDIR (\S+)$", text, re.M)[-1]  # the runtime stage's
        seen = out.setdefault(path.parent.name, (entrypoint, workdir))
        assert seen == (entrypoint, workdir), path
    return out


def test_containers_run_what_the_images_run(renders: dict[str, Rendered]) -> None:
    images = image_entrypoints()
    assert set(images) == set(ALL_SERVICES)
    for name in ALL_SERVICES:
        c = container(renders["default"].deployment(name))
        entrypoint, workdir = images[name]
        assert c["command"] == entrypoint, name
        assert c["workingDir"] == workdir
        assert "args" not in c
    assert container(renders["default"].deployment("gateway"))["command"] == ["python", "-m", "gateway"]
    translate = helm_template({"services": {"translate": {"grpcPort": 50060, "metricsPort": 9110}}})
    assert container(translate.deployment("translate"))["command"] == ["python", "-m", "services.translate"]


def test_training_runs_the_services_train_module(renders: dict[str, Rendered]) -> None:
    images = image_entrypoints()
    found = jobs(renders["training"])
    assert set(found) == {f"shop-cbec-{n}-train-1" for n in MODEL_SERVICES}
    for name in MODEL_SERVICES:
        c = found[f"shop-cbec-{name}-train-1"]["spec"]["template"]["spec"]["containers"][0]
        entrypoint, workdir = images[name]
        assert c["command"] == [*entrypoint[:-1], f"{entrypoint[-1]}.train"]
        assert c["workingDir"] == workdir
    args = {
        name: found[f"shop-cbec-{name}-train-1"]["spec"]["template"]["spec"]["containers"][0].get("args", [])
        for name in MODEL_SERVICES
    }
    # every $(VAR) in args is one of the container's env vars (Kubernetes expands only those)
    for name, a in args.items():
        env = env_of(found[f"shop-cbec-{name}-train-1"]["spec"]["template"]["spec"]["containers"][0])
        for ref in re.findall(r"\$\((\w+)\)", " ".join(a)):
            assert ref in env, (name, ref)
    # the packaged data plus the recorded events; the report on the writable state volume
    assert args["recommender"] == [
        "--interactions",
        "ml-100k",
        "--events",
        "store",
        "--out",
        "$(CBEC_STATE_DIR)/recommender/eval",
    ]
    # their CLIs' defaults: CBEC_MODELS_DIR and the store the CBEC_STATE_* settings name
    assert args["chat"] == args["risk"] == args["sentiment"] == args["vision"] == []


def test_training_args_parse_with_the_services_own_cli(renders: dict[str, Rendered]) -> None:
    """Every flag in the rendered args is one the service's train CLI has (its `--help`)."""
    found = jobs(renders["training"])
    for name in MODEL_SERVICES:
        c = found[f"shop-cbec-{name}-train-1"]["spec"]["template"]["spec"]["containers"][0]
        if not c.get("args"):
            continue
        help_text = subprocess.run(
            [sys.executable, "-m", f"services.{name}.train", "--help"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        if help_text.returncode != 0:
            pytest.fail(f"services.{name}.train --help failed: {help_text.stderr[-2000:]}")
        for flag in (a for a in c["args"] if a.startswith("--")):  # e.g. "  --events EVENTS"
            assert flag in help_text.stdout, (name, flag)


# --- state: env, volumes, security -------------------------------------------------------------------

ALWAYS = {"CBEC_STATE_BACKEND", "CBEC_STATE_DIR"}
SHARED = {"CBEC_DATABASE_URL", "CBEC_DATABASE_PASSWORD", "CBEC_REDIS_URL", "CBEC_REDIS_PASSWORD"}


@pytest.mark.parametrize(
    "render", ["default", "external stores", "embedded", "training", "embedded training"]
)
def test_every_container_has_its_state_dir_on_a_writable_volume(
    renders: dict[str, Rendered], render: str
) -> None:
    rendered = renders[render]
    embedded = render.startswith("embedded")
    checked = 0
    for _, name, spec in suite_pod_specs(rendered):
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            env = env_of(c)
            assert ALWAYS | (set() if embedded else SHARED) <= env.keys(), (name, sorted(env))
            if embedded:
                assert not SHARED & env.keys()
            assert env["CBEC_STATE_BACKEND"] == ("embedded" if embedded else "shared")
            assert env["CBEC_STATE_DIR"] == STATE_DIR
            [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == STATE_DIR]
            assert not mount.get("readOnly", False)
            volume = volumes[mount["name"]]
            service = next(s for s in ALL_SERVICES if name.startswith(f"shop-cbec-{s}"))
            if embedded and service in STATEFUL:
                assert volume["persistentVolumeClaim"] == {"claimName": f"shop-cbec-{service}-state"}
            else:
                assert "sizeLimit" in volume["emptyDir"]
            [tmp] = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]]
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            checked += 1
    assert checked >= len(ALL_SERVICES)


def test_embedded_backend_gives_each_stateful_service_its_own_volume(renders: dict[str, Rendered]) -> None:
    rendered = renders["embedded"]
    claims = {c["metadata"]["name"]: c for c in rendered.of_kind("PersistentVolumeClaim")}
    assert set(claims) == {"shop-cbec-models"} | {f"shop-cbec-{s}-state" for s in STATEFUL}
    for name in STATEFUL:
        claim = claims[f"shop-cbec-{name}-state"]
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        dep = rendered.deployment(name)
        assert dep["spec"]["strategy"] == {"type": "Recreate"}  # never two pods on the volume
        assert dep["spec"]["replicas"] == 1
    assert rendered.deployment("gateway")["spec"]["strategy"]["type"] == "RollingUpdate"
    assert rendered.deployment("gateway")["spec"]["replicas"] == 2  # stateless: replicas are fine
    assert not rendered.of_kind("StatefulSet")
    assert not state_secrets(rendered)
    # the shared backend: no state claims, rolling updates
    default = renders["default"]
    assert [c["metadata"]["name"] for c in default.of_kind("PersistentVolumeClaim")] == ["shop-cbec-models"]
    assert default.deployment("risk")["spec"]["strategy"]["type"] == "RollingUpdate"


def test_state_env_names_per_container(renders: dict[str, Rendered]) -> None:
    """The exact environment each container gets with the defaults (deploy/README.md documents it)."""
    common = {"CBEC_DEVICE", "CBEC_LOG_LEVEL", "HOME"} | ALWAYS | SHARED
    serving = common | {"CBEC_HOST", "CBEC_GRPC_PORT", "CBEC_METRICS_PORT", "CBEC_GRACE_PERIOD_S"}
    serving |= {"CBEC_INTERNAL_TOKEN_FILE"}
    model = {"CBEC_MODELS_DIR", "CBEC_MODEL_VERSION", "CBEC_MODEL_POLL_S"}
    tls_server = {"CBEC_TLS_CERT_FILE", "CBEC_TLS_KEY_FILE", "CBEC_TLS_CLIENT_CA_FILE"}
    tls_client = {"CBEC_BACKEND_TLS_CA_FILE", "CBEC_BACKEND_TLS_CERT_FILE", "CBEC_BACKEND_TLS_KEY_FILE"}
    expected = {
        "gateway": serving
        | {
            "CBEC_GATEWAY_HTTP_HOST",
            "CBEC_GATEWAY_HTTP_PORT",
            "CBEC_GATEWAY_ENV",
            "CBEC_GATEWAY_RATE_LIMIT_REPLICAS",
        }
        | {f"CBEC_GATEWAY_{s.upper()}_ADDR" for s in MODEL_SERVICES}
        | tls_client,
        "chat": serving | model | {"CBEC_CHAT_SENTIMENT_ADDR"} | tls_server | tls_client,
        **{s: serving | model | tls_server for s in ("recommender", "sentiment", "vision", "risk")},
    }
    for name, names in expected.items():
        assert set(env_of(container(renders["default"].deployment(name)))) == names, name
    for job in jobs(renders["training"]).values():
        c = job["spec"]["template"]["spec"]["containers"][0]
        assert set(env_of(c)) == common | {"CBEC_MODELS_DIR"}, job["metadata"]["name"]


def test_model_polling_follows_training(renders: dict[str, Rendered]) -> None:
    for name in MODEL_SERVICES:
        assert env_of(container(renders["default"].deployment(name)))["CBEC_MODEL_POLL_S"] == "0"
        assert env_of(container(renders["training"].deployment(name)))["CBEC_MODEL_POLL_S"] == "60"
    assert "CBEC_MODEL_POLL_S" not in env_of(container(renders["default"].deployment("gateway")))
    fixed = helm_template(
        {"defaults": {"modelPollSeconds": 300}, "services": {"risk": {"modelPollSeconds": 0}}}
    )
    assert env_of(container(fixed.deployment("vision")))["CBEC_MODEL_POLL_S"] == "300"
    assert env_of(container(fixed.deployment("risk")))["CBEC_MODEL_POLL_S"] == "0"


def test_chat_reaches_sentiment_through_its_headless_service(renders: dict[str, Rendered]) -> None:
    rendered = renders["default"]
    addr = env_of(container(rendered.deployment("chat")))["CBEC_CHAT_SENTIMENT_ADDR"]
    svc = rendered.get("Service", "shop-cbec-sentiment")
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert addr == f"dns:///shop-cbec-sentiment.cbec.svc.cluster.local:{port}"
    assert svc["spec"]["clusterIP"] == "None"
    # the same form as the gateway's address for sentiment
    assert addr == env_of(container(rendered.deployment("gateway")))["CBEC_GATEWAY_SENTIMENT_ADDR"]
    other = helm_template(
        {"clusterDomain": "k8s.internal", "services": {"sentiment": {"grpcPort": 6000}}}, namespace="shop"
    )
    assert env_of(container(other.deployment("chat")))["CBEC_CHAT_SENTIMENT_ADDR"] == (
        "dns:///shop-cbec-sentiment.shop.svc.k8s.internal:6000"
    )
    without = helm_template({"services": {"sentiment": {"enabled": False}}})
    assert "CBEC_CHAT_SENTIMENT_ADDR" not in env_of(container(without.deployment("chat")))


def test_passwords_only_from_secret_key_refs(renders: dict[str, Rendered]) -> None:
    for render, rendered in renders.items():
        for _, name, spec in pod_specs(rendered):
            for c in spec["containers"] + spec.get("initContainers", []):
                for e in c.get("env", []):
                    if re.search(r"(PASSWORD|SECRET|TOKEN|KEY|AUTH)$", e["name"]):
                        assert "value" not in e, (render, name, e)
                        assert set(e["valueFrom"]) == {"secretKeyRef"}, (render, name, e)
                    if e["name"].endswith("_URL") and "value" in e and "://" in e["value"]:
                        assert urlparse(e["value"]).password is None, (render, name, e)
    default = env_of(container(renders["default"].deployment("risk")))
    assert default["CBEC_DATABASE_PASSWORD"] == {
        "secretKeyRef": {"name": "shop-cbec-state", "key": "postgres-password"}
    }
    assert default["CBEC_REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": "shop-cbec-state", "key": "redis-password"}
    }
    # the generated passwords appear in the Secret and nowhere else
    [secret] = state_secrets(renders["default"])
    for value in secret["data"].values():
        password = base64.b64decode(value).decode()
        assert len(password) >= 32
        assert renders["default"].text.count(password) == 0  # only its base64 form is in the Secret
        assert renders["default"].text.count(value) == 1


def test_external_stores_with_existing_secrets(renders: dict[str, Rendered]) -> None:
    rendered = renders["external stores"]
    assert not rendered.of_kind("StatefulSet")
    assert not state_secrets(rendered)
    assert not [
        s for s in rendered.of_kind("Service") if s["metadata"]["name"].endswith(("-postgres", "-redis"))
    ]
    for name in ALL_SERVICES:
        env = env_of(container(rendered.deployment(name)))
        assert env["CBEC_DATABASE_URL"] == EXTERNAL_STATE["postgres"]["external"]["url"]
        assert env["CBEC_DATABASE_PASSWORD"] == {"secretKeyRef": {"name": "cbec-db", "key": "db-password"}}
        assert env["CBEC_REDIS_URL"] == "rediss://cache.internal.example:6380/2"
        assert env["CBEC_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "cbec-redis", "key": "redis-auth"}}
    # egress to the external stores: the URL's port; redis has no egressTo, so any destination
    egress = rendered.get("NetworkPolicy", "shop-cbec-risk")["spec"]["egress"]
    assert {
        "to": [{"ipBlock": {"cidr": "10.20.0.0/24"}}],
        "ports": [{"port": 5432, "protocol": "TCP"}],
    } in egress
    assert {"ports": [{"port": 6380, "protocol": "TCP"}]} in egress
    # no password: no password variable
    nopw = helm_template(
        {"state": {"redis": {"bundled": {"enabled": False}, "external": {"url": "redis://r:6379/0"}}}}
    )
    assert "CBEC_REDIS_PASSWORD" not in env_of(container(nopw.deployment("risk")))


# --- the bundled stores ------------------------------------------------------------------------------

RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def assert_restricted(name: str, spec: dict[str, Any]) -> None:
    """The pod security standard `restricted`."""
    pod_sc = spec.get("securityContext", {})
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
    for v in spec.get("volumes", []):
        assert set(v) - {"name"} <= RESTRICTED_VOLUMES, (name, v)
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, name
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), name
        assert not sc.get("privileged"), name
        assert sc["readOnlyRootFilesystem"] is True, name


def test_every_pod_meets_the_restricted_pod_security_standard(renders: dict[str, Rendered]) -> None:
    for rendered in renders.values():
        for _, name, spec in pod_specs(rendered):
            assert_restricted(name, spec)
            assert spec["automountServiceAccountToken"] is False


def test_bundled_postgres_and_redis(renders: dict[str, Rendered]) -> None:
    rendered = renders["default"]
    [secret] = state_secrets(rendered)
    assert secret["metadata"]["name"] == "shop-cbec-state"
    assert set(secret["data"]) == {"postgres-password", "redis-password"}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    risk_env = env_of(container(rendered.deployment("risk")))
    urls = {
        "postgres": urlparse(risk_env["CBEC_DATABASE_URL"]),
        "redis": urlparse(risk_env["CBEC_REDIS_URL"]),
    }
    assert (
        risk_env["CBEC_DATABASE_URL"]
        == "postgresql://cbec@shop-cbec-postgres.cbec.svc.cluster.local:5432/cbec"
    )
    assert risk_env["CBEC_REDIS_URL"] == "redis://shop-cbec-redis.cbec.svc.cluster.local:6379/0"
    for store, port in (("postgres", 5432), ("redis", 6379)):
        sts = rendered.get("StatefulSet", f"shop-cbec-{store}")
        svc = rendered.get("Service", f"shop-cbec-{store}")
        pod = sts["spec"]["template"]
        assert sts["spec"]["replicas"] == 1
        assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
        assert svc["spec"]["clusterIP"] == "None"
        assert (
            svc["spec"]["selector"]
            == sts["spec"]["selector"]["matchLabels"]
            == {
                "app.kubernetes.io/name": "cbec",
                "app.kubernetes.io/instance": "shop",
                "app.kubernetes.io/component": store,
            }
        )
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert urls[store].hostname == f"{svc['metadata']['name']}.cbec.svc.cluster.local"
        assert urls[store].port == port == svc["spec"]["ports"][0]["port"]
        [claim] = sts["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        c = pod["spec"]["containers"][0]
        assert c["ports"] == [{"name": store, "containerPort": port, "protocol": "TCP"}]
        [data] = [m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
        assert not data.get("readOnly")
        probe = " ".join(c["readinessProbe"]["exec"]["command"])
        assert ("pg_isready" in probe) if store == "postgres" else ("redis-cli" in probe and "ping" in probe)
        assert pod["spec"]["securityContext"]["runAsUser"] == 999  # the images' own users
        passwords = [e for e in c["env"] if e["name"] in ("POSTGRES_PASSWORD", "REDIS_PASSWORD")]
        assert [e["valueFrom"]["secretKeyRef"] for e in passwords] == [
            {"name": "shop-cbec-state", "key": f"{store}-password"}
        ]
    redis = rendered.get("StatefulSet", "shop-cbec-redis")["spec"]["template"]["spec"]["containers"][0]
    command = redis["command"] + redis["args"]
    assert command[0] == "redis-server"
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "everysec"
    assert flags["--requirepass"] == "$(REDIS_PASSWORD)"  # Kubernetes expands it from the Secret
    assert flags["--dir"] == "/data"
    assert {
        "name": "REDISCLI_AUTH",
        "valueFrom": {"secretKeyRef": {"name": "shop-cbec-state", "key": "redis-password"}},
    } in redis["env"]
    postgres = rendered.get("StatefulSet", "shop-cbec-postgres")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(postgres)["PGDATA"].startswith("/var/lib/postgresql/data/")
    # an existing Secret for one store: the chart's Secret keeps only the other's key
    gpu = renders["gpu training"]
    [secret] = state_secrets(gpu)
    assert set(secret["data"]) == {"postgres-password"}
    redis = gpu.get("StatefulSet", "shop-cbec-redis")["spec"]["template"]["spec"]["containers"][0]
    assert "always" in redis["args"]
    assert env_of(container(gpu.deployment("risk")))["CBEC_REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": "my-redis", "key": "redis-password"}
    }


class FakeApiServer(BaseHTTPRequestHandler):
    """Just enough of a Kubernetes API for `helm upgrade --dry-run=server`: discovery, the release's
    history (one deployed revision, in Helm's Secret storage) and the chart's state Secret (for lookup);
    every other object is absent."""

    kinds = {
        "v1": ["Secret", "Service", "ServiceAccount", "PersistentVolumeClaim", "ConfigMap"],
        "apps/v1": ["Deployment", "StatefulSet"],
        "batch/v1": ["Job", "CronJob"],
        "networking.k8s.io/v1": ["NetworkPolicy"],
        "policy/v1": ["PodDisruptionBudget"],
        "autoscaling/v2": ["HorizontalPodAutoscaler"],
    }
    objects: dict[str, dict[str, Any]] = {}

    def do_GET(self) -> None:  # http.server's name for it
        path = self.path.split("?")[0]
        gv = path.removeprefix("/api/").removeprefix("/apis/")
        body: dict[str, Any] | None = self.objects.get(path)
        if path == "/version":
            body = {"major": "1", "minor": "30", "gitVersion": "v1.30.0"}
        elif path == "/api":
            body = {"kind": "APIVersions", "versions": ["v1"]}
        elif path == "/apis":
            groups = [gv.split("/") for gv in self.kinds if "/" in gv]
            body = {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": group,
                        "versions": [{"groupVersion": f"{group}/{version}", "version": version}],
                        "preferredVersion": {"groupVersion": f"{group}/{version}", "version": version},
                    }
                    for group, version in groups
                ],
            }
        elif gv in self.kinds:
            resources = [
                {
                    "name": f"{k.lower()}s",
                    "singularName": k.lower(),
                    "namespaced": True,
                    "kind": k,
                    "verbs": ["get"],
                }
                for k in self.kinds[gv]
            ]
            body = {"kind": "APIResourceList", "groupVersion": gv, "resources": resources}
        data = json.dumps(body or {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *args: Any) -> None:
        pass


def helm_secret(name: str, data: dict[str, str], labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "cbec", "labels": labels},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def helm_upgrade(
    tmp_path: Path,
    values: dict[str, Any],
    stored_passwords: dict[str, str],
    stored: tuple[dict[str, Any], ...] = (),
) -> tuple[int, Rendered]:
    """`helm upgrade --dry-run=server` of release shop (revision 1 deployed, the state Secret holding
    these passwords, and the ``stored`` Secrets of that release, for `lookup`): the new revision and
    its manifests."""
    release = {
        "name": "shop",
        "namespace": "cbec",
        "version": 1,
        "info": {"status": "deployed"},
        "chart": {
            "metadata": {"name": "cbec", "version": "0.1.0", "apiVersion": "v2", "appVersion": "0.1.0"}
        },
        "config": {},
        "manifest": "",
    }
    history = helm_secret(
        "sh.helm.release.v1.shop.v1",
        {"release": base64.b64encode(gzip.compress(json.dumps(release).encode())).decode()},
        {"owner": "helm", "name": "shop", "status": "deployed", "version": "1"},
    )
    state = helm_secret("shop-cbec-state", stored_passwords, {"app.kubernetes.io/managed-by": "Helm"})
    state["metadata"]["annotations"] = {
        "meta.helm.sh/release-name": "shop",
        "meta.helm.sh/release-namespace": "cbec",
    }
    FakeApiServer.objects = {
        "/api/v1/namespaces/cbec/secrets": {"kind": "SecretList", "apiVersion": "v1", "items": [history]},
        "/api/v1/namespaces/cbec/secrets/shop-cbec-state": state,
    }
    for secret in stored:
        FakeApiServer.objects[f"/api/v1/namespaces/cbec/secrets/{secret['metadata']['name']}"] = secret
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApiServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        kubeconfig = tmp_path / "kubeconfig"
        cluster = {"server": f"http://127.0.0.1:{server.server_port}"}
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": cluster}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "c",
                }
            )
        )
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        args = [
            str(tool("helm")),
            "upgrade",
            "shop",
            str(CHART),
            "--namespace",
            "cbec",
            "--dry-run=server",
            "--disable-openapi-validation",
            "--kubeconfig",
            str(kubeconfig),
            "-f",
            str(values_file),
        ]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
        thread.join(timeout=10)
    assert result.returncode == 0, f"{shlex.join(args)}\n{result.stderr}"
    revision = int(re.search(r"^REVISION: (\d+)$", result.stdout, re.M).group(1))  # type: ignore[union-attr]
    manifest = result.stdout.split("\nMANIFEST:\n", 1)[1].split("\nNOTES:\n", 1)[0]
    return revision, Rendered(manifest, [d for d in yaml.safe_load_all(manifest) if d])


def test_an_upgrade_keeps_the_passwords_and_starts_a_new_training_job(tmp_path: Path) -> None:
    """`helm upgrade` reads the state Secret back (lookup) instead of making new passwords -- here the
    Secret holds only the postgres key, so the redis password is new -- and renders a Job with the new
    revision in its name (a new Job runs), while the CronJob keeps its name (updated in place)."""
    values = {"services": {"risk": {"training": {"enabled": True, "schedule": "@weekly"}}}}
    revision, upgraded = helm_upgrade(tmp_path, values, {"postgres-password": "the-one-initdb-used"})
    assert revision == 2
    [secret] = state_secrets(upgraded)
    assert base64.b64decode(secret["data"]["postgres-password"]) == b"the-one-initdb-used"
    assert len(base64.b64decode(secret["data"]["redis-password"])) == 32
    assert [j["metadata"]["name"] for j in upgraded.of_kind("Job")] == ["shop-cbec-risk-train-2"]
    assert [c["metadata"]["name"] for c in upgraded.of_kind("CronJob")] == ["shop-cbec-risk-train"]
    # the first install (and helm template): revision 1, fresh random passwords each time
    first, second = (helm_template(values) for _ in range(2))
    assert [j["metadata"]["name"] for j in first.of_kind("Job")] == ["shop-cbec-risk-train-1"]
    a, b = (state_secrets(r)[0]["data"]["postgres-password"] for r in (first, second))
    assert a != b


# --- training ----------------------------------------------------------------------------------------


def test_training_jobs_render_only_when_enabled(renders: dict[str, Rendered]) -> None:
    assert not renders["default"].of_kind("Job") and not renders["default"].of_kind("CronJob")
    [cron] = renders["training"].of_kind("CronJob")
    assert cron["metadata"]["name"] == "shop-cbec-risk-train"
    assert cron["spec"]["schedule"] == "0 3 * * 0"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = jobs(renders["training"])["shop-cbec-risk-train-1"]
    assert cron["spec"]["jobTemplate"]["spec"]["template"] == job["spec"]["template"]
    # a plain Job (no helm hook), named after the release revision, cleaned up after it finishes
    assert not any(k.startswith("helm.sh/hook") for k in job["metadata"].get("annotations", {}))
    assert job["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (
        1,
        21600,
        86400,
    )
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    only_one = helm_template({"services": {"vision": {"training": {"enabled": True}}}})
    assert list(jobs(only_one)) == ["shop-cbec-vision-train-1"] and not only_one.of_kind("CronJob")


def test_training_mounts_models_read_write_and_serving_read_only(renders: dict[str, Rendered]) -> None:
    rendered = renders["training"]
    for name in MODEL_SERVICES:
        job = jobs(rendered)[f"shop-cbec-{name}-train-1"]
        pod = job["spec"]["template"]["spec"]
        c = pod["containers"][0]
        [mount] = [m for m in c["volumeMounts"] if m["name"] == "models"]
        assert mount["mountPath"] == "/models" and not mount.get("readOnly", False)
        [volume] = [v for v in pod["volumes"] if v["name"] == "models"]
        assert volume["persistentVolumeClaim"] == {"claimName": "shop-cbec-models"}
        assert env_of(c)["CBEC_MODELS_DIR"] == "/models"
        serving = rendered.deployment(name)["spec"]["template"]["spec"]
        [mount] = [m for m in serving["containers"][0]["volumeMounts"] if m["name"] == "models"]
        assert mount["readOnly"] is True
        [volume] = [v for v in serving["volumes"] if v["name"] == "models"]
        assert volume["persistentVolumeClaim"]["readOnly"] is True
        # the same security and state settings as the service
        assert pod["securityContext"] == serving["securityContext"]
        assert c["securityContext"] == serving["containers"][0]["securityContext"]
        serving_env = env_of(serving["containers"][0])
        for var in ALWAYS | SHARED:
            assert env_of(c)[var] == serving_env[var], (name, var)
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == f"{name}-train"
        assert labels["cbec.ai/state-client"] == "true"


def test_embedded_training_shares_the_services_volume_on_its_node(renders: dict[str, Rendered]) -> None:
    rendered = renders["embedded training"]
    pod = jobs(rendered)["shop-cbec-risk-train-1"]["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "state"]
    assert volume["persistentVolumeClaim"] == {"claimName": "shop-cbec-risk-state"}
    [term] = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    risk = rendered.deployment("risk")["spec"]["template"]["metadata"]["labels"]
    assert term["labelSelector"]["matchLabels"].items() <= risk.items()


def test_gpu_training(renders: dict[str, Rendered]) -> None:
    pod = jobs(renders["gpu training"])["shop-cbec-vision-train-1"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"].endswith(":0.1.0-gpu")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env_of(c)["CBEC_DEVICE"] == "cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    cpu = helm_template({"services": {"vision": {"gpu": {"count": 1}, "training": {"enabled": True}}}})
    c = jobs(cpu)["shop-cbec-vision-train-1"]["spec"]["template"]["spec"]["containers"][0]
    assert c["image"].endswith(":0.1.0") and env_of(c)["CBEC_DEVICE"] == "cpu"


def test_job_and_cronjob_names_fit_kubernetes_limits() -> None:
    long = helm_template(
        {
            "fullnameOverride": "x" * 40,
            "services": {"risk": {"training": {"enabled": True, "schedule": "@daily"}}},
        }
    )
    assert all(len(d["metadata"]["name"]) <= 63 for d in long.of_kind("Job"))
    assert all(len(d["metadata"]["name"]) <= 52 for d in long.of_kind("CronJob"))


# --- refused values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        # the shared backend needs each store bundled or external
        ({"state": {"postgres": {"bundled": {"enabled": False}}}}, r"/state/postgres"),
        ({"state": {"redis": {"bundled": {"enabled": False}}}}, r"/state/redis"),
        (
            {"state": {"redis": {"external": {"url": "redis://cache:6379/0"}}}},
            r"state\.redis: both external\.url and bundled\.enabled are set",
        ),
        ({"state": {"backend": "sqlite"}}, r"/state/backend"),
        # no passwords in URLs
        (
            {
                "state": {
                    "postgres": {"bundled": {"enabled": False}, "external": {"url": "postgresql://u:pw@db/x"}}
                }
            },
            r"/state/postgres/external/url",
        ),
        (
            {
                "state": {
                    "redis": {"bundled": {"enabled": False}, "external": {"url": "redis://:pw@cache:6379/0"}}
                }
            },
            r"/state/redis/external/url",
        ),
        ({"state": {"redis": {"bundled": {"appendfsync": "no"}}}}, r"appendfsync"),
        # embedded: one replica per stateful service, no autoscaling
        (
            {"state": {"backend": "embedded"}, "services": {"risk": {"replicas": 2}}},
            r"state\.backend is embedded: risk .* services\.risk\.replicas must be 0 or 1 \(is 2\)",
        ),
        (
            {"state": {"backend": "embedded"}, "defaults": {"replicas": 3}},
            r"state\.backend is embedded: \w+ .*replicas must be 0 or 1 \(is 3\)",
        ),
        (
            {"state": {"backend": "embedded"}, "services": {"chat": {"autoscaling": {"enabled": True}}}},
            r"state\.backend is embedded: chat .* services\.chat\.autoscaling\.enabled must be false",
        ),
        # training
        (
            {
                "models": {"source": "objectStore", "objectStore": {"url": "s3://b/p"}},
                "services": {"risk": {"training": {"enabled": True}}},
            },
            r"services\.risk\.training\.enabled needs models\.source=pvc",
        ),
        ({"services": {"gateway": {"training": {"enabled": True}}}}, r"gateway serves no model"),
        (
            {"services": {"risk": {"training": {"enabled": True, "gpus": 1}}}},
            r"services\.risk\.training\.gpus is 1 but the service has no GPU image",
        ),
        ({"services": {"risk": {"training": {"schedule": "weekly"}}}}, r"schedule"),
        ({"services": {"risk": {"training": {"image": "x"}}}}, r"image"),
        # names the chart sets itself
        ({"services": {"risk": {"env": {"CBEC_STATE_DIR": "/data"}}}}, r"CBEC_STATE_DIR"),
        ({"defaults": {"env": {"CBEC_DATABASE_URL": "postgresql://x@y/z"}}}, r"CBEC_DATABASE_URL"),
        ({"services": {"redis": {"grpcPort": 6379, "metricsPort": 9999}}}, r"redis"),
        ({"services": {"risk": {"modelPollSeconds": "often"}}}, r"modelPollSeconds"),
    ],
)
def test_invalid_state_and_training_values_are_refused(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(RenderError) as failure:
        helm_template(values)
    assert re.search(complaint, str(failure.value)), str(failure.value)


def test_embedded_backend_allows_one_replica_and_a_stateless_gateway_to_scale() -> None:
    rendered = helm_template(
        {
            "state": {"backend": "embedded"},
            "services": {
                "gateway": {"replicas": 4, "autoscaling": {"enabled": True}},
                "risk": {"replicas": 0},
            },
        }
    )
    assert rendered.deployment("risk")["spec"]["replicas"] == 0
    assert rendered.get("HorizontalPodAutoscaler", "shop-cbec-gateway")
