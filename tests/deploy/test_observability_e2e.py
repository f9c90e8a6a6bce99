"""Observability end to end: a real Prometheus (Debian `prometheus`) on 127.0.0.1 scrapes a running
service built on the runtime, evaluates the chart's alert rules, and answers the dashboard's queries.

The service is the runtime's test service (tests/runtime/echo_service.py) added to the chart as one more
values block, so the rendered rules select it exactly as they select a real service in a cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import wrappers_pb2 as w

from services.runtime.probe import wait_serving
from tests.deploy.conftest import CHART, ROOT, helm_template, rules_from, tool
from tests.runtime.conftest import EchoClient
from tests.runtime.echo_service import write_version
from tests.runtime.test_process import free_port

Query = Callable[[str], list[dict[str, Any]]]


def start_echo(models: Path, grpc_port: int, metrics_port: int) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "CBEC_HOST": "127.0.0.1",
        "CBEC_GRPC_PORT": str(grpc_port),
        "CBEC_METRICS_PORT": str(metrics_port),
        "CBEC_MODELS_DIR": str(models),
        "CBEC_DEVICE": "cpu",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.runtime.echo_service"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_prometheus(workdir: Path, metrics_port: int, grpc_port: int) -> tuple[subprocess.Popen[str], int]:
    values = {
        "services": {"echo": {"grpcPort": grpc_port, "metricsPort": metrics_port}},
        "monitoring": {
            "rulesConfigMap": {"enabled": True},
            "alerts": {"modelNotLoaded": {"for": "2s"}, "errorRatio": {"for": "1s"}},
        },
    }
    (workdir / "rules.yaml").write_text(rules_from(helm_template(values)))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [
            {
                # As the chart's ServiceMonitor does: keep the metrics' own labels, add `service`.
                "job_name": "cbec-echo",
                "honor_labels": True,
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{metrics_port}"],
                        "labels": {"service": "echo", "namespace": "e2e"},
                    }
                ],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            str(tool("prometheus")),
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, port


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last answer: {last!r}")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Query, Path]]:
    models = tmp_path / "models"
    models.mkdir()
    grpc_port, metrics_port = free_port(), free_port()
    service = start_echo(models, grpc_port, metrics_port)
    prometheus, prom_port = start_prometheus(tmp_path, metrics_port, grpc_port)

    def query(expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def ready() -> bool:
        if prometheus.poll() is not None:
            raise AssertionError(
                f"prometheus exited: {prometheus.stderr.read() if prometheus.stderr else ''}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for("prometheus to be ready", ready)
        yield service, grpc_port, query, models
    finally:
        for proc in (service, prometheus):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def value(result: list[dict[str, Any]]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


async def good_calls(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = EchoClient(channel)
        for i in range(25):
            await client.echo(w.StringValue(value=f"hello {i}"), timeout=5)
        results = await asyncio.gather(*(client.predict(w.DoubleValue(value=x), timeout=5) for x in range(8)))
        assert [r.value for r in results] == [2.0 * x for x in range(8)]


async def bad_calls(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = EchoClient(channel)
        for bad in ("", "", "", "crash", "crash", "crash"):  # 3 INVALID_ARGUMENT, 3 INTERNAL
            with pytest.raises(grpc.aio.AioRpcError):
                await client.echo(w.StringValue(value=bad), timeout=5)


def test_prometheus_scrapes_the_service_alerts_and_answers_the_dashboard(
    stack: tuple[subprocess.Popen[str], int, Query, Path],
) -> None:
    service, grpc_port, query, models = stack

    # 1. No model yet: the target is up, model_loaded is 0, and the chart's alert fires.
    wait_for("the target to be scraped", lambda: query('up{service="echo"} == 1'))
    assert value(query('model_loaded{service="echo", namespace="e2e"}')) == 0
    firing = wait_for(
        "CbecModelNotLoaded to fire",
        lambda: query('ALERTS{alertname="CbecModelNotLoaded", alertstate="firing"}'),
    )
    assert firing[0]["metric"]["service"] == "echo" and firing[0]["metric"]["severity"] == "critical"

    def handled(code: str) -> float:
        result = query(f'grpc_server_handled_total{{service="echo", grpc_method="Echo", grpc_code="{code}"}}')
        return value(result) if result else -1.0

    # 2. A model version appears and SIGHUP loads it; calls go through.
    version = write_version(models, 2.0)
    service.send_signal(signal.SIGHUP)
    assert asyncio.run(wait_serving(f"127.0.0.1:{grpc_port}", timeout=20))
    asyncio.run(good_calls(grpc_port))
    # The runtime creates a method's series for every code (at 0) on its first call; once Prometheus
    # has seen them at 0, the errors below show up in rate() as they would under steady traffic.
    wait_for("the zero INTERNAL series", lambda: handled("INTERNAL") == 0)
    asyncio.run(bad_calls(grpc_port))

    # 3. Prometheus recorded what happened, under the names the alerts and dashboard use.
    # grpc_code values are grpc.StatusCode names, as the runtime writes them (and the alerts match).
    wait_for(
        "the calls to be scraped",
        lambda: (handled("OK"), handled("INVALID_ARGUMENT"), handled("INTERNAL")) == (25, 3, 3),
    )
    info = query('model_info{service="echo"} == 1')
    assert [r["metric"]["version"] for r in info] == [version]
    assert value(query('model_loaded{service="echo"}')) == 1
    batches = query('model_batch_size_count{service="echo", model="echo"}')
    assert value(batches) >= 1
    latency = query('grpc_server_handling_seconds_count{service="echo", grpc_method="Echo"}')
    assert value(latency) == 31
    wait_for("CbecModelNotLoaded to resolve", lambda: not query('ALERTS{alertname="CbecModelNotLoaded"}'))
    # 3 INTERNAL in 39 calls (~8%) is above the 5% error-ratio threshold; client errors do not count.
    errors = wait_for(
        "CbecHighErrorRatio to fire",
        lambda: query('ALERTS{alertname="CbecHighErrorRatio", alertstate="firing", service="echo"}'),
    )
    assert errors[0]["metric"]["namespace"] == "e2e"

    # 4. Every dashboard query is valid PromQL for this Prometheus; the core panels show data.
    dashboard = json.loads((CHART / "dashboards" / "cbec.json").read_text())
    answered: dict[str, int] = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = (
                target["expr"]
                .replace("$namespace", ".*")
                .replace("$service", "echo")
                .replace("$__rate_interval", "1m")
            )
            answered[f"{panel['title']}: {target['legendFormat']}"] = len(query(expr))
    for title in (
        "Calls per second: {{service}}",
        "Latency p50 / p99 (unary): p99 {{service}}",
        "Calls by code: {{service}} {{grpc_code}}",
        "In flight: {{service}}",
        "Inference time p99 (per batch): {{service}}/{{model}}",
        "Mean batch size: {{service}}/{{model}}",
        "Model versions serving: {{service}} {{version}}",
        "Targets up: {{service}}",
    ):
        assert answered[title] > 0, (title, answered)
