"""The chart's ``tracing`` block: every serving container gets the collector and the sample ratio, as
the runtime's settings read them, and its NetworkPolicy lets it reach the collector; off by default."""

from __future__ import annotations

from typing import Any

import pytest

from services.runtime.config import RuntimeSettings
from tests.deploy.conftest import ALL_SERVICES, Rendered, RenderError, helm_template

COLLECTOR = "http://otel-collector.observability:4317"
OBSERVABILITY = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}
TRAINING = {"training": {"enabled": True}}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def serving(rendered: Rendered, service: str) -> dict[str, str]:
    return env_of(rendered.deployment(service)["spec"]["template"]["spec"]["containers"][0])


def collector_egress(rendered: Rendered, service: str) -> list[dict[str, Any]]:
    policy = rendered.get("NetworkPolicy", f"shop-cbec-{service}")
    return [r for r in policy["spec"]["egress"] if any(p.get("port") in (4317, 55680) for p in r["ports"])]


def test_tracing_is_off_by_default() -> None:
    rendered = helm_template({"services": {"recommender": TRAINING}})
    for service in ALL_SERVICES:
        assert not [k for k in serving(rendered, service) if k.startswith("CBEC_TRACE_")], service
        assert collector_egress(rendered, service) == []
    assert "CBEC_TRACE_" not in rendered.text


def test_every_serving_container_exports_to_the_collector_and_may_reach_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = {
        "tracing": {
            "enabled": True,
            "otlpEndpoint": COLLECTOR,
            "sampleRatio": 0.05,
            "egressTo": [OBSERVABILITY],
        },
        "services": {"recommender": TRAINING},
    }
    rendered = helm_template(values)
    for service in ALL_SERVICES:
        env = serving(rendered, service)
        assert env["CBEC_TRACE_OTLP_ENDPOINT"] == COLLECTOR, service
        assert env["CBEC_TRACE_SAMPLE_RATIO"] == "0.05", service
        # What the service makes of them: its settings read the rendered variables as they are.
        for key, value in env.items():
            if key.startswith("CBEC_TRACE_"):
                monkeypatch.setenv(key, value)
        settings = RuntimeSettings(service=service)
        assert (settings.trace_otlp_endpoint, settings.trace_sample_ratio) == (COLLECTOR, 0.05)
        rules = collector_egress(rendered, service)
        assert rules == [{"ports": [{"port": 4317, "protocol": "TCP"}], "to": [OBSERVABILITY]}], service
    # A training job serves nothing and calls nobody: it neither traces nor needs the collector.
    jobs = rendered.of_kind("Job") + rendered.of_kind("CronJob")
    assert jobs
    for job in jobs:
        spec = job["spec"].get("jobTemplate", job)["spec"]["template"]["spec"]
        assert not [k for c in spec["containers"] for k in env_of(c) if k.startswith("CBEC_TRACE_")]


def test_the_collectors_port_comes_from_its_url_and_any_destination_when_no_peers_are_given() -> None:
    values = {"tracing": {"enabled": True, "otlpEndpoint": "https://collector.example.com:55680"}}
    rendered = helm_template(values)
    assert serving(rendered, "gateway")["CBEC_TRACE_SAMPLE_RATIO"] == "0.01"  # the default ratio
    assert collector_egress(rendered, "chat") == [{"ports": [{"port": 55680, "protocol": "TCP"}]}]


@pytest.mark.parametrize(
    ("tracing", "field"),
    [
        ({"enabled": True}, "otlpEndpoint"),  # on, but nowhere to send
        ({"enabled": True, "otlpEndpoint": "otel-collector:4317"}, "otlpEndpoint"),  # no scheme
        ({"enabled": True, "otlpEndpoint": COLLECTOR, "sampleRatio": 2}, "sampleRatio"),
    ],
)
def test_bad_tracing_values_are_refused_naming_the_field(tracing: dict[str, Any], field: str) -> None:
    with pytest.raises(RenderError, match=f"tracing/{field}"):
        helm_template({"tracing": tracing})
