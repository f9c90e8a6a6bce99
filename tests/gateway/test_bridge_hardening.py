"""The bridge as an HTTP server (issue 15): slow and oversized clients, strict JSON, clients that leave.

Raw sockets where a well-behaved HTTP client cannot misbehave enough. The timeouts are set small (1 s)
and every check is "closed before a generous bound", never a measured duration.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import aiohttp
import pytest

from services.runtime.errors import ServiceError
from tests.gateway.backends import Recorder
from tests.gateway.conftest import FULL_KEY, RunningGateway

BOUND_S = 10.0  # every connection below must be closed well before this (the timeouts are 1 s)
TX = {
    "transactionId": "t-1",
    "userId": "u-42",
    "cardFingerprint": "card-9",
    "ipCountry": "BR",
    "billingCountry": "DE",
    "amount": 129.9,
    "currency": "EUR",
    "occurredTime": "2026-11-29T10:00:00Z",
}


def violations(body: dict[str, Any]) -> list[dict[str, str]]:
    for detail in body.get("details", []):
        if detail["@type"].endswith("BadRequest"):
            return list(detail["fieldViolations"])
    return []


def reason(body: dict[str, Any]) -> str:
    for detail in body.get("details", []):
        if detail["@type"].endswith("ErrorInfo"):
            return str(detail["reason"])
    return ""


def http_counts(gw: RunningGateway) -> dict[tuple[str, str], float]:
    counts = {}
    for metric in gw.service.bridge.metrics.http_requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                counts[(sample.labels["route"], sample.labels["status"])] = sample.value
    return counts


def parse_response(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, json.loads(body) if body else None


async def exchange(gw: RunningGateway, data: bytes) -> tuple[int, dict[str, str], Any]:
    """Send raw bytes, read until the server closes the connection, parse its one answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.service.http_port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), BOUND_S)
    finally:
        writer.close()
    return parse_response(raw)


