"""The chart's NetworkPolicies, evaluated: a small model of Kubernetes NetworkPolicy semantics decides,
for every (source pod, destination pod, port) of the suite and a few outside pods, whether a connection
is admitted (the source's egress AND the destination's ingress), and the whole matrix is compared with
the calls the suite makes -- nothing more, nothing less."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from services.runtime.registry import SERVICES
from tests.deploy.conftest import ALL_SERVICES, MODEL_SERVICES, Rendered, helm_template

NS = "cbec"


@dataclass(frozen=True)
class Pod:
    """A pod as NetworkPolicies see it; `ports` are what it listens on: name -> (port, protocol)."""

    name: str
    namespace: str | None  # None: outside the cluster (matched by ipBlock only)
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    ip: str = "10.0.0.1"
    suite: bool = False  # part of the release (its policies govern it)


NAMESPACE_LABELS = {
    NS: {"kubernetes.io/metadata.name": NS},
    "kube-system": {"kubernetes.io/metadata.name": "kube-system"},
    "monitoring": {"kubernetes.io/metadata.name": "monitoring"},
    "web": {"kubernetes.io/metadata.name": "web", "team": "web"},
    "platform": {"kubernetes.io/metadata.name": "platform", "team": "platform"},
}
OUTSIDE = [
    Pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, {"dns-udp": (53, "UDP"), "dns-tcp": (53, "TCP")}),
    Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}),
    Pod("storefront", "web", {"app": "storefront"}),
    Pod("platform-team", "platform", {"app": "batch"}),
    Pod("stranger", NS, {"app": "debug-shell"}),  # another pod in the release's namespace
    Pod("internet", None, ports={"https": (443, "TCP")}, ip="203.0.113.7"),
    Pod("db-vm", None, ports={"postgres": (5432, "TCP")}, ip="10.20.0.5"),
    Pod("cache-vm", None, ports={"redis": (6380, "TCP")}, ip="10.20.0.6"),
]


# --- NetworkPolicy semantics -------------------------------------------------------------------------


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels + matchExpressions); {} selects everything."""
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def peer_matches(peer: Mapping[str, Any], policy_namespace: str, pod: Pod) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(pod.ip)
        if ip not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(ip in ipaddress.ip_network(c) for c in block.get("except", []))
    if pod.namespace is None:  # outside the cluster: only ipBlocks match
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], NAMESPACE_LABELS[pod.namespace]):
            return False
    elif pod.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector"), pod.labels)


def port_matches(rule_ports: list[Mapping[str, Any]] | None, dest: Pod, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        value = p["port"]
        if isinstance(value, str):  # a named port of the destination pod
            if dest.ports.get(value) == (port, protocol):
                return True
        elif value <= port <= p.get("endPort", value):
            return True
    return False


def policies_for(policies: list[dict[str, Any]], pod: Pod, kind: str) -> list[dict[str, Any]]:
    return [
        p
        for p in policies
        if pod.namespace == p["metadata"]["namespace"]
        and kind in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], pod.labels)
    ]


def admitted(policies: list[dict[str, Any]], src: Pod, dst: Pod, port: int, protocol: str) -> bool:
    """A connection goes through when the source may send it and the destination may receive it."""
    egress = policies_for(policies, src, "Egress")
    if egress and not any(
        (
            not rule.get("to")
            or any(peer_matches(peer, p["metadata"]["namespace"], dst) for peer in rule["to"])
        )
        and port_matches(rule.get("ports"), dst, port, protocol)
        for p in egress
        for rule in p["spec"].get("egress") or []
    ):
        return False
    ingress = policies_for(policies, dst, "Ingress")
    return not ingress or any(
        (
            not rule.get("from")
            or any(peer_matches(peer, p["metadata"]["namespace"], src) for peer in rule["from"])
        )
        and port_matches(rule.get("ports"), dst, port, protocol)
        for p in ingress
        for rule in p["spec"].get("ingress") or []
    )


# --- the release's pods ------------------------------------------------------------------------------


def pod_templates(rendered: Rendered) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in rendered.docs:
        kind = doc["kind"]
        if kind in ("Deployment", "StatefulSet", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]
        elif kind == "CronJob":
            yield doc["metadata"]["name"], doc["spec"]["jobTemplate"]["spec"]["template"]


