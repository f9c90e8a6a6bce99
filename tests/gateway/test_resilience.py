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

from services.runtime.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitOpen
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
    status, _, _ = await call(gw, "/v1/recommender/recommend", {"userId": "u-1", "k": 1})
    assert status == 400 and len(recorder.of("Recommend")) == 1


async def test_retry_budget_stops_a_retry_storm(make_gateway: Any, recorder: Recorder) -> None:
    gw = await make_gateway(breaker_failure_threshold=10_000)
    recorder.fail("Recommend", UNAVAILABLE)
    for _ in range(30):
        status, _, _ = await call(gw, "/v1/recommender/recommend", {"userId": "u-1", "k": 1})
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
    order=risk_pb2.Transaction(
        transaction_id="t",
        card_fingerprint="c",
        amount=10,
        currency="EUR",
        occurred_time={"seconds": 1_790_000_000},
    )
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


# --- breakers see only backend health; fair share per key (issue 15) -------------------------------
TX = {
    "transactionId": "t-9",
    "userId": "u-42",
    "cardFingerprint": "card-9",
    "ipCountry": "BR",
    "billingCountry": "DE",
    "amount": 129.9,
    "currency": "EUR",
    "occurredTime": "2026-11-29T10:00:00Z",
}


async def post_as(gw: Any, headers: dict[str, str], path: str, body: Any) -> tuple[int, dict[str, Any], Any]:
    async with (
        aiohttp.ClientSession(base_url=gw.http_url, headers=headers) as http,
        http.post(path, json=body) as resp,
    ):
        return resp.status, await resp.json(), resp.headers


async def eventually(check: Any, what: str, within_s: float = 10.0) -> None:
    """Wait for a condition that other tasks bring about (a bound for a hung test, not a timing check)."""
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.01)


def reason_of(body: dict[str, Any]) -> dict[str, Any]:
    return next(d for d in body["details"] if d["@type"].endswith("ErrorInfo"))


async def test_client_errors_never_open_the_breaker(make_gateway: Any, recorder: Recorder) -> None:
    gw = await make_gateway(breaker_failure_threshold=2, retry_max_attempts=1)
    client_errors = [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.OUT_OF_RANGE, 400),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.FAILED_PRECONDITION, 400),
        (grpc.StatusCode.ALREADY_EXISTS, 409),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),  # a per-request limit: no RetryInfo, not shedding
    ]
    for code, http_status in client_errors:
        recorder.fail("Recommend", code)
        for _ in range(4):
            status, _, _ = await call(gw, "/v1/recommender/recommend", {"userId": "u-1", "k": 1})
            assert status == http_status, code
        assert gw.service.backends["recommender"].breaker.state == CLOSED, code
    recorder.clear()
    status, _, _ = await call(gw, "/v1/recommender/recommend", {"userId": "u-1", "k": 1})
    assert status == 200


