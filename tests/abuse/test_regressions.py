"""The reproducers of issue 15, as regression tests through the real gateway and real backends.

Each class of the issue's campaign (breaker, backends without credentials, identity from the body,
client errors as INTERNAL, unbounded error messages, size limits as 429, slow clients, leniencies)
sends what the campaign sent, to the suite as ``make run`` starts it (``suite.py``), and checks the
behaviour the issue asks for: a clear 4xx naming the field in a small body, a breaker that stays
closed, a refused caller, a connection the bridge closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cbec.chat.v1 import chat_pb2, chat_pb2_grpc
from cbec.common.v1 import common_pb2, common_pb2_grpc
from cbec.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from cbec.risk.v1 import risk_pb2, risk_pb2_grpc
from cbec.vision.v1 import vision_pb2, vision_pb2_grpc

from services.runtime.errors import field_violations
from tests.abuse.suite import BACKENDS, USERS, Suite, transaction

MAX_ERROR_BYTES = 4096
SHOPPER = USERS["healthy"]


# --- helpers --------------------------------------------------------------------------------------
def violations(body: Any) -> list[tuple[str, str]]:
    """(field, description) of the BadRequest in a ``google.rpc.Status`` JSON body."""
    out: list[tuple[str, str]] = []
    for detail in body.get("details", []) if isinstance(body, dict) else []:
        if detail.get("@type", "").endswith("google.rpc.BadRequest"):
            out += [(v.get("field", ""), v.get("description", "")) for v in detail.get("fieldViolations", [])]
    return out


def _norm(name: str) -> str:
    return name.replace("_", "").lower()


def names(found: list[tuple[str, str]], field: str) -> bool:
    """Some violation's field path names ``field`` (snake_case or camelCase alike)."""
    return any(_norm(field) in _norm(path) for path, _ in found)


async def refused(resp: aiohttp.ClientResponse, field: str, status: int = 400) -> dict[str, Any]:
    """Check a response is ``status`` naming ``field`` in a body under 4 KB; returns the body."""
    raw = await resp.read()
    assert resp.status == status, f"expected {status} naming {field}, got {resp.status}: {raw[:600]!r}"
    assert len(raw) < MAX_ERROR_BYTES, f"error body of {len(raw)} bytes: {raw[:300]!r}"
    body = json.loads(raw)
    assert names(violations(body), field), f"no violation names {field}: {body}"
    return dict(body)


@pytest.fixture
async def shop(suite: Suite) -> AsyncIterator[aiohttp.ClientSession]:
    """The healthy storefront key (bound to a shopper)."""
    async with aiohttp.ClientSession(suite.http_url, headers={"x-api-key": suite.keys["healthy"]}) as s:
        yield s


@pytest.fixture
async def admin(suite: Suite) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(suite.http_url, headers={"x-api-key": suite.keys["admin"]}) as s:
        yield s


async def assess_order(shop: aiohttp.ClientSession) -> int:
    async with shop.post("/v1/gateway/assess-order", json={"order": transaction()}) as resp:
        await resp.read()
        return resp.status


async def breaker_closed(suite: Suite, backend: str, valid_call: Any) -> None:
    """Bring the backend's breaker to closed (a run before this test may have opened it) and check it."""
    deadline = time.monotonic() + 20
    while suite.breaker_state(backend) != 0 and time.monotonic() < deadline:
        await valid_call()
        await asyncio.sleep(0.3)
    assert suite.breaker_state(backend) == 0, f"the {backend} breaker does not close"


# --- 1. one key must not open a backend's breaker for everyone ------------------------------------
async def test_a_bad_time_zone_is_a_400_and_the_breaker_stays_closed(
    suite: Suite, shop: aiohttp.ClientSession
) -> None:
    await breaker_closed(suite, "risk", lambda: assess_order(shop))
    for zone in ("Europe", "Europe/", "Mars/Olympus_Mons", "z" * 300) * 2:
        async with shop.post("/v1/risk/score", json={"transaction": transaction(buyerTimezone=zone)}) as r:
            await refused(r, "buyer_timezone")
    assert await assess_order(shop) == 200, "a valid order failed after another key's bad time zones"
    assert suite.breaker_state("risk") == 0


async def test_a_deadline_the_client_chose_never_opens_the_breaker(
    suite: Suite, shop: aiohttp.ClientSession
) -> None:
    await breaker_closed(suite, "risk", lambda: assess_order(shop))
    for _ in range(8):
        body = {"transaction": transaction()}
        async with shop.post("/v1/risk/score", json=body, headers={"grpc-timeout": "1n"}) as resp:
            await resp.read()
            assert resp.status in (200, 504), f"a 1 ns client deadline gave {resp.status}"
    assert await assess_order(shop) == 200
    assert suite.breaker_state("risk") == 0