def suite_pods(rendered: Rendered) -> list[Pod]:
    """One pod per workload, named by its component label (recommender, postgres, risk-train, ...)."""
    pods: dict[str, Pod] = {}
    for n, (_, template) in enumerate(pod_templates(rendered)):
        labels = template["metadata"]["labels"]
        ports = {
            p["name"]: (p["containerPort"], p.get("protocol", "TCP"))
            for c in template["spec"]["containers"]
            for p in c.get("ports", [])
        }
        name = labels["app.kubernetes.io/component"]
        pods[name] = Pod(name, NS, labels, ports, ip=f"10.1.0.{n + 1}", suite=True)
    return list(pods.values())


def probe_ports(pod: Pod) -> list[tuple[str, int, str]]:
    """What to try on a destination: its named ports, and 443 and 53 everywhere (nothing listens there
    on the suite's pods, so any admission there is a too-wide rule)."""
    out = [(name, port, proto) for name, (port, proto) in pod.ports.items()]
    seen = {(port, proto) for _, port, proto in out}
    for extra in ((443, "TCP"), (53, "UDP"), (53, "TCP")):
        if extra not in seen:
            out.append((f"{extra[0]}/{extra[1]}", *extra))
    return out


Matrix = set[tuple[str, str, str]]


def admitted_matrix(rendered: Rendered) -> tuple[Matrix, list[Pod]]:
    """Every admitted (source, destination, port name) where the source or the destination is ours."""
    policies = rendered.of_kind("NetworkPolicy")
    pods = suite_pods(rendered) + OUTSIDE
    found: Matrix = set()
    for src in pods:
        for dst in pods:
            if src is dst or not (src.suite or dst.suite):
                continue
            for port_name, port, proto in probe_ports(dst):
                if admitted(policies, src, dst, port, proto):
                    found.add((src.name, dst.name, port_name))
    return found, pods


@dataclass
class Expect:
    """The calls the suite makes, for one set of values."""

    gateway_from: Callable[[Pod], bool] = lambda pod: True
    services_from: Callable[[Pod], bool] = lambda pod: False
    metrics_from: Callable[[Pod], bool] = lambda pod: pod.namespace == "monitoring"
    stores: str = "bundled"  # bundled | external | none
    object_store: bool = False

    def matrix(self, pods: list[Pod]) -> Matrix:
        by_name = {p.name: p for p in pods}
        services = [p for p in pods if p.suite and p.name in ALL_SERVICES]
        clients = [p for p in pods if p.suite and p.name not in ("postgres", "redis")]  # + training
        out: Matrix = set()
        for src in pods:
            if src.suite:
                continue
            if self.gateway_from(src):
                out |= {(src.name, "gateway", "grpc"), (src.name, "gateway", "http")}
            if self.services_from(src):
                out |= {(src.name, s.name, "grpc") for s in services if s.name != "gateway"}
            if self.metrics_from(src):
                out |= {(src.name, s.name, "metrics") for s in services}
        # Each service reaches exactly the services the registry says it calls (those that are enabled).
        out |= {
            (caller, upstream, "grpc")
            for caller in by_name
            if caller in SERVICES
            for upstream in SERVICES[caller].calls
            if upstream in by_name
        }
        for c in clients:
            out |= {(c.name, "kube-dns", "dns-udp"), (c.name, "kube-dns", "dns-tcp")}
            if self.stores == "bundled":
                out |= {(c.name, "postgres", "postgres"), (c.name, "redis", "redis")}
            elif self.stores == "external":
                out |= {(c.name, "db-vm", "postgres"), (c.name, "cache-vm", "redis")}
        if self.object_store:  # objectStoreEgress's default: any destination on 443 (the store's)
            out |= {
                (s.name, dst.name, port_name)
                for s in services
                if s.name in MODEL_SERVICES
                for dst in pods
                if not dst.suite
                for port_name, port, proto in probe_ports(dst)
                if (port, proto) == (443, "TCP")
            }
        return out


def check(rendered: Rendered, expect: Expect) -> Matrix:
    found, pods = admitted_matrix(rendered)
    wanted = expect.matrix(pods)
    assert not found - wanted, f"admitted but not a call of the suite: {sorted(found - wanted)}"
    assert not wanted - found, f"a call of the suite that is refused: {sorted(wanted - found)}"
    return found


