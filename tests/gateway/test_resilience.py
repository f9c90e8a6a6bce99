"""Retries (idempotent only, with a budget), the circuit breaker, TLS/mTLS to backends, and chaos."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cbec.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from cbec.risk.v1 import risk_pb2

from gateway.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitOpen
from tests.gateway.backends import Recorder, make_server
from tests.gateway.certs import make_pki
from tests.gateway.conftest import AUTH, FULL_KEY

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


async def call(gw: Any, path: str, body: Any) -> tuple[int, dict[str, Any], Any]:
    async with (
        aiohttp.ClientSession(base_url=gw.http_url, headers={"x-api-key": FULL_KEY}) as http,
        http.post(path, json=body) as resp,
    ):
        return resp.status, await resp.json(), resp.headers


async def test_idempotent_call_is_retried(gw: Any, recorder: Recorder) -> None:
    recorder.fail("Recommend", UNAVAILABLE, times=1)
    status, body, _ = await call(gw, "/v1/recommender/recommend", {"userId": "u-1", "k": 2})
    assert status == 200 and len(body["items"]) == 2
    attempts = [c.attempt for c in recorder.of("Recommend")]
    assert attempts == [0, 1]  # grpc-previous-rpc-attempts: the second try is a gRPC retry
    assert len({c.request_id for c in recorder.of("Recommend")}) == 1


async def test_non_idempotent_call_is_not_retried(gw: Any, recorder: Recorder) -> None:
    recorder.fail("RecordInteractions", UNAVAILABLE, times=1)
    body = {"interactions": [{"userId": "u-1", "itemId": "sku-001", "type": "INTERACTION_TYPE_PURCHASE"}]}
    status, _, _ = await call(gw, "/v1/recommender/interactions", body)
    assert status == 503
    assert len(recorder.of("RecordInteractions")) == 1
    status, reply, _ = await call(gw, "/v1/recommender/interactions", body)
    assert status == 200 and reply["acceptedCount"] == 1


async def test_non_retryable_code_is_not_retried(gw: Any, recorder: Recorder) -> None:
    recorder.fail("Recommend", grpc.StatusCode.INVALID_ARGUMENT, times=1)
    status, _, _ = await call(gw, "/v1/recommender/recommend", {"userId": "u-1"})
    assert status == 400 and len(recorder.of("Recommend")) == 1


async def test_retry_budget_stops_a_retry_storm(make_gateway: Any, recorder: Recorder) -> None:
    gw = await make_gateway(breaker_failure_threshold=10_000)
    recorder.fail("Recommend", UNAVAILABLE)
    for _ in range(30):
        status, _, _ = await call(gw, "/v1/recommender/recommend", {"userId": "u-1"})
        assert status == 503
    attempts = len(recorder.of("Recommend"))
    # 3 attempts per call without a budget would be 90; the throttle lets only a handful through
    assert 30 < attempts <= 40, attempts


async def test_breaker_opens_fails_fast_then_recovers(make_gateway: Any, recorder: Recorder) -> None:
    gw = await make_gateway(breaker_failure_threshold=3, breaker_open_s=0.5, retry_max_attempts=1)
    recorder.fail("GetMarketReport", UNAVAILABLE)
    report = {"productId": "sku-001"}
    for _ in range(3):
        status, _, _ = await call(gw, "/v1/sentiment/market-report", report)
        assert status == 503
    assert gw.service.backends["sentiment"].breaker.state == OPEN
    backend_calls = len(recorder.of("GetMarketReport"))
    started = time.monotonic()
    for _ in range(20):
        status, body, headers = await call(gw, "/v1/sentiment/market-report", report)
        assert status == 503 and "circuit open" in body["message"] and int(headers["Retry-After"]) >= 1
    assert time.monotonic() - started < 1.0, "an open circuit fails fast"
    assert len(recorder.of("GetMarketReport")) == backend_calls, "no call reached the backend"
    # aggregations report the open circuit as a missing part
    status, page, _ = await call(gw, "/v1/gateway/product-page", {"productId": "sku-003"})
    assert status == 200 and page["missingParts"][0]["part"] == "sentiment"
    recorder.clear()
    await asyncio.sleep(0.6)
    status, _, _ = await call(gw, "/v1/sentiment/market-report", report)
    assert status == 200 and gw.service.backends["sentiment"].breaker.state == CLOSED


def test_breaker_half_open_lets_one_trial_through() -> None:
    now = [0.0]
    breaker = CircuitBreaker("x", failure_threshold=2, open_s=1.0, clock=lambda: now[0])
    breaker.on_failure()
    assert breaker.state == CLOSED
    breaker.on_failure()
    assert breaker.state == OPEN
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    now[0] = 1.5
    assert breaker.before_call() is True and breaker.state == HALF_OPEN
    with pytest.raises(CircuitOpen):  # only one trial at a time
        breaker.before_call()
    breaker.on_failure(trial=True)
    assert breaker.state == OPEN
    now[0] = 3.0
    assert breaker.before_call() is True
    breaker.on_success(trial=True)
    assert breaker.state == CLOSED and breaker.before_call() is False


# --- TLS / mTLS to the backends -------------------------------------------------------------------
ORDER = gateway_pb2.AssessOrderRequest(
    order=risk_pb2.Transaction(transaction_id="t", amount=10, currency="EUR")
)


async def assess(gw: Any) -> Any:
    async with grpc.aio.insecure_channel(gw.grpc_address) as channel:
        return await gateway_pb2_grpc.GatewayServiceStub(channel).AssessOrder(ORDER, metadata=AUTH, timeout=3)


async def test_mutual_tls_to_backends(
    tmp_path: Path, models_dir: Path, recorder: Recorder, make_gateway: Any
) -> None:
    pki = make_pki(tmp_path / "pki")
    risk = make_server(
        "risk",
        models_dir,
        recorder,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca,
    )
    await risk.start()
    try:
        address = {"risk": f"localhost:{risk.grpc_port}"}
        tls = dict(
            backend_tls_ca_file=pki.ca,
            backend_tls_cert_file=pki.client_cert,
            backend_tls_key_file=pki.client_key,
        )
        good = await make_gateway(address, **tls)
        reply = await assess(good)
        assert reply.assessment.decision == risk_pb2.DECISION_APPROVE
        # without a client certificate the backend refuses the connection: AssessOrder fails closed
        no_client_cert = await make_gateway(address, backend_tls_ca_file=pki.ca)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await assess(no_client_cert)
        assert err.value.code() == UNAVAILABLE
        plaintext = await make_gateway(address)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await assess(plaintext)
        assert err.value.code() == UNAVAILABLE
        assert len(recorder.of("ScoreTransaction")) == 1
    finally:
        await risk.stop(grace=0)


async def test_https_bridge_with_the_runtime_certificate(tmp_path: Path, make_gateway: Any) -> None:
    import ssl

    pki = make_pki(tmp_path / "pki")
    gw = await make_gateway(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    context = ssl.create_default_context(cafile=str(pki.ca))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http,
        http.get(f"{gw.http_url}/healthz") as resp,
    ):
        assert resp.status == 200 and gw.http_url.startswith("https://")


# --- chaos ----------------------------------------------------------------------------------------
async def test_chaos_kill_and_restart_a_backend_under_load(backend_process: Any, make_gateway: Any) -> None:
    proc = backend_process("recommender")
    name, port = proc.names_ports[0]
    gw = await make_gateway({name: f"127.0.0.1:{port}"}, breaker_open_s=0.3)
    outcomes: list[tuple[float, str]] = []  # (time, "complete" | "partial" | error code)
    stop = asyncio.Event()
    t0 = time.monotonic()

    async def worker(channel: grpc.aio.Channel, i: int) -> None:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        while not stop.is_set():
            request = gateway_pb2.GetProductPageRequest(user_id=f"u-{i}", product_id="sku-004", k=3)
            try:
                reply = await stub.GetProductPage(request, metadata=AUTH, timeout=2)
            except grpc.aio.AioRpcError as exc:
                outcomes.append((time.monotonic() - t0, exc.code().name))
                continue
            outcomes.append((time.monotonic() - t0, "partial" if reply.missing_parts else "complete"))

    async with grpc.aio.insecure_channel(gw.grpc_address) as channel:
        workers = [asyncio.create_task(worker(channel, i)) for i in range(6)]
        await asyncio.sleep(1.0)
        killed_at = time.monotonic() - t0
        proc.kill()
        await asyncio.sleep(1.0)
        restarted_at = time.monotonic() - t0
        proc.start()  # same port
        recovered = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            recent = [o for t, o in outcomes if t > time.monotonic() - t0 - 0.5]
            if recent and all(o == "complete" for o in recent):
                recovered = time.monotonic() - t0
                break
        stop.set()
        await asyncio.gather(*workers)
    errors = [o for _, o in outcomes if o not in ("complete", "partial")]
    assert not errors, f"accepted calls failed: {errors[:5]}"
    assert any(o == "complete" for t, o in outcomes if t < killed_at)
    assert any(o == "partial" for t, o in outcomes if killed_at < t < restarted_at)
    assert recovered is not None, "the gateway did not recover on its own"
    assert recovered - restarted_at < 6
