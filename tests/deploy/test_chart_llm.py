"""The chart's `llm` values: chat pointed at an external OpenAI-compatible endpoint or at an LLM server
Deployment of the release on a GPU node, the API key from a Secret, the settings chat reads from the
rendered environment, the network policies (evaluated), and the Kubernetes schemas."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from services.chat.config import ChatSettings
from tests.deploy.conftest import Rendered, RenderError, helm_template, kubernetes_validate
from tests.deploy.test_chart_netpol import Expect, admitted_matrix
from tests.deploy.test_chart_state import assert_restricted

EXTERNAL: dict[str, Any] = {
    "llm": {
        "mode": "external",
        "model": "qwen2.5-7b-instruct",
        "timeoutSeconds": 12.5,
        "apiKey": {"existingSecret": "cbec-llm", "key": "token"},
        "external": {
            "url": "https://llm.example.com/v1",
            "egressTo": [{"ipBlock": {"cidr": "203.0.113.0/24"}}],
        },
    }
}
SERVER: dict[str, Any] = {
    "llm": {
        "mode": "server",
        "apiKey": {"existingSecret": "cbec-llm"},
        "server": {"gpu": {"nodeSelector": {"nvidia.com/gpu.present": "true"}}, "runtimeClassName": "nvidia"},
    }
}
SERVER_URL = "http://shop-cbec-llm.cbec.svc.cluster.local:8080/v1"


def container(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]["containers"][0]


def env_of(doc: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(doc)["env"]}


def llm_objects(rendered: Rendered) -> list[tuple[str, str]]:
    return [
        (d["kind"], d["metadata"]["name"])
        for d in rendered.docs
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "llm"
    ]


@pytest.fixture(scope="module")
def external() -> Rendered:
    return helm_template(EXTERNAL)


@pytest.fixture(scope="module")
def server() -> Rendered:
    return helm_template(SERVER)


def test_in_process_by_default(default_chart: Rendered) -> None:
    env = env_of(default_chart.deployment("chat"))
    assert not [name for name in env if name.startswith("CBEC_CHAT_LLM_")]
    assert llm_objects(default_chart) == []


def test_external_endpoint_with_the_key_from_a_secret(
    external: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = env_of(external.deployment("chat"))
    assert env["CBEC_CHAT_LLM_BACKEND"] == "openai"
    assert env["CBEC_CHAT_LLM_URL"] == "https://llm.example.com/v1"
    assert env["CBEC_CHAT_LLM_MODEL"] == "qwen2.5-7b-instruct"
    assert env["CBEC_CHAT_LLM_TIMEOUT_S"] == "12.5"
    assert env["CBEC_CHAT_LLM_API_KEY"] == {"secretKeyRef": {"name": "cbec-llm", "key": "token"}}
    assert llm_objects(external) == []  # nothing to run in the release
    # The rendered variables are what chat's settings read (the Secret's value as the kubelet gives it).
    for name, value in env.items():
        if name.startswith("CBEC_CHAT_LLM_"):
            monkeypatch.setenv(name, value if isinstance(value, str) else "the-secret-value")
    settings = ChatSettings()
    assert (settings.llm_backend, settings.llm_url, settings.llm_model) == (
        "openai",
        "https://llm.example.com/v1",
        "qwen2.5-7b-instruct",
    )
    assert settings.llm_timeout_s == 12.5
    assert settings.llm_api_key.get_secret_value() == "the-secret-value"
    # The service's own env still wins over the llm block.
    override = helm_template({**EXTERNAL, "services": {"chat": {"env": {"CBEC_CHAT_LLM_TIMEOUT_S": "60"}}}})
    assert env_of(override.deployment("chat"))["CBEC_CHAT_LLM_TIMEOUT_S"] == "60"


def test_no_key_secret_means_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"llm": {"mode": "external", "external": {"url": "http://vllm.ml.svc:8000/v1"}}}
    env = env_of(helm_template(values).deployment("chat"))
    assert env["CBEC_CHAT_LLM_URL"] == "http://vllm.ml.svc:8000/v1" and "CBEC_CHAT_LLM_API_KEY" not in env


def test_llm_server_on_a_gpu_node_that_only_chat_reaches(server: Rendered) -> None:
    assert sorted(llm_objects(server)) == [
        ("Deployment", "shop-cbec-llm"),
        ("NetworkPolicy", "shop-cbec-llm"),
        ("Service", "shop-cbec-llm"),
    ]
    chat = env_of(server.deployment("chat"))
    assert chat["CBEC_CHAT_LLM_BACKEND"] == "openai" and chat["CBEC_CHAT_LLM_URL"] == SERVER_URL
    assert chat["CBEC_CHAT_LLM_API_KEY"] == {"secretKeyRef": {"name": "cbec-llm", "key": "api-key"}}
    dep = server.get("Deployment", "shop-cbec-llm")
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    assert c["image"] == "ghcr.io/ggml-org/llama.cpp:server-cuda"
    assert c["args"][-4:] == ["--host", "0.0.0.0", "--port", "8080"]
    assert "/models/llm/model.gguf" in c["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    key = {"secretKeyRef": {"name": "cbec-llm", "key": "api-key"}}
    assert env_of(dep)["LLAMA_API_KEY"] == key and env_of(dep)["VLLM_API_KEY"] == key
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 1200
    assert_restricted("llm", pod)
    assert pod["automountServiceAccountToken"] is False
    # The Service chat's URL names selects the server's pods on the port the URL carries.
    svc = server.get("Service", "shop-cbec-llm")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(8080, "http")]
    # Without chat there is nothing to serve.
    assert llm_objects(helm_template({**SERVER, "services": {"chat": {"enabled": False}}})) == []


@pytest.mark.parametrize("mode", ["server", "external"])
def test_network_policies_admit_chat_to_its_llm_and_nothing_else(mode: str) -> None:
    rendered = helm_template(SERVER if mode == "server" else EXTERNAL)
    found, pods = admitted_matrix(rendered)
    wanted = Expect().matrix(pods)
    if mode == "server":
        # The LLM server talks to DNS only (Expect counts every pod of the suite as a store client).
        wanted -= {("llm", "postgres", "postgres"), ("llm", "redis", "redis")}
        wanted.add(("chat", "llm", "http"))
    else:
        wanted.add(("chat", "internet", "https"))  # the endpoint's port, to egressTo's peers
    assert not found - wanted, f"admitted but not a call of the suite: {sorted(found - wanted)}"
    assert not wanted - found, f"a call of the suite that is refused: {sorted(wanted - found)}"


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"llm": {"mode": "external"}}, "llm.external.url is empty"),
        ({"llm": {"mode": "remote"}}, "mode"),
        ({"llm": {"mode": "external", "external": {"url": "llm.example.com:8000"}}}, "url"),
        ({"llm": {"server": {"env": {"LLAMA_API_KEY": "in-values"}}}}, "LLAMA_API_KEY"),
        ({"llm": {"apiKey": {"value": "in-values"}}}, "value"),
        ({"services": {"llm": {"grpcPort": 50070, "metricsPort": 9170}}}, "llm"),
    ],
)
def test_wrong_llm_values_are_refused(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(RenderError) as failure:
        helm_template(values)
    assert complaint in str(failure.value)


def test_manifests_validate_against_the_kubernetes_schemas(external: Rendered, server: Rendered) -> None:
    result = subprocess.run(
        [*kubernetes_validate(), "--strict", "--quiet", "-k", "1.30.0", "-"],
        input=external.text + "\n---\n" + server.text,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