async def test_257_sentiment_texts_are_a_400_not_a_429(suite: Suite, shop: aiohttp.ClientSession) -> None:
    async def one_text() -> int:
        async with shop.post("/v1/sentiment/analyze", json={"texts": [{"id": "1", "text": "Nice."}]}) as r:
            await r.read()
            return r.status

    await breaker_closed(suite, "sentiment", one_text)
    texts = [{"id": str(i), "text": "Lovely fabric."} for i in range(257)]
    for _ in range(6):
        async with shop.post("/v1/sentiment/analyze", json={"texts": texts}) as resp:
            await refused(resp, "texts")
    assert await one_text() == 200
    assert suite.breaker_state("sentiment") == 0


async def test_10000_category_filters_are_a_400_and_home_feeds_keep_their_items(
    suite: Suite, shop: aiohttp.ClientSession
) -> None:
    async def feed() -> list[Any]:
        async with shop.post("/v1/gateway/home-feed", json={"k": 5}) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            return list(body.get("items", []))

    await breaker_closed(suite, "recommender", feed)
    filters = {"categories": [f"category-{i}" for i in range(10_000)]}
    for _ in range(6):
        async with shop.post("/v1/recommender/recommend", json={"k": 5, "filters": filters}) as resp:
            await refused(resp, "categories")
    assert await feed(), "the home feed came back empty after another key's huge filters"
    assert suite.breaker_state("recommender") == 0


# --- 5/6. errors name the field, stay small, and a size limit is a 400 ---------------------------
OVERSIZED = [
    ("/v1/recommender/recommend", {"k": 5, "filters": {"categories": ["c" * 10_240]}}, "categories", "shop"),
    ("/v1/sentiment/market-report", {"category": "tops", "market": "m" * 20_480}, "market", "shop"),
    ("/v1/admin/risk/model:load", {"version": "v" * 1_000_000}, "version", "admin"),
    ("/v1/vision/products:remove", {"productIds": [""] * 100_000}, "product_ids", "admin"),
    ("/v1/chat/converse", {"message": "m" * 4001}, "message", "shop"),
    ("/v1/sentiment/analyze", {"texts": [{"id": "1", "text": "t" * 70_000}]}, "text", "shop"),
    ("/v1/risk/score", {"transaction": transaction(merchantCategory="m" * 100_000)}, "merchant_category",
     "shop"),
    ("/v1/risk/score", {"transaction": transaction(amount=True)}, "amount", "shop"),
    ("/v1/risk/score", {"transaction": transaction(buyerTimezone="Europe/" + "x" * 300)}, "buyer_timezone",
     "shop"),
    (
        "/v1/risk/outcomes",
        {"transactionId": "tx-1", "outcome": "OUTCOME_CHARGEBACK", "reportedTime": "0001-01-01T00:00:00Z"},
        "reported_time",
        "shop",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "field", "who"), OVERSIZED, ids=[f"{p}:{f}" for p, _, f, _ in OVERSIZED]
)
async def test_bad_or_oversized_fields_are_a_400_naming_the_field_in_a_small_body(
    shop: aiohttp.ClientSession,
    admin: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any],
    field: str,
    who: str,
) -> None:
    session = shop if who == "shop" else admin
    async with session.post(path, json=body) as resp:
        await refused(resp, field)


def _timestamp(seconds: int, nanos: int = 0) -> Any:
    from google.protobuf import timestamp_pb2

    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