async def test_a_deadline_the_client_chose_never_opens_the_breaker(
    make_gateway: Any, recorder: Recorder
) -> None:
    gw = await make_gateway(breaker_failure_threshold=2, retry_max_attempts=1)
    risk = gw.service.backends["risk"]
    # too short to be usable: refused at once, the backend is never called
    for _ in range(5):
        status, body, _ = await call_with(gw, "/v1/risk/score", {"transaction": TX}, {"grpc-timeout": "1n"})
        assert status == 504 and body["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert recorder.of("ScoreTransaction") == [] and risk.breaker.state == CLOSED
    # usable, but shorter than the gateway's own timeout for risk (2 s): the backend runs out of it
    recorder.delay("ScoreTransaction", 0.5)
    for _ in range(3):
        status, _, _ = await call_with(gw, "/v1/risk/score", {"transaction": TX}, {"grpc-timeout": "50m"})
        assert status == 504
    assert len(recorder.of("ScoreTransaction")) == 3 and risk.breaker.state == CLOSED
    recorder.clear()
    status, _, _ = await call(gw, "/v1/gateway/assess-order", {"order": TX})
    assert status == 200


async def test_the_gateways_own_timeout_does_count(make_gateway: Any, recorder: Recorder) -> None:
    gw = await make_gateway(breaker_failure_threshold=2, retry_max_attempts=1, backend_timeouts={"risk": 0.1})
    recorder.delay("ScoreTransaction", 0.5)
    for _ in range(2):  # no caller deadline: the aggregation gives risk its own 0.1 s
        status, body, _ = await call(gw, "/v1/gateway/assess-order", {"order": TX})
        assert status == 503 and "DEADLINE_EXCEEDED" in body["message"]
    assert gw.service.backends["risk"].breaker.state == OPEN


async def call_with(
    gw: Any, path: str, body: Any, headers: dict[str, str]
) -> tuple[int, dict[str, Any], Any]:
    return await post_as(gw, {"x-api-key": FULL_KEY, **headers}, path, body)


async def test_internal_errors_from_one_key_do_not_open_the_breaker_from_two_they_do(
    make_gateway: Any, recorder: Recorder
) -> None:
    from tests.gateway.conftest import make_jwt

    gw = await make_gateway(breaker_failure_threshold=3, retry_max_attempts=1)
    risk = gw.service.backends["risk"]
    recorder.fail("ScoreTransaction", grpc.StatusCode.INTERNAL)  # e.g. an input that crashes risk
    for _ in range(20):
        status, _, _ = await call(gw, "/v1/risk/score", {"transaction": TX})
        assert status == 500
    assert risk.breaker.state == CLOSED
    recorder.clear()
    status, _, _ = await call(gw, "/v1/gateway/assess-order", {"order": TX})
    assert status == 200, "checkout still works for everyone"
    # risk really is broken: another principal sees it too
    recorder.fail("ScoreTransaction", grpc.StatusCode.INTERNAL)
    for _ in range(2):
        status, _, _ = await call(gw, "/v1/risk/score", {"transaction": TX})
        assert status == 500
    other = {"Authorization": f"Bearer {make_jwt('risk gateway', sub='u-42')}"}
    status, body, _ = await post_as(gw, other, "/v1/risk/score", {"transaction": TX})
    assert status == 500 and risk.breaker.state == OPEN, body
    status, body, _ = await call(gw, "/v1/risk/score", {"transaction": TX})
    assert status == 503 and "circuit open" in body["message"]


async def test_a_dead_backend_opens_the_breaker(make_gateway: Any) -> None:
    from tests.gateway.conftest import free_port

    gw = await make_gateway(
        {"risk": f"127.0.0.1:{free_port()}"}, breaker_failure_threshold=2, retry_max_attempts=1
    )
    for _ in range(2):
        status, _, _ = await call(gw, "/v1/risk/score", {"transaction": TX})
        assert status == 503
    assert gw.service.backends["risk"].breaker.state == OPEN
    status, body, _ = await call(gw, "/v1/risk/score", {"transaction": TX})
    assert status == 503 and "circuit open" in body["message"]


async def test_a_shedding_backend_trips_only_its_own_breaker(
    models_dir: Path, recorder: Recorder, make_gateway: Any
) -> None:
    sentiment = make_server("sentiment", models_dir, recorder, max_concurrent_calls=1)
    await sentiment.start()
    try:
        gw = await make_gateway(
            {"sentiment": f"127.0.0.1:{sentiment.grpc_port}"}, breaker_failure_threshold=2
        )
        recorder.delay("GetMarketReport", 2.0)
        report = {"productId": "sku-001"}
        busy = asyncio.create_task(call(gw, "/v1/sentiment/market-report", report))
        await eventually(lambda: recorder.of("GetMarketReport"), "the first call holds sentiment's one slot")
        for _ in range(2):  # shed by the backend (retried by gRPC within the budget, shed again)
            status, body, headers = await call(gw, "/v1/sentiment/market-report", report)
            assert status == 429 and "Retry-After" in headers, body
        backends = gw.service.backends
        assert backends["sentiment"].breaker.state == OPEN
        assert all(backends[n].breaker.state == CLOSED for n in ("recommender", "risk", "vision", "chat"))
        status, _, _ = await call(gw, "/v1/recommender/recommend", {"userId": "u-1", "k": 1})
        assert status == 200
        status, _, _ = await busy
        assert status == 200
    finally:
        await sentiment.stop(grace=0)


async def test_the_gateways_own_rate_limit_is_no_backend_failure(
    make_gateway: Any, recorder: Recorder
) -> None:
    from tests.gateway.conftest import SLOW_KEY

    gw = await make_gateway(breaker_failure_threshold=1)
    statuses = [
        (await post_as(gw, {"x-api-key": SLOW_KEY}, "/v1/recommender/recommend", {"userId": "u-1", "k": 1}))[
            0
        ]
        for _ in range(8)
    ]
    assert 429 in statuses and set(statuses) <= {200, 429}
    assert gw.service.backends["recommender"].breaker.state == CLOSED
    assert len(recorder.of("Recommend")) == statuses.count(200)


async def test_fair_share_refuses_the_greedy_key_while_another_key_gets_through(
    make_gateway: Any, recorder: Recorder
) -> None:
    from tests.gateway.conftest import RECOMMENDER_KEY

    gw = await make_gateway(backend_max_in_flight=2, backend_min_share=1)
    recommender = gw.service.backends["recommender"]
    recorder.delay("Recommend", 2.0)
    greedy = [
        asyncio.create_task(call(gw, "/v1/recommender/recommend", {"userId": f"u-{i}", "k": 1}))
        for i in range(2)
    ]
    await eventually(lambda: len(recorder.of("Recommend")) == 2, "the greedy key fills the backend")
    status, body, headers = await call(gw, "/v1/recommender/recommend", {"userId": "u-3", "k": 1})
    assert status == 429 and int(headers["Retry-After"]) >= 1
    info = reason_of(body)
    assert info["reason"] == "FAIR_SHARE_EXCEEDED" and info["metadata"]["backend"] == "recommender"
    # another key still gets the same backend (SimilarItems is not delayed)
    other = {"x-api-key": RECOMMENDER_KEY}
    status, reply, _ = await post_as(
        gw, other, "/v1/recommender/similar-items", {"itemId": "sku-001", "k": 2}
    )
    assert status == 200 and len(reply["items"]) == 2
    assert [(await task)[0] for task in greedy] == [200, 200]
    assert recommender.fair.in_flight == 0 and recommender.fair.active == 0
    assert recommender.breaker.state == CLOSED, "a fair-share refusal is no backend failure"


async def test_fair_share_slots_are_released_however_a_call_ends(gw: Any, recorder: Recorder) -> None:
    from cbec.chat.v1 import chat_pb2
    from cbec.recommender.v1 import recommender_pb2

    chat, recommender = gw.service.backends["chat"], gw.service.backends["recommender"]
    methods = gw.service.routes.methods
    converse = methods["cbec.chat.v1.ChatService/Converse"]
    recommend = methods["cbec.recommender.v1.RecommenderService/Recommend"]
    # a stream that ends normally
    call_, _ = chat.stream(converse, chat_pb2.ConverseRequest(message="hello"), 5.0)
    assert chat.fair.in_flight == 1
    async for _ in call_:
        pass
    await eventually(lambda: chat.fair.in_flight == 0, "the finished stream's slot is free")
    # a stream its caller cancels while the backend still thinks
    recorder.delay("Converse", 30)
    call_, _ = chat.stream(converse, chat_pb2.ConverseRequest(message="hello"), 60.0)
    await eventually(lambda: recorder.of("Converse")[1:], "the stream reaches chat")
    call_.cancel()
    await eventually(lambda: chat.fair.in_flight == 0, "the cancelled stream's slot is free")
    # a unary call whose task is cancelled
    recorder.delay("Recommend", 30)
    task = asyncio.create_task(
        recommender.unary(recommend, recommender_pb2.RecommendRequest(user_id="u-1", k=1), 60)
    )
    await eventually(lambda: recorder.of("Recommend"), "the call reaches recommender")
    assert recommender.fair.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert recommender.fair.in_flight == 0
    assert chat.breaker.state == CLOSED and recommender.breaker.state == CLOSED