TRAINING = {
    "risk": {"training": {"enabled": True, "schedule": "0 3 * * 0"}},
    "chat": {"training": {"enabled": True}},
}
EXTERNAL = {
    "postgres": {
        "bundled": {"enabled": False},
        "external": {
            "url": "postgresql://cbec@db.internal:5432/cbec",
            "existingSecret": "cbec-db",
            "egressTo": [{"ipBlock": {"cidr": "10.20.0.5/32"}}],
        },
    },
    "redis": {
        "bundled": {"enabled": False},
        "external": {
            "url": "rediss://cache.internal:6380/0",
            "existingSecret": "cbec-redis",
            "egressTo": [{"ipBlock": {"cidr": "10.20.0.6/32"}}],
        },
    },
}
SCENARIOS: dict[str, tuple[dict[str, Any], Expect]] = {
    "defaults": ({}, Expect()),
    "training jobs": ({"services": TRAINING}, Expect()),
    "external stores": ({"state": EXTERNAL, "services": TRAINING}, Expect(stores="external")),
    "embedded": ({"state": {"backend": "embedded"}, "services": TRAINING}, Expect(stores="none")),
    "restricted clients": (
        {
            "networkPolicy": {
                "gatewayFrom": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}],
                "servicesFrom": [{"namespaceSelector": {"matchLabels": {"team": "platform"}}}],
                "metricsFrom": [
                    {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                    }
                ],
            }
        },
        Expect(
            gateway_from=lambda pod: pod.namespace == "web",
            services_from=lambda pod: pod.namespace == "platform",
        ),
    ),
    "object store models": (
        {"models": {"source": "objectStore", "objectStore": {"url": "s3://models/cbec"}}},
        Expect(object_store=True),
    ),
    "no chat": ({"services": {"chat": {"enabled": False}}}, Expect()),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_policies_admit_exactly_the_calls_of_the_suite(scenario: str) -> None:
    values, expect = SCENARIOS[scenario]
    rendered = helm_template(values)
    found = check(rendered, expect)
    names = {p.name for p in suite_pods(rendered)}
    if scenario in ("training jobs", "external stores", "embedded"):
        assert {"risk-train", "chat-train"} <= names  # the Job's and the CronJob's pods
    if expect.stores == "bundled":
        assert ("risk", "postgres", "postgres") in found
        assert ("stranger", "postgres", "postgres") not in found


def test_every_pod_of_the_release_is_isolated_both_ways() -> None:
    rendered = helm_template({"services": TRAINING})
    policies = rendered.of_kind("NetworkPolicy")
    for pod in suite_pods(rendered):
        for kind in ("Ingress", "Egress"):
            assert policies_for(policies, pod, kind), f"{pod.name}: no {kind} policy"
    # training pods carry none of the service's labels, so Services and the service's policy skip them
    services = {s["metadata"]["name"]: s["spec"]["selector"] for s in rendered.of_kind("Service")}
    for pod in suite_pods(rendered):
        if pod.name.endswith("-train"):
            assert not any(selects({"matchLabels": sel}, pod.labels) for sel in services.values())


def test_the_evaluator_refuses_what_a_cluster_refuses() -> None:
    """Negative controls for the model itself."""
    rendered = helm_template()
    policies = rendered.of_kind("NetworkPolicy")
    pods = {p.name: p for p in suite_pods(rendered) + OUTSIDE}
    assert admitted(policies, pods["gateway"], pods["risk"], 50055, "TCP")
    assert not admitted(policies, pods["gateway"], pods["risk"], 50055, "UDP")
    assert not admitted(policies, pods["gateway"], pods["risk"], 9105, "TCP")  # metrics: not from the gateway
    assert not admitted(policies, pods["chat"], pods["risk"], 50055, "TCP")
    assert not admitted(policies, pods["risk"], pods["internet"], 443, "TCP")
    assert not admitted(policies, pods["postgres"], pods["redis"], 6379, "TCP")
    # without policies everything is admitted
    assert admitted([], pods["chat"], pods["risk"], 50055, "TCP")
    assert selects({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["x"]}]}, {"a": "y"})
    assert not selects({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {})


def test_dns_and_extra_egress_are_configurable() -> None:
    rendered = helm_template(
        {
            "networkPolicy": {
                "dnsTo": [{"ipBlock": {"cidr": "169.254.20.10/32"}}],
                "extraEgress": [{"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}], "ports": [{"port": 443}]}],
            }
        }
    )
    policies = rendered.of_kind("NetworkPolicy")
    pods = {p.name: p for p in suite_pods(rendered) + OUTSIDE}
    node_local_dns = Pod("node-local-dns", None, ports={"dns": (53, "UDP")}, ip="169.254.20.10")
    for name in ALL_SERVICES:
        assert admitted(policies, pods[name], node_local_dns, 53, "UDP")
        assert not admitted(policies, pods[name], pods["kube-dns"], 53, "UDP")
        assert admitted(policies, pods[name], pods["internet"], 443, "TCP")
    assert not admitted(policies, pods["postgres"], pods["internet"], 443, "TCP")