async def trickle(gw: RunningGateway, head: bytes, every_s: float = 0.2) -> tuple[bytes, bool]:
    """Send ``head``, then one byte every ``every_s`` until the server closes the connection (or
    ``BOUND_S`` passes). Returns what the server sent and whether it closed in time."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.service.http_port)
    received = asyncio.create_task(reader.read())
    try:
        writer.write(head)
        for _ in range(int(BOUND_S / every_s)):
            if received.done():
                break
            try:
                writer.write(b"a")
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(every_s)
        done, _ = await asyncio.wait({received}, timeout=1.0)
        return (received.result() if done else b""), bool(done)
    finally:
        received.cancel()
        writer.close()


# --- timeouts -----------------------------------------------------------------------------------------
async def test_a_slow_body_is_answered_408_and_closed(make_gateway: Any) -> None:
    gw = await make_gateway(http_body_timeout_s=1.0)
    head = (
        b"POST /v1/recommender/recommend HTTP/1.1\r\nHost: t\r\n"
        + f"x-api-key: {FULL_KEY}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
    )
    raw, closed = await trickle(gw, head)
    assert closed, "a body sent a byte at a time held the connection"
    status, headers, body = parse_response(raw)
    assert status == 408 and headers["connection"] == "close"
    assert body["code"] == 4 and reason(body) == "BODY_TIMEOUT" and "request body" in body["message"]
    assert http_counts(gw)[("POST /v1/recommender/recommend", "408")] == 1


async def test_a_slow_ndjson_line_is_answered_408(make_gateway: Any) -> None:
    gw = await make_gateway(http_body_timeout_s=1.0)
    head = (
        b"POST /v1/vision/products:index HTTP/1.1\r\nHost: t\r\n"
        + f"x-api-key: {FULL_KEY}\r\n".encode()
        + b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.service.http_port)
    received = asyncio.create_task(reader.read())
    try:
        writer.write(head)
        for _ in range(int(BOUND_S / 0.2)):  # one byte of one line per chunk, every 0.2 s
            if received.done():
                break
            writer.write(b'1\r\n"\r\n')
            await writer.drain()
            await asyncio.sleep(0.2)
        raw = await asyncio.wait_for(received, 2.0)
    finally:
        received.cancel()
        writer.close()
    status, _, body = parse_response(raw)
    assert status == 408 and "line 1 of the request stream" in body["message"]


async def test_a_partial_head_is_closed_by_the_header_timeout(make_gateway: Any) -> None:
    gw = await make_gateway(http_header_timeout_s=1.0, http_idle_timeout_s=600.0)
    raw, closed = await trickle(gw, b"POST /v1/recommender/recommend HTTP/1.1\r\nHost: t\r\nX-Slow: ")
    assert closed and raw == b""
    # A head that is complete in time is served on the same kind of connection.
    async with aiohttp.ClientSession(base_url=gw.http_url) as http, http.get("/healthz") as resp:
        assert resp.status == 200


async def test_an_idle_connection_is_closed_by_the_idle_timeout(make_gateway: Any) -> None:
    gw = await make_gateway(http_idle_timeout_s=1.0, http_header_timeout_s=600.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.service.http_port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")  # keep-alive: then nothing
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), BOUND_S)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 200")  # answered, then closed once idle


# --- limits and malformed requests: JSON google.rpc.Status, never the request quoted back -------------
async def test_an_oversized_header_is_431_json(make_gateway: Any) -> None:
    gw = await make_gateway(http_max_header_bytes=4096)
    status, headers, body = await exchange(
        gw, b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"q" * 5000 + b"\r\n\r\n"
    )
    assert status == 431 and headers["content-type"].startswith("application/json")
    assert body["code"] == 3 and reason(body) == "HEADER_TOO_LARGE" and "4096" in body["message"]
    assert violations(body)[0]["field"] == "headers"
    assert "qqqq" not in json.dumps(body) and headers["x-request-id"]
    assert http_counts(gw)[("malformed", "431")] == 1


async def test_too_many_headers_is_431_json(make_gateway: Any) -> None:
    gw = await make_gateway(http_max_headers=20)
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
    status, _, body = await exchange(gw, b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + many + b"\r\n")
    assert status == 431 and reason(body) == "TOO_MANY_HEADERS" and "20" in body["message"]


async def test_unknown_methods_get_json_errors(gw: RunningGateway) -> None:
    # A method the HTTP parser does not know: no path to list methods for, so 501 (RFC 9110 15.6.2).
    status, _, body = await exchange(gw, b"FROB /v1/risk/score HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 501 and body["code"] == 12 and reason(body) == "METHOD_NOT_IMPLEMENTED"
    assert "FROB" not in json.dumps(body)
    # A real method the path does not serve: 405 with Allow.
    status, headers, body = await exchange(
        gw, b"PURGE /v1/risk/score HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    assert status == 405 and headers["allow"] == "POST" and reason(body) == "METHOD_NOT_ALLOWED"


async def test_malformed_requests_get_json_400s(gw: RunningGateway) -> None:
    for raw in (
        b"GET /healthz HTTP/1.1\r\nHost t\r\n\r\n",  # a header without a colon
        b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
        b"POST /v1/risk/score HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ):
        status, headers, body = await exchange(gw, raw)
        assert status == 400, raw
        assert headers["content-type"].startswith("application/json") and body["code"] == 3
        assert reason(body) == "MALFORMED_REQUEST" and "Traceback" not in json.dumps(body)
    # A broken chunk that arrives after the handler started reading the body.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.service.http_port)
    try:
        writer.write(
            b"POST /v1/risk/score HTTP/1.1\r\nHost: t\r\n"
            + f'x-api-key: {FULL_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{{"a":\r\n'.encode()
        )
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(b"zz\r\n")
        await writer.drain()
        status, _, body = parse_response(await asyncio.wait_for(reader.read(), BOUND_S))
    finally:
        writer.close()
    assert status == 400 and violations(body)[0]["field"] == "body"


# --- strict JSON ----------------------------------------------------------------------------------------
async def post(http: aiohttp.ClientSession, path: str, data: str | bytes, **headers: str) -> Any:
    async with http.post(path, data=data, headers={"Content-Type": "application/json", **headers}) as resp:
        return resp.status, await resp.json()


async def test_duplicate_keys_and_both_names_are_400_naming_the_field(http: aiohttp.ClientSession) -> None:
    status, body = await post(http, "/v1/recommender/recommend", '{"userId": "u-1", "userId": "u-2"}')
    assert status == 400 and violations(body)[0]["field"] == "userId" and "twice" in body["message"]
    status, body = await post(http, "/v1/recommender/recommend", '{"userId": "u-1", "user_id": "u-2"}')
    assert status == 400 and violations(body)[0]["field"] == "userId"
    assert "user_id" in violations(body)[0]["description"]
    nested = json.dumps({"transaction": {**TX, "ip_country": "FR"}})
    status, body = await post(http, "/v1/risk/score", nested)
    assert status == 400 and violations(body)[0]["field"] == "transaction.ipCountry"
    # The same key in two different objects is fine.
    status, body = await post(http, "/v1/risk/score", json.dumps({"transaction": TX}))
    assert status == 200, body


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/v1/risk/score", {"transaction": {**TX, "amount": True}}, "transaction.amount"),
        ("/v1/recommender/recommend", {"userId": "u-1", "k": False}, "k"),
        (
            "/v1/recommender/interactions",
            {"interactions": [{"userId": "u-1", "itemId": "sku-001", "type": True}]},
            "interactions[0].type",
        ),
    ],
)
async def test_a_boolean_for_a_number_or_enum_is_400(
    http: aiohttp.ClientSession, path: str, payload: dict[str, Any], field: str
) -> None:
    status, body = await post(http, path, json.dumps(payload))
    assert status == 400, body
    assert violations(body)[0]["field"] == field and "not " in violations(body)[0]["description"]


async def test_invalid_base64_is_400_not_an_empty_image(
    http: aiohttp.ClientSession, recorder: Recorder
) -> None:
    status, body = await post(http, "/v1/vision/search", json.dumps({"image": "!!not base64!!", "k": 2}))
    assert status == 400 and violations(body)[0]["field"] == "image"
    good = base64.b64encode(b"\x89PNG one").decode()
    lines = [
        json.dumps({"productId": "p-1", "image": good}),
        json.dumps({"productId": "p-2", "image": "%%%%"}),
    ]
    recorder.clear()
    async with http.post(
        "/v1/vision/products:index",
        data="\n".join(lines),
        headers={"Content-Type": "application/x-ndjson"},
    ) as resp:
        body = await resp.json()
        assert resp.status == 400, body
    assert violations(body)[0]["field"] == "line 2: image" and "base64" in body["message"]
    # Standard and URL-safe alphabets, padded or not, are all proto3 JSON.
    for image in (good, good.rstrip("="), base64.urlsafe_b64encode(b"\xfb\xff png").decode()):
        status, body = await post(http, "/v1/vision/search", json.dumps({"image": image, "k": 1}))
        assert status == 200, (image, body)


# --- clients that leave -----------------------------------------------------------------------------------
async def wait_for(predicate: Any, timeout: float = BOUND_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_a_client_that_leaves_is_logged_at_info_and_not_a_5xx(
    gw: RunningGateway, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    recorder.delay("Recommend", 5.0)
    body = json.dumps({"userId": "u-1", "k": 1}).encode()
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.service.http_port)
    writer.write(
        b"POST /v1/recommender/recommend HTTP/1.1\r\nHost: t\r\n"
        + f"x-api-key: {FULL_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    await wait_for(lambda: recorder.of("Recommend"))
    writer.close()  # gone while the backend works

    # And one that leaves halfway through its body.
    _reader2, writer2 = await asyncio.open_connection("127.0.0.1", gw.service.http_port)
    writer2.write(
        b"POST /v1/risk/score HTTP/1.1\r\nHost: t\r\n"
        + f"x-api-key: {FULL_KEY}\r\nContent-Length: 1000\r\n\r\n".encode()
        + b'{"transaction": '
    )
    await writer2.drain()
    await asyncio.sleep(0.3)
    writer2.close()

    def both_counted() -> bool:
        counts = http_counts(gw)
        return (
            counts.get(("POST /v1/recommender/recommend", "499")) == 1
            and counts.get(("POST /v1/risk/score", "499")) == 1
        )

    await wait_for(both_counted)
    assert not [k for k in http_counts(gw) if k[1].startswith("5")]
    gone = [r for r in caplog.records if r.getMessage() == "client closed the connection before the answer"]
    assert len(gone) == 2 and {r.levelno for r in gone} == {logging.INFO}
    assert all(r.exc_info is None for r in gone)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
    ]
    assert gw.service.backends["recommender"].breaker.state == "closed"


def test_strict_check_covers_maps_and_repeated_fields() -> None:
    from cbec.common.v1 import common_pb2
    from cbec.sentiment.v1 import sentiment_pb2

    from gateway.transcode import parse_message

    with pytest.raises(ServiceError) as err:
        parse_message(common_pb2.GetModelStatusResponse, {"metrics": {"auc": True}})
    assert err.value.violations[0].field == "metrics['auc']"
    with pytest.raises(ServiceError) as err:
        parse_message(
            sentiment_pb2.AnalyzeRequest,
            {"texts": [{"id": "a", "text": "ok"}, {"id": "b", "utf8Bytes": "a=b="}]},
            "line 4",
        )
    assert err.value.violations[0].field == "line 4: texts[1].utf8Bytes"
    assert parse_message(common_pb2.GetModelStatusResponse, {"metrics": {"auc": 0.5}}).metrics["auc"] == 0.5


# --- Expect: 100-continue (the low-level server has no router to answer it) --------------------------------
async def test_expect_100_continue_is_answered_only_for_an_admitted_request(gw: RunningGateway) -> None:
    body = json.dumps({"userId": "u-1", "k": 2}).encode()
    head = (
        b"POST /v1/recommender/recommend HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
        + f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n".encode()
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.service.http_port)
    try:
        writer.write(head + f"x-api-key: {FULL_KEY}\r\n\r\n".encode())
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(body + b"")
        await writer.drain()
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
        assert final.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    status, _, refused = await exchange(gw, head + b"Connection: close\r\n\r\n")  # no key: no body asked for
    assert status == 401 and refused["code"] == 16
