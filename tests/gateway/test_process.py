"""``python -m gateway`` as the launcher starts it: up without backends, dev key, readiness, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from gateway.config import BACKENDS, DEV_API_KEY
from services.runtime.probe import wait_serving
from services.runtime.registry import SERVICES
from tests.gateway.conftest import ROOT, free_port


def start(env_extra: dict[str, str], tmp_path: Path) -> subprocess.Popen[str]:
    dead = {SERVICES["gateway"].address_env(name): f"127.0.0.1:{free_port()}" for name in BACKENDS}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CBEC_")},
        "CBEC_HOST": "127.0.0.1",
        "CBEC_METRICS_PORT": "0",
        "CBEC_MODELS_DIR": str(tmp_path),
        **dead,
        **env_extra,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "gateway"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


#: A complete order (the contract's REQUIRED fields): without risk it must fail closed, not be a 400.
ORDER = {
    "transactionId": "t-1",
    "userId": "u-42",
    "cardFingerprint": "card-9",
    "total": {"currencyCode": "EUR", "units": "5"},
    "occurredTime": "2026-11-29T10:00:00Z",
}


async def test_gateway_process_without_backends(tmp_path: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    proc = start(
        {
            "CBEC_GATEWAY_ENV": "dev",
            "CBEC_GRPC_PORT": str(grpc_port),
            "CBEC_GATEWAY_HTTP_PORT": str(http_port),
        },
        tmp_path,
    )
    try:
        assert await wait_serving(f"127.0.0.1:{grpc_port}", timeout=30), "gateway never reported SERVING"
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{http_port}") as http:
            async with http.get("/healthz") as resp:
                assert resp.status == 200
            async with http.get("/readyz") as resp:
                body = await resp.json()
                assert resp.status == 503 and {b["health"] for b in body["backends"].values()} == {
                    "UNREACHABLE"
                }
            headers = {"x-api-key": DEV_API_KEY}  # CBEC_GATEWAY_ENV=dev, as make run sets it
            async with http.post(
                "/v1/gateway/product-page", json={"productId": "p-1"}, headers=headers
            ) as resp:
                body = await resp.json()
                assert resp.status == 200
                assert {p["part"] for p in body["missingParts"]} == {
                    "similar_items",
                    "sentiment",
                    "also_for_you",
                }
            async with http.post("/v1/gateway/assess-order", json={"order": ORDER}, headers=headers) as resp:
                assert resp.status == 503
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, stderr[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    messages = {r["message"] for r in records}
    assert "gateway up" in messages and "stopped" in messages
    assert any("development API key" in r["message"] and r["level"] == "WARNING" for r in records)
    assert "Traceback" not in stderr


def test_prod_without_credentials_exits_2_naming_the_variable(tmp_path: Path) -> None:
    proc = start({"CBEC_GATEWAY_ENV": "prod", "CBEC_GRPC_PORT": "0", "CBEC_GATEWAY_HTTP_PORT": "0"}, tmp_path)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "CBEC_GATEWAY_ENV=prod needs CBEC_GATEWAY_API_KEYS_FILE" in stderr and "Traceback" not in stderr


def test_busy_http_port_exits_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = start(
            {"CBEC_GATEWAY_ENV": "dev", "CBEC_GRPC_PORT": "0", "CBEC_GATEWAY_HTTP_PORT": str(port)}, tmp_path
        )
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and f"cannot bind HTTP port 127.0.0.1:{port}" in stderr