async def test_timestamps_out_of_range_are_invalid_argument_on_the_backend(suite: Suite) -> None:
    """What JSON cannot carry (-2^62 s, nanos past a second) straight to risk, as the gateway would."""
    md = suite.trusted_metadata(user=SHOPPER, scopes=("risk",))
    async with grpc.aio.insecure_channel(suite.address("risk")) as channel:
        stub = risk_pb2_grpc.RiskServiceStub(channel)
        for seconds in (-(2**62), 2**62, -62_135_596_800):
            request = risk_pb2.ReportOutcomeRequest(
                transaction_id="tx-1", outcome=risk_pb2.OUTCOME_CHARGEBACK, reported_time=_timestamp(seconds)
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ReportOutcome(request, metadata=md, timeout=10)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            assert any("reported_time" in f for f, _ in field_violations(caught.value))
        tx = risk_pb2.Transaction(
            transaction_id="tx-2",
            user_id=SHOPPER,
            card_fingerprint="card-1",
            amount=10,
            currency="EUR",
            occurred_time=_timestamp(int(time.time()) - 60, nanos=1_000_000_000),
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ScoreTransaction(
                risk_pb2.ScoreTransactionRequest(transaction=tx), metadata=md, timeout=10
            )
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert any("occurred_time" in f for f, _ in field_violations(caught.value))


# --- 2. backends accept nothing without credentials -------------------------------------------------
UNCREDENTIALED = [
    ("risk", common_pb2_grpc.ModelAdminServiceStub, "LoadModelVersion", common_pb2.LoadModelVersionRequest()),
    ("recommender", recommender_pb2_grpc.RecommenderServiceStub, "ForgetUser",
     recommender_pb2.ForgetUserRequest(user_id=SHOPPER)),
    ("vision", vision_pb2_grpc.VisionServiceStub, "RemoveProducts",
     vision_pb2.RemoveProductsRequest(product_ids=["P000001"])),
    ("chat", chat_pb2_grpc.ChatServiceStub, "GetSession", chat_pb2.GetSessionRequest(session_id="0" * 32)),
    ("chat", chat_pb2_grpc.ChatServiceStub, "EndSession", chat_pb2.EndSessionRequest(session_id="0" * 32)),
    ("chat", chat_pb2_grpc.ChatServiceStub, "UpsertKnowledge", chat_pb2.UpsertKnowledgeRequest()),
    ("risk", risk_pb2_grpc.RiskServiceStub, "ScoreTransaction", risk_pb2.ScoreTransactionRequest()),
]  # fmt: skip
ADMIN_ONLY = {"LoadModelVersion", "ForgetUser", "RemoveProducts", "UpsertKnowledge"}


@pytest.mark.parametrize(
    ("process", "stub_cls", "method", "request_"),
    UNCREDENTIALED,
    ids=[f"{p}.{m}" for p, _, m, _ in UNCREDENTIALED],
)
async def test_a_backend_refuses_a_caller_without_credentials(
    suite: Suite, process: str, stub_cls: Any, method: str, request_: Any
) -> None:
    async with grpc.aio.insecure_channel(suite.address(process)) as channel:
        call = getattr(stub_cls(channel), method)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request_, timeout=10)
        assert caught.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        if method in ADMIN_ONLY:  # the internal token, but a shopper's scopes: still refused
            md = suite.trusted_metadata(user=SHOPPER, scopes=("gateway", *BACKENDS))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(request_, metadata=md, timeout=10)
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_a_refused_model_load_changes_nothing(suite: Suite) -> None:
    async with grpc.aio.insecure_channel(suite.address("risk")) as channel:
        stub = common_pb2_grpc.ModelAdminServiceStub(channel)
        md = suite.trusted_metadata(scopes=("admin",))
        before = await stub.GetModelStatus(common_pb2.GetModelStatusRequest(service="risk"), metadata=md)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.LoadModelVersion(common_pb2.LoadModelVersionRequest(service="risk"), timeout=10)
        after = await stub.GetModelStatus(common_pb2.GetModelStatusRequest(service="risk"), metadata=md)
        assert after.serving == before.serving


def _listening(port: int) -> list[str]:
    """Local addresses of the LISTEN sockets on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            address, hex_port = cols[1].rsplit(":", 1)
            if cols[3] == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


#: 127.0.0.1, ::1 and ::ffff:127.0.0.1 as /proc/net/tcp{,6} write them.
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


@pytest.mark.parametrize("service", BACKENDS)
def test_services_listen_on_loopback_only(suite: Suite, service: str) -> None:
    p = suite.processes[service]
    for port in (p.grpc_port, p.metrics_port):
        addresses = _listening(port)
        assert addresses, f"nothing listens on {service}'s port {port}"
        assert set(addresses) <= LOOPBACK, f"{service} listens on {addresses} (port {port}), not loopback"


def test_the_gateway_metrics_stay_on_loopback(suite: Suite) -> None:
    """The gateway's API is the one public listener; its metrics (which name API keys) are not."""
    port = suite.processes["gateway"].metrics_port
    addresses = _listening(port)
    assert addresses and set(addresses) <= LOOPBACK, f"gateway metrics listen on {addresses}"


# --- 3. identity comes from credentials ------------------------------------------------------------
async def converse(
    session: aiohttp.ClientSession, message: str, **body: Any
) -> tuple[int, str, dict[str, Any]]:
    """(status, raw body, the final result or the error) of one chat turn over NDJSON."""
    async with session.post("/v1/chat/converse", json={"message": message, **body}) as resp:
        raw = await resp.text()
    if resp.status != 200:
        return resp.status, raw, json.loads(raw)
    lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
    results = [x["result"]["result"] for x in lines if "result" in x and "result" in x["result"]]
    return resp.status, raw, results[-1] if results else {}


async def test_another_users_chat_session_and_orders_are_not_found(suite: Suite) -> None:
    owner, other = "u-1001", "mallory"  # u-1001 owns the demo order CB-100231
    tracking = "JD014600006281"
    jwt_owner = {"Authorization": f"Bearer {suite.jwt(owner)}"}
    jwt_other = {"Authorization": f"Bearer {suite.jwt(other)}"}
    async with (
        aiohttp.ClientSession(suite.http_url, headers=jwt_owner) as alice,
        aiohttp.ClientSession(suite.http_url, headers=jwt_other) as eve,
    ):
        status, raw, result = await converse(alice, "Where is my order CB-100231?")
        assert status == 200 and tracking in raw, "the owner does not see her own order (no control)"
        session_id = result["sessionId"]

        async with eve.get(f"/v1/chat/sessions/{session_id}") as resp:
            assert resp.status == 404, await resp.text()
        async with eve.delete(f"/v1/chat/sessions/{session_id}") as resp:
            assert resp.status == 404, await resp.text()
        async with alice.get(f"/v1/chat/sessions/{session_id}") as resp:
            assert resp.status == 200, "another user's DELETE ended the session"

        status, raw, _ = await converse(eve, "Where is my order CB-100231?")
        assert tracking not in raw, "another user's order status was disclosed"
        status, raw, _ = await converse(eve, "Where is my order CB-100231?", userId=owner)
        assert status in (400, 403) and tracking not in raw, f"a user id in the body was believed: {status}"

    logs = "".join(p.log_path.read_text(errors="replace") for p in suite.processes.values())
    assert session_id not in logs, "a session id was written to a log"


async def test_a_home_feed_without_a_user_is_a_400(admin: aiohttp.ClientSession) -> None:
    """The admin key is bound to no user, and the body names none."""
    async with admin.post("/v1/gateway/home-feed", json={"k": 5}) as resp:
        await refused(resp, "user_id")


async def test_the_same_field_under_both_json_names_or_a_key_twice_is_a_400(
    shop: aiohttp.ClientSession,
) -> None:
    headers = {"Content-Type": "application/json"}
    tx = json.dumps(transaction())
    for path, raw, field in (
        ("/v1/risk/score", f'{{"transaction": {tx}, "transaction": {tx}}}', "transaction"),
        ("/v1/gateway/home-feed", '{"k": 5, "k": 6}', "k"),
        ("/v1/gateway/home-feed", f'{{"userId": "{SHOPPER}", "user_id": "{SHOPPER}"}}', "user"),
    ):
        async with shop.post(path, data=raw, headers=headers) as resp:
            await refused(resp, field)


async def test_a_nul_user_id_is_a_400(admin: aiohttp.ClientSession) -> None:
    async with admin.delete("/v1/recommender/users/%00") as resp:
        await refused(resp, "user_id")
    async with admin.post("/v1/recommender/recommend", json={"userId": "\u0000", "k": 5}) as resp:
        await refused(resp, "user_id")


async def test_invalid_base64_in_ndjson_is_a_400(shop: aiohttp.ClientSession) -> None:
    line = {"productId": "P000001", "image": "!!!not base64!!!", "category": "tops", "market": "DE"}
    headers = {"Content-Type": "application/x-ndjson"}
    async with shop.post("/v1/vision/products:index", data=json.dumps(line) + "\n", headers=headers) as resp:
        await refused(resp, "image")


@pytest.mark.parametrize("name", ["Dress\u0000", "Dress\u001b[31m red", "Dress\u202eevil"])
async def test_product_copy_never_passes_control_or_bidi_characters_through(
    shop: aiohttp.ClientSession, name: str
) -> None:
    body = {
        "product": {"productId": "P000001", "name": name, "category": "dresses"},
        "targetLanguage": "en",
        "targetMarket": "DE",
    }
    async with shop.post("/v1/chat/product-copy", json=body) as resp:
        if resp.status == 200:
            copy = await resp.json()
            text = json.dumps(copy, ensure_ascii=False)
            assert not any(c in text for c in ("\u0000", "\u001b", "\u202e")), copy
        else:
            await refused(resp, "name")


# --- 7. the bridge as an HTTP server should be -----------------------------------------------------
HOLD_LIMIT_S = 60.0  # far past the suite's 2 s header/body timeouts: held this long, it is never closed


async def _held_for(suite: Suite, head: bytes, trickle: bytes) -> tuple[float, bytes]:
    """Send ``head`` then ``trickle`` one byte every 0.5 s; (seconds until the server closed, its reply)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", suite.http_port)
    started = time.monotonic()
    reply = b""
    try:
        writer.write(head)
        await writer.drain()
        for byte in trickle:
            if time.monotonic() - started > HOLD_LIMIT_S:
                break
            with contextlib.suppress(TimeoutError):
                reply += await asyncio.wait_for(reader.read(4096), timeout=0.5)
            if reader.at_eof():
                return time.monotonic() - started, reply
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                return time.monotonic() - started, reply
        return float("inf"), reply
    finally:
        writer.close()


def _status_of(reply: bytes) -> int | None:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.") else None


async def test_a_slow_body_is_closed(suite: Suite) -> None:
    head = (
        "POST /v1/risk/score HTTP/1.1\r\nHost: shop\r\n"
        f"x-api-key: {suite.keys['healthy']}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000\r\n\r\n"
    ).encode()
    held, reply = await _held_for(suite, head, b"{" + b" " * 200)
    assert held < HOLD_LIMIT_S, "a body sent at 2 bytes a second was never cut off"
    assert reply == b"" or (_status_of(reply) or 0) in (400, 408, 413), reply[:300]


async def test_partial_headers_are_closed(suite: Suite) -> None:
    head = b"POST /v1/risk/score HTTP/1.1\r\nHost: shop\r\n"
    held, reply = await _held_for(suite, head, b"X-Slow: " + b"a" * 200)
    assert held < HOLD_LIMIT_S, "a request head sent at 2 bytes a second was never cut off"
    assert reply == b"" or (_status_of(reply) or 0) in (400, 408, 431), reply[:300]


def _fivexx(suite: Suite) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(suite.processes["gateway"].metrics_text()):
        for sample in family.samples:
            if sample.name == "gateway_http_requests_total" and sample.labels.get("status", "").startswith(
                "5"
            ):
                total += sample.value
    return total


async def test_a_client_that_disconnects_is_not_a_5xx_or_an_error_log(suite: Suite) -> None:
    log = suite.processes["gateway"].log_path
    log_start = log.stat().st_size
    before = _fivexx(suite)
    for _ in range(3):
        _, writer = await asyncio.open_connection("127.0.0.1", suite.http_port)
        writer.write(
            (
                "POST /v1/risk/score HTTP/1.1\r\nHost: shop\r\n"
                f"x-api-key: {suite.keys['healthy']}\r\nContent-Type: application/json\r\n"
                "Content-Length: 5000\r\n\r\n" + '{"transaction": {'
            ).encode()
        )
        await writer.drain()
        writer.close()
    await asyncio.sleep(3)  # past the suite's 2 s body timeout: whatever the bridge does, it has done
    assert _fivexx(suite) == before, "a client that went away was counted as a 5xx"
    new = log.read_bytes()[log_start:].decode(errors="replace")
    records = [json.loads(x) for x in new.splitlines() if x.startswith("{")]
    assert not [r for r in records if r.get("level") in ("ERROR", "CRITICAL")], new[-3000:]
    assert "Traceback" not in new


async def _exchange(suite: Suite, request: bytes) -> tuple[int | None, bytes, bytes]:
    """Send raw bytes; (status, head, body) of the one response (by its Content-Length, else to EOF)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", suite.http_port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        read = reader.read() if length is None else reader.readexactly(length)
        body = await asyncio.wait_for(read, timeout=30)
    finally:
        writer.close()
    return _status_of(head), head, body


async def test_bridge_protocol_errors_are_json_statuses(suite: Suite) -> None:
    """Not plain text with a Python repr: a ``google.rpc.Status`` JSON body, a 4xx (501 for a method
    the server does not implement, as RFC 9110 says)."""
    for request in (
        b"BREW /v1/risk/score HTTP/1.1\r\nHost: shop\r\nContent-Length: 0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: shop\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: shop\r\n"
        + b"".join(b"X-H%d: 1\r\n" % i for i in range(500))
        + b"\r\n",
    ):
        status, head, body = await _exchange(suite, request)
        assert status is not None and (400 <= status < 500 or status == 501), head + body[:300]
        assert b"application/json" in head.lower(), head + body[:300]
        status_body = json.loads(body)
        assert {"code", "message"} <= set(status_body), status_body
