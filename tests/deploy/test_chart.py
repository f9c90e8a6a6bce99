"""The Helm chart: lint, render every documented combination, validate the manifests against the
Kubernetes schemas, and check what each value is supposed to change."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml

from services.runtime import registry
from services.runtime.config import DEFAULT_PORTS
from tests.deploy.conftest import (
    ALL_SERVICES,
    CHART,
    MODEL_SERVICES,
    Rendered,
    RenderError,
    helm_template,
    kubernetes_validate,
    tool,
)

# The combinations deploy/README.md documents; each must render and validate.
COMBINATIONS: dict[str, dict[str, Any]] = {
    "defaults (CPU only)": {},
    "gpu": {
        "services": {
            name: {
                "gpu": {"count": 1, "nodeSelector": {"nvidia.com/gpu.present": "true"}},
                "runtimeClassName": "nvidia",
            }
            for name in ("recommender", "vision", "sentiment", "chat")
        }
    },
    "autoscaling": {
        "defaults": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8}},
        "services": {
            "recommender": {"autoscaling": {"enabled": True, "inFlightPerPod": 16, "queueDepthPerPod": 32}}
        },
    },
    "network policies": {
        "networkPolicy": {
            "enabled": True,
            "gatewayFrom": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}],
        }
    },
    "object store models": {
        "models": {
            "source": "objectStore",
            "objectStore": {"url": "s3://models-bucket/cbec", "credentialsSecret": "cbec-models-s3"},
        },
        "services": {"risk": {"modelVersion": "20261129T030512123456Z"}},
    },
    "monitoring": {
        "monitoring": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "prometheusRule": {"enabled": True},
            "rulesConfigMap": {"enabled": True},
            "grafanaDashboard": {"enabled": True},
        }
    },
    "everything": {
        "models": {"source": "objectStore", "objectStore": {"url": "gs://b/models"}},
        "networkPolicy": {"enabled": True},
        "defaults": {"autoscaling": {"enabled": True}},
        "services": {
            "vision": {"gpu": {"count": 2}},
            "gateway": {
                "secretEnv": [
                    {"name": "CBEC_GATEWAY_API_KEYS_SHA256", "secretName": "gw-keys", "key": "keys"}
                ],
                "secretMounts": [{"name": "jwt", "secretName": "cbec-jwt", "mountPath": "/etc/cbec/jwt"}],
            },
        },
        "monitoring": {
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "grafanaDashboard": {"enabled": True},
        },
    },
    # The values examples in deploy/README.md, as written there (section in brackets).
    "readme: minimal install [2]": {
        "image": {"registry": "registry.acme.io/cbec", "pullSecrets": ["acme-registry"]},
        "models": {"source": "pvc", "pvc": {"existingClaim": "cbec-models"}},
        "monitoring": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "grafanaDashboard": {"enabled": True},
        },
    },
    "readme: tracing [7]": {
        "tracing": {
            "enabled": True,
            "otlpEndpoint": "http://otel-collector.observability:4317",
            "sampleRatio": 0.01,
        }
    },
    "readme: gateway credentials [2]": {
        "services": {
            "gateway": {
                "secretEnv": [
                    {
                        "name": "CBEC_GATEWAY_API_KEYS_SHA256",
                        "secretName": "cbec-gateway-keys",
                        "key": "keys.json",
                    }
                ],
                "secretMounts": [
                    {"name": "keys", "secretName": "cbec-gateway-keys", "mountPath": "/etc/cbec/keys"}
                ],
                "env": {"CBEC_GATEWAY_ENV": "prod", "CBEC_GATEWAY_API_KEYS_FILE": "/etc/cbec/keys/keys.json"},
            }
        }
    },
    "readme: a new service [2]": {
        "services": {"translate": {"grpcPort": 50060, "metricsPort": 9110, "gpuImage": True}}
    },
    "readme: chat's LLM on a GPU node [4]": {
        "llm": {
            "mode": "server",
            "apiKey": {"existingSecret": "cbec-llm", "key": "api-key"},
            "server": {
                "args": [
                    "--model",
                    "/models/llm/model.gguf",
                    "--n-gpu-layers",
                    "999",
                    "--ctx-size",
                    "32768",
                    "--parallel",
                    "8",
                ],
                "gpu": {"count": 1, "nodeSelector": {"nvidia.com/gpu.present": "true"}},
            },
        }
    },
    "readme: chat's LLM elsewhere [4]": {
        "llm": {
            "mode": "external",
            "external": {
                "url": "https://llm.example.com/v1",
                "egressTo": [{"ipBlock": {"cidr": "203.0.113.0/24"}}],
            },
        }
    },
    "readme: embedded state [3]": {
        "state": {"backend": "embedded", "embedded": {"size": "20Gi", "storageClassName": "standard-rwo"}},
        "services": {"gateway": {"replicas": 1}},
    },
    "readme: bundled stores, own Secret [3]": {
        "state": {
            "postgres": {
                "bundled": {
                    "existingSecret": "cbec-state-creds",
                    "storage": {"size": "50Gi", "storageClassName": "fast-ssd"},
                    "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
                }
            },
            "redis": {"bundled": {"existingSecret": "cbec-state-creds", "appendfsync": "always"}},
        }
    },
    "readme: external stores [3]": {
        "state": {
            "postgres": {
                "bundled": {"enabled": False},
                "external": {
                    "url": "postgresql://cbec@pg.db.internal:5432/cbec?sslmode=require",
                    "existingSecret": "cbec-db",
                    "passwordKey": "password",
                    "egressTo": [{"ipBlock": {"cidr": "10.20.0.0/24"}}],
                },
            },
            "redis": {
                "bundled": {"enabled": False},
                "external": {
                    "url": "rediss://cache.db.internal:6380/0",
                    "existingSecret": "cbec-redis",
                    "passwordKey": "password",
                    "egressTo": [{"ipBlock": {"cidr": "10.20.1.0/24"}}],
                },
            },
        }
    },
    "readme: GPU nodes [4]": {
        "services": {
            "recommender": {
                "gpu": {"count": 1, "nodeSelector": {"nvidia.com/gpu.present": "true"}},
                "runtimeClassName": "nvidia",
                "affinity": {},
            },
            "vision": {"gpu": {"count": 1}, "device": "cuda:0"},
        }
    },
    "readme: replicas and autoscaling [5]": {
        "services": {
            "risk": {"replicas": 3},
            "gateway": {"replicas": 3},
            "recommender": {
                "autoscaling": {
                    "enabled": True,
                    "minReplicas": 2,
                    "maxReplicas": 10,
                    "targetCPUUtilization": 70,
                    "inFlightPerPod": 16,
                }
            },
        }
    },
    "readme: training [6]": {
        "services": {
            "risk": {
                "training": {
                    "enabled": True,
                    "schedule": "0 3 * * *",
                    "timeZone": "Europe/Berlin",
                    "args": ["--data", "/models/datasets/transactions.csv.gz"],
                }
            },
            "chat": {"training": {"enabled": True, "args": ["--seed"]}},
            "recommender": {
                "training": {
                    "enabled": True,
                    "schedule": "0 2 * * 0",
                    "args": ["--interactions", "store", "--out", "$(CBEC_STATE_DIR)/recommender/eval"],
                }
            },
        }
    },
    "readme: vision training on your photos [6]": {
        "services": {
            "vision": {
                "training": {"enabled": True, "args": ["--images", "/models/datasets/photos"]},
                "env": {"CBEC_VISION_DATA_DIR": "/var/lib/cbec/vision"},
            }
        }
    },
    "readme: model version in values [6]": {"services": {"risk": {"modelVersion": "20261129T030512123456Z"}}},
    "tls: cert-manager": {
        "tls": {"certManager": {"enabled": True, "issuerRef": {"name": "cbec-ca", "kind": "ClusterIssuer"}}}
    },
    "tls: existing Secrets and token": {
        "tls": {"existingSecrets": {name: f"own-{name}-tls" for name in ALL_SERVICES}},
        "auth": {"internalToken": {"existingSecret": "own-token", "key": "secret"}},
    },
    "tls: off": {"tls": {"enabled": False}},
    "readme: cert-manager and own token [8]": {
        "tls": {"certManager": {"enabled": True, "issuerRef": {"name": "cbec-ca", "kind": "ClusterIssuer"}}},
        "auth": {"internalToken": {"existingSecret": "cbec-internal-token", "key": "token"}},
    },
    "readme: network policy peers [8]": {
        "networkPolicy": {
            "gatewayFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
            ],
            "servicesFrom": [{"namespaceSelector": {"matchLabels": {"team": "platform"}}}],
            "metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
                {"ipBlock": {"cidr": "10.0.0.10/32"}},
            ],
            "dnsTo": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                },
                {"ipBlock": {"cidr": "169.254.20.10/32"}},
            ],
        }
    },
}
OLDEST_KUBERNETES = "1.30.0"  # Chart.yaml kubeVersion


@pytest.fixture(scope="module")
def combos() -> dict[str, Rendered]:
    with ThreadPoolExecutor(4) as pool:
        rendered = dict(zip(COMBINATIONS, pool.map(helm_template, COMBINATIONS.values()), strict=True))
    return rendered


def validate(text: str, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*kubernetes_validate(), "--strict", "--quiet", "-k", version, "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=180,
    )


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_helm_lint_strict() -> None:
    result = subprocess.run(
        [str(tool("helm")), "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_combination_validates_against_the_kubernetes_schemas(combos: dict[str, Rendered]) -> None:
    # One validator run for all combinations (it is slow to start); per combination only on failure.
    everything = "\n---\n".join(r.text for r in combos.values())
    with ThreadPoolExecutor(2) as pool:
        oldest, newest = pool.map(
            lambda job: validate(*job),
            [(everything, OLDEST_KUBERNETES), (combos["everything"].text, "1.37.0")],
        )
    assert newest.returncode == 0, newest.stdout + newest.stderr
    if oldest.returncode != 0:
        failures = {name: validate(r.text, OLDEST_KUBERNETES) for name, r in combos.items()}
        report = {name: f.stdout + f.stderr for name, f in failures.items() if f.returncode != 0}
        pytest.fail(f"invalid manifests for {OLDEST_KUBERNETES}: {report or oldest.stdout + oldest.stderr}")


def test_the_validator_is_strict() -> None:
    """Negative control: an unknown field in a Deployment must fail validation."""
    bad = helm_template().deployment("risk")
    bad["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    result = validate(yaml.safe_dump(bad), OLDEST_KUBERNETES)
    assert result.returncode != 0
    assert "gpus" in result.stdout + result.stderr


def test_one_deployment_and_service_per_service(default_chart: Rendered) -> None:
    for name in ALL_SERVICES:
        dep = default_chart.deployment(name)
        svc = default_chart.get("Service", f"shop-cbec-{name}")
        grpc_port, metrics_port = DEFAULT_PORTS[name]
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
        ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
        assert ports["grpc"] == grpc_port and ports["metrics"] == metrics_port
        c = container(dep)
        assert {p["name"]: p["containerPort"] for p in c["ports"]}.items() >= {"grpc": grpc_port}.items()
        env = env_of(c)
        assert env["CBEC_GRPC_PORT"] == str(grpc_port) and env["CBEC_METRICS_PORT"] == str(metrics_port)
        assert c["image"] == f"registry.example.com/cbec/cbec-{name}:0.1.0"
        assert env["CBEC_DEVICE"] == "cpu"
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert default_chart.get("Service", "shop-cbec-gateway")["spec"].get("clusterIP") != "None"
    assert default_chart.get("Service", "shop-cbec-recommender")["spec"]["clusterIP"] == "None"
    assert {p["name"] for p in container(default_chart.deployment("gateway"))["ports"]} == {
        "grpc",
        "metrics",
        "http",
    }


def test_grpc_health_probes_and_startup_budget(default_chart: Rendered, combos: dict[str, Rendered]) -> None:
    """Native gRPC probes where the port takes them; with mutual TLS (a client certificate, which the
    kubelet's gRPC probe cannot present) the runtime's probe client with the pod's own certificate."""
    for name in ALL_SERVICES:
        c = container(default_chart.deployment(name))
        port = DEFAULT_PORTS[name][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if name == "gateway":  # its ports are the public API, without client certificates
                assert c[probe]["grpc"] == {"port": port}, (name, probe)
                assert c[probe]["timeoutSeconds"] == 2
                continue
            command = c[probe]["exec"]["command"]
            assert command[:4] == ["python", "-m", "services.runtime.probe", f"127.0.0.1:{port}"]
            args = dict(zip(command[4::2], command[5::2], strict=True))
            assert args == {
                "--timeout": "2",
                "--tls-ca": "/etc/cbec/tls/ca.crt",
                "--tls-cert": "/etc/cbec/tls/tls.crt",
                "--tls-key": "/etc/cbec/tls/tls.key",
                "--tls-server-name": f"shop-cbec-{name}.cbec.svc.cluster.local",
            }
            assert c[probe]["timeoutSeconds"] == 5  # the call's 2 s and the interpreter's start
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    for name in ALL_SERVICES:
        c = container(combos["tls: off"].deployment(name))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": DEFAULT_PORTS[name][0]}, (name, probe)
    slow = helm_template({"services": {"chat": {"startupTimeoutSeconds": 1805}}})
    startup = container(slow.deployment("chat"))["startupProbe"]
    assert startup["failureThreshold"] == 181  # ceil(1805 / 10)
    assert slow.deployment("chat")["spec"]["progressDeadlineSeconds"] > 1805


def test_gpu_allocation_placement_and_image(combos: dict[str, Rendered]) -> None:
    gpu = combos["gpu"]
    for name in ("recommender", "vision", "sentiment", "chat"):
        dep = gpu.deployment(name)
        pod = dep["spec"]["template"]["spec"]
        c = container(dep)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert c["resources"]["limits"]["memory"]  # the service's own limits are kept
        assert c["image"].endswith(":0.1.0-gpu")
        assert env_of(c)["CBEC_DEVICE"] == "cuda"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["runtimeClassName"] == "nvidia"
        assert dep["spec"]["template"]["metadata"]["labels"]["cbec.ai/gpus"] == "1"
    risk = gpu.deployment("risk")
    assert "tolerations" not in risk["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in container(risk)["resources"].get("limits", {})
    two = combos["everything"].deployment("vision")
    assert container(two)["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_gpu_on_a_service_without_gpu_image_is_refused() -> None:
    with pytest.raises(
        RenderError, match=r"services\.risk\.gpu\.count is 1 but the service has no GPU image"
    ):
        helm_template({"services": {"risk": {"gpu": {"count": 1}}}})


def test_security_context_on_every_container(combos: dict[str, Rendered]) -> None:
    for rendered in (combos["defaults (CPU only)"], combos["object store models"]):
        for dep in rendered.of_kind("Deployment"):
            pod = dep["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
            for c in pod["containers"] + pod.get("initContainers", []):
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"] == {"drop": ["ALL"]}
                assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # writable: an emptyDir


def test_autoscaling_replaces_replicas_and_adds_custom_metrics(combos: dict[str, Rendered]) -> None:
    rendered = combos["autoscaling"]
    hpas = {h["metadata"]["name"]: h for h in rendered.of_kind("HorizontalPodAutoscaler")}
    assert set(hpas) == {f"shop-cbec-{n}" for n in ALL_SERVICES}
    for name in ALL_SERVICES:
        assert "replicas" not in rendered.deployment(name)["spec"]  # the HPA owns it
    rec = hpas["shop-cbec-recommender"]["spec"]
    assert rec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "shop-cbec-recommender",
    }
    assert (rec["minReplicas"], rec["maxReplicas"]) == (2, 8)
    pods_metrics = {
        m["pods"]["metric"]["name"]: m["pods"]["target"] for m in rec["metrics"] if m["type"] == "Pods"
    }
    assert pods_metrics == {
        "grpc_server_in_flight": {"type": "AverageValue", "averageValue": "16"},
        "model_queue_depth": {"type": "AverageValue", "averageValue": "32"},
    }
    assert [m["type"] for m in hpas["shop-cbec-risk"]["spec"]["metrics"]] == ["Resource"]
    with pytest.raises(RenderError, match="minReplicas 5 > maxReplicas 3"):
        helm_template(
            {"services": {"risk": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}}}
        )


def test_pdb_and_topology_spread_select_the_service_pods(default_chart: Rendered) -> None:
    for name in ALL_SERVICES:
        dep = default_chart.deployment(name)
        labels = dep["spec"]["template"]["metadata"]["labels"]
        pdb = default_chart.get("PodDisruptionBudget", f"shop-cbec-{name}")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pdb["spec"]["maxUnavailable"] == 1
        spread = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {s["topologyKey"] for s in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        assert all(s["labelSelector"]["matchLabels"].items() <= labels.items() for s in spread)
    off = helm_template({"defaults": {"topologySpread": {"enabled": False}, "pdb": {"enabled": False}}})
    assert not off.of_kind("PodDisruptionBudget")
    assert "topologySpreadConstraints" not in off.deployment("risk")["spec"]["template"]["spec"]


def test_network_policies_let_only_the_gateway_reach_the_services(combos: dict[str, Rendered]) -> None:
    # The full matrix of allowed calls is in test_chart_state.py; this checks the rules' shape.
    rendered = combos["network policies"]
    labels = {n: rendered.deployment(n)["spec"]["template"]["metadata"]["labels"] for n in ALL_SERVICES}
    for name in MODEL_SERVICES:
        policy = rendered.get("NetworkPolicy", f"shop-cbec-{name}")["spec"]
        assert policy["podSelector"]["matchLabels"].items() <= labels[name].items()
        assert policy["policyTypes"] == ["Ingress", "Egress"]
        grpc_rule, metrics_rule = policy["ingress"]
        assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
        callers = sorted(registry.callers(name))  # the gateway; for sentiment also chat (anger check)
        assert len(grpc_rule["from"]) == len(callers)
        for peer, caller in zip(grpc_rule["from"], callers, strict=True):
            assert peer["podSelector"]["matchLabels"].items() <= labels[caller].items()
        assert metrics_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
        assert metrics_rule["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ]
    gateway = rendered.get("NetworkPolicy", "shop-cbec-gateway")["spec"]
    assert gateway["ingress"][0]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]
    assert helm_template().of_kind("NetworkPolicy")  # on by default
    assert not helm_template({"networkPolicy": {"enabled": False}}).of_kind("NetworkPolicy")


def test_models_from_a_pvc_read_only_with_the_version_visible(default_chart: Rendered) -> None:
    claim = default_chart.get("PersistentVolumeClaim", "shop-cbec-models")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for name in MODEL_SERVICES:
        dep = default_chart.deployment(name)
        pod = dep["spec"]["template"]["spec"]
        [volume] = [v for v in pod["volumes"] if v["name"] == "models"]
        assert volume["persistentVolumeClaim"] == {"claimName": "shop-cbec-models", "readOnly": True}
        mount = next(m for m in container(dep)["volumeMounts"] if m["name"] == "models")
        assert mount["readOnly"] is True
        assert env_of(container(dep))["CBEC_MODELS_DIR"] == "/models"
        assert dep["spec"]["template"]["metadata"]["labels"]["cbec.ai/model-version"] == "newest"
    gateway = default_chart.deployment("gateway")
    assert "CBEC_MODELS_DIR" not in env_of(container(gateway))
    assert all(v["name"] != "models" for v in gateway["spec"]["template"]["spec"]["volumes"])
    pinned = helm_template({"services": {"vision": {"modelVersion": "20261129T030512123456Z"}}})
    dep = pinned.deployment("vision")
    assert env_of(container(dep))["CBEC_MODEL_VERSION"] == "20261129T030512123456Z"
    assert dep["spec"]["template"]["metadata"]["labels"]["cbec.ai/model-version"] == "20261129T030512123456Z"
    assert dep["spec"]["template"]["metadata"]["annotations"]["cbec.ai/model-path"] == (
        "/models/vision/20261129T030512123456Z"
    )
    existing = helm_template({"models": {"pvc": {"existingClaim": "trained-models"}}})
    assert not existing.of_kind("PersistentVolumeClaim")
    assert "trained-models" in existing.text


def test_models_from_an_object_store_through_an_init_container(combos: dict[str, Rendered]) -> None:
    rendered = combos["object store models"]
    assert not rendered.of_kind("PersistentVolumeClaim")
    for name in MODEL_SERVICES:
        pod = rendered.deployment(name)["spec"]["template"]["spec"]
        [init] = pod["initContainers"]
        env = env_of(init)
        assert env["CBEC_MODELS_URL"] == ":s3:models-bucket/cbec"
        assert env["CBEC_SERVICE"] == name
        assert init["envFrom"] == [{"secretRef": {"name": "cbec-models-s3"}}]
        assert next(v for v in pod["volumes"] if v["name"] == "models")["emptyDir"]
    assert env_of(rendered.deployment("risk")["spec"]["template"]["spec"]["initContainers"][0])[
        "CBEC_MODEL_VERSION"
    ] == ("20261129T030512123456Z")
    assert "initContainers" not in rendered.deployment("gateway")["spec"]["template"]["spec"]
    gcs = combos["everything"].deployment("vision")["spec"]["template"]["spec"]["initContainers"][0]
    assert env_of(gcs)["CBEC_MODELS_URL"] == ":gcs:b/models"
    with pytest.raises(RenderError, match="url"):
        helm_template({"models": {"source": "objectStore"}})


def test_secrets_come_from_kubernetes_secrets_never_values(combos: dict[str, Rendered]) -> None:
    gateway = container(combos["everything"].deployment("gateway"))
    assert env_of(gateway)["CBEC_GATEWAY_API_KEYS_SHA256"] == {
        "secretKeyRef": {"name": "gw-keys", "key": "keys"}
    }
    assert {"name": "secret-jwt", "mountPath": "/etc/cbec/jwt", "readOnly": True} in gateway["volumeMounts"]
    volumes = combos["everything"].deployment("gateway")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "secret-jwt", "secret": {"secretName": "cbec-jwt", "defaultMode": 0o440}} in volumes
    assert env_of(gateway)["CBEC_GATEWAY_ENV"] == "prod"
    ok = helm_template(
        {"services": {"gateway": {"env": {"CBEC_GATEWAY_API_KEYS_FILE": "/etc/cbec/keys/keys.json"}}}}
    )
    assert (
        env_of(container(ok.deployment("gateway")))["CBEC_GATEWAY_API_KEYS_FILE"]
        == "/etc/cbec/keys/keys.json"
    )
    for bad_env in ({"CBEC_GATEWAY_DEV_API_KEY": "abc"}, {"STRIPE_SECRET": "x"}, {"DB_PASSWORD": "x"}):
        with pytest.raises(RenderError, match=f"env/{next(iter(bad_env))}"):
            helm_template({"services": {"gateway": {"env": bad_env}}})


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"services": {"recommender": {"replicas": "two"}}}, "replicas"),
        ({"services": {"recommender": {"gpu": {"cout": 1}}}}, "cout"),
        ({"services": {"recommender": {"modelVersion": "latest"}}}, "modelVersion"),
        ({"services": {"vision": {"device": "tpu"}}}, "device"),
        ({"services": {"vision": {"env": {"CBEC_GRPC_PORT": "1"}}}}, "CBEC_GRPC_PORT"),
        ({"services": {"new_svc": {"grpcPort": 50060, "metricsPort": 9110}}}, "new_svc"),
        ({"services": {"translate": {"grpcPort": 50060}}}, "metricsPort"),
        ({"models": {"source": "s3"}}, "source"),
        ({"monitoring": {"alerts": {"errorRatio": {"threshold": 5}}}}, "threshold"),
        ({"networkPolicy": {"enable": True}}, "enable"),
    ],
)
def test_schema_rejects_wrong_values(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(RenderError) as failure:
        helm_template(values)
    assert complaint in str(failure.value)


def test_a_new_service_is_one_values_block() -> None:
    rendered = helm_template(
        {
            "services": {"translate": {"grpcPort": 50060, "metricsPort": 9110}},
            "monitoring": {"rulesConfigMap": {"enabled": True}},
        }
    )
    dep = rendered.deployment("translate")
    assert env_of(container(dep))["CBEC_GRPC_PORT"] == "50060"
    for kind in ("Service", "PodDisruptionBudget"):
        rendered.get(kind, "shop-cbec-translate")
    gateway_env = env_of(container(rendered.deployment("gateway")))
    assert (
        gateway_env["CBEC_GATEWAY_TRANSLATE_ADDR"]
        == "dns:///shop-cbec-translate.cbec.svc.cluster.local:50060"
    )
    rules = next(c for c in rendered.of_kind("ConfigMap") if "cbec-alerts.yaml" in c["data"])["data"][
        "cbec-alerts.yaml"
    ]
    assert 'service="translate"' in rules and "translate|vision" in rules


def test_a_disabled_service_leaves_nothing_behind() -> None:
    rendered = helm_template(
        {"services": {"chat": {"enabled": False}}, "monitoring": {"rulesConfigMap": {"enabled": True}}}
    )
    assert not [d for d in rendered.docs if d["metadata"]["name"] == "shop-cbec-chat"]
    assert "CBEC_GATEWAY_CHAT_ADDR" not in env_of(container(rendered.deployment("gateway")))
    rules = next(c for c in rendered.of_kind("ConfigMap") if "cbec-alerts.yaml" in c["data"])["data"][
        "cbec-alerts.yaml"
    ]
    assert "chat" not in rules


def test_gateway_reaches_every_backend_through_its_headless_service(default_chart: Rendered) -> None:
    env = env_of(container(default_chart.deployment("gateway")))
    for name in MODEL_SERVICES:
        svc = default_chart.get("Service", f"shop-cbec-{name}")
        port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert (
            env[f"CBEC_GATEWAY_{name.upper()}_ADDR"]
            == f"dns:///shop-cbec-{name}.cbec.svc.cluster.local:{port}"
        )


def test_service_env_overrides_and_explicit_false_survive_the_merge() -> None:
    rendered = helm_template(
        {
            "defaults": {"env": {"CBEC_BATCH_MAX_SIZE": "32"}},
            "services": {
                "risk": {"env": {"CBEC_BATCH_MAX_SIZE": 128}, "pdb": {"enabled": False}, "replicas": 0},
                "vision": {"device": "cuda:1", "gpu": {"count": 1}},
            },
        }
    )
    assert env_of(container(rendered.deployment("risk")))["CBEC_BATCH_MAX_SIZE"] == "128"
    assert env_of(container(rendered.deployment("sentiment")))["CBEC_BATCH_MAX_SIZE"] == "32"
    assert rendered.deployment("risk")["spec"]["replicas"] == 0
    with pytest.raises(KeyError):
        rendered.get("PodDisruptionBudget", "shop-cbec-risk")
    vision = rendered.deployment("vision")
    assert env_of(container(vision))["CBEC_DEVICE"] == "cuda:1"
    # gpu: {count: 1} keeps the default GPU tolerations (maps merge one level deep)
    assert vision["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_monitoring_objects(combos: dict[str, Rendered]) -> None:
    rendered = combos["monitoring"]
    [monitor] = rendered.of_kind("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    for name in ALL_SERVICES:
        svc = rendered.get("Service", f"shop-cbec-{name}")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    assert endpoint["relabelings"][0]["targetLabel"] == "service"
    [rule] = rendered.of_kind("PrometheusRule")
    configmap = next(c for c in rendered.of_kind("ConfigMap") if "cbec-alerts.yaml" in c["data"])
    assert rule["spec"] == yaml.safe_load(configmap["data"]["cbec-alerts.yaml"])
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {
        "CbecHighErrorRatio",
        "CbecHighLatencyP99",
        "CbecRequestsRejected",
        "CbecQueueSaturation",
        "CbecModelNotLoaded",
        "CbecModelLoadFailed",
        "CbecRiskRatesStale",
        "CbecTargetDown",
    }
    dashboard_cm = rendered.get("ConfigMap", "shop-cbec-dashboard")
    assert dashboard_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboard_cm["data"]["cbec.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "cbec.json").read_text())
    assert dashboard["uid"] == "cbec-services"
    pod_annotations = rendered.deployment("vision")["spec"]["template"]["metadata"]["annotations"]
    assert pod_annotations["prometheus.io/port"] == "9104"
