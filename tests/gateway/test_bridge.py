"""The HTTP/JSON bridge: routes from descriptors, every service, streaming, errors, CORS, health."""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
import grpc
import pytest
from google.api import annotations_pb2

from gateway.descriptors import Route, RouteTable, import_generated_modules
from gateway.errors import HTTP_STATUS
from gateway.transcode import build_request
from tests.gateway.backends import Recorder
from tests.gateway.conftest import FULL_KEY

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


def details_of(body: dict[str, Any], type_suffix: str) -> list[dict[str, Any]]:
    return [d for d in body.get("details", []) if d["@type"].endswith(type_suffix)]


# --- routes come from the descriptors -------------------------------------------------------------
def test_every_annotated_rpc_of_every_service_has_a_route() -> None:
    import importlib

    annotated = set()
    for name in import_generated_modules():
        for service in importlib.import_module(name).DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.GetOptions().HasExtension(annotations_pb2.http):
                    annotated.add(f"{service.full_name}/{method.name}")
    table = RouteTable.load()
    routed = {r.method.key for r in table.routes}
    assert annotated == routed
    services = {key.split("/")[0] for key in routed}
    assert "cbec.common.v1.ModelAdminService" in services and len(services) == 7


async def test_openapi_document_covers_every_route(http: aiohttp.ClientSession) -> None:
    async with http.get("/openapi.json", headers={"x-api-key": ""}) as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    operations = {(m.upper(), path) for path, item in doc["paths"].items() for m in item}
    expected = {(r.http_method, r.template.openapi_path) for r in RouteTable.load().routes}
    assert operations == expected
    streaming = doc["paths"]["/v1/chat/converse"]["post"]["responses"]["200"]["content"]
    assert set(streaming) == {"application/x-ndjson", "text/event-stream"}


# --- unary calls to every service -------------------------------------------------------------------
async def test_unary_calls_reach_every_service(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.post("/v1/recommender/recommend", json={"userId": "u-1", "k": 3}) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert len(body["items"]) == 3 and body["strategy"] == "STRATEGY_PERSONALISED"
        assert body["model"]["name"] == "recommender"
    async with http.post(
        "/v1/sentiment/analyze", json={"texts": [{"id": "a", "text": "great, love it"}]}
    ) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["results"][0]["label"] == "SENTIMENT_POSITIVE"
    async with http.post("/v1/risk/score", json={"transaction": TX}) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["assessment"]["decision"] == "DECISION_REVIEW"
    image = base64.b64encode(b"\x89PNG test").decode()
    async with http.post("/v1/vision/search", json={"image": image, "k": 2}) as resp:
        body = await resp.json()
        assert resp.status == 200 and len(body["matches"]) == 2
    async with http.get("/v1/vision/index/stats") as resp:
        body = await resp.json()
        assert resp.status == 200 and body["size"] == "40"  # int64 is a string in proto3 JSON
    async with http.post(
        "/v1/chat/product-copy", json={"product": {"name": "Wool scarf"}, "targetLanguage": "en"}
    ) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["generator"] == "COPY_GENERATOR_TEMPLATE"
    async with http.delete("/v1/recommender/users/u-1") as resp:
        assert resp.status == 200 and (await resp.json()) == {"eventsDeleted": "0"}
    async with http.post("/v1/gateway/product-page", json={"productId": "sku-002", "k": 2}) as resp:
        body = await resp.json()
        assert resp.status == 200 and len(body["similarItems"]) == 2 and body["missingParts"] == []
    assert {c.method for c in recorder.calls} >= {
        "Recommend",
        "Analyze",
        "ScoreTransaction",
        "SearchByImage",
        "GetIndexStats",
        "GenerateProductCopy",
        "ForgetUser",
        "SimilarItems",
        "GetMarketReport",
    }


async def test_the_gateways_own_routes_are_checked_against_the_contract_over_http(
    http: aiohttp.ClientSession,
) -> None:
    """The gateway's own methods run in the bridge's process without the gRPC interceptor: the bridge
    itself enforces REQUIRED and the limits, as the gRPC port does."""
    for body in ({"productId": "  "}, {}):
        async with http.post("/v1/gateway/product-page", json=body) as resp:
            status = await resp.json()
            assert resp.status == 400, status
            fields = [v["field"] for d in status["details"] for v in d.get("fieldViolations", [])]
            assert "product_id" in fields, status


async def test_model_admin_is_routed_by_its_service_variable(http: aiohttp.ClientSession) -> None:
    for name in ("risk", "vision"):
        async with http.get(f"/v1/admin/{name}/model") as resp:
            body = await resp.json()
            assert resp.status == 200 and body["serving"]["name"] == name
            assert body["metrics"] == {"auc": 0.9} and body["versions"][0]["valid"] is True
    async with http.post("/v1/admin/chat/model:load", json={}) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["serving"]["name"] == "chat"
    async with http.get("/v1/admin/nope/model") as resp:
        body = await resp.json()
        assert resp.status == 404 and details_of(body, "ErrorInfo")[0]["reason"] == "SERVICE_UNKNOWN"
    async with http.post("/v1/admin/risk/model:load", json={"service": "vision"}) as resp:
        body = await resp.json()
        assert (
            resp.status == 400
            and details_of(body, "BadRequest")[0]["fieldViolations"][0]["field"] == "service"
        )


def test_query_parameters_fill_fields_the_body_does_not_carry() -> None:
    table = RouteTable.load()
    info = table.methods["cbec.recommender.v1.RecommenderService/Recommend"]
    template = table.routes[0].template.parse("/v1/users/{user_id}/recs")
    route = Route("GET", template, "", "", info)
    query = [
        ("k", "3"),
        ("filters.includeSeen", "true"),
        ("filters.categories", "tops"),
        ("filters.categories", "knits"),
        ("explain", "0"),
    ]
    message = build_request(route, {"user_id": "u 1"}, query, None)
    assert message.user_id == "u 1" and message.k == 3 and message.filters.include_seen
    assert list(message.filters.categories) == ["tops", "knits"] and not message.explain
    for bad in ([("nope", "1")], [("k", "x")], [("filters", "1")], [("explain", "maybe")]):
        with pytest.raises(Exception) as err:
            build_request(route, {"user_id": "u"}, bad, None)
        assert getattr(err.value, "code", None) == grpc.StatusCode.INVALID_ARGUMENT


# --- streaming ----------------------------------------------------------------------------------------
async def test_server_streaming_as_ndjson(http: aiohttp.ClientSession) -> None:
    async with http.post(
        "/v1/chat/converse", json={"userId": "u-1", "message": "where is my parcel"}
    ) as resp:
        assert resp.status == 200 and resp.content_type == "application/x-ndjson"
        lines = [json.loads(line) async for line in resp.content if line.strip()]
    deltas = [line["result"]["delta"] for line in lines[:-1]]
    final = lines[-1]["result"]["result"]
    assert "".join(deltas).strip() == final["answer"] == "You said: where is my parcel"
    assert final["sessionId"].startswith("s-")
    async with http.get(f"/v1/chat/sessions/{final['sessionId']}") as resp:
        body = await resp.json()
        assert resp.status == 200 and body["session"]["turns"][0]["text"] == "where is my parcel"


async def test_server_streaming_as_server_sent_events(http: aiohttp.ClientSession) -> None:
    headers = {"Accept": "text/event-stream"}
    async with http.post("/v1/chat/converse", json={"message": "hi there"}, headers=headers) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        text = await resp.text()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[-1][6:])["result"]["answer"] == "You said: hi there"


async def test_stream_error_before_first_message_is_an_http_error(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/chat/converse", json={"message": "  "}) as resp:
        body = await resp.json()
        assert resp.status == 400 and body["code"] == 3


async def test_stream_error_after_first_message_ends_the_stream(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/chat/converse", json={"message": "!abort now"}) as resp:
        assert resp.status == 200
        lines = [json.loads(line) async for line in resp.content if line.strip()]
    assert "result" in lines[0]
    assert lines[-1]["error"]["code"] == grpc.StatusCode.ABORTED.value[0]
    assert lines[-1]["error"]["message"] == "conversation aborted"


async def test_client_streaming_from_ndjson_and_json_array(http: aiohttp.ClientSession) -> None:
    img = base64.b64encode(b"img").decode()
    ndjson = "\n".join(
        json.dumps({"productId": f"new-{i}", "image": img, "category": "tops"}) for i in range(3)
    )
    headers = {"Content-Type": "application/x-ndjson"}
    async with http.post("/v1/vision/products:index", data=ndjson + "\n", headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        assert body["indexedCount"] == 3 and body["stats"]["size"] == "43"
    items = [{"productId": "new-9", "image": img}, {"productId": "", "image": img}]
    async with http.post("/v1/vision/products:index", json=items) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["indexedCount"] == 1 and body["rejected"][0]["index"] == 1


async def test_client_streaming_bad_line_is_a_400(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    lines = [json.dumps({"productId": "a", "image": "aW1n"}), json.dumps({"productId": "b", "colour": "red"})]
    headers = {"Content-Type": "application/x-ndjson"}
    async with http.post("/v1/vision/products:index", data="\n".join(lines), headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 400, body
        assert details_of(body, "BadRequest")[0]["fieldViolations"][0]["field"] == "line 2"
    async with http.post("/v1/vision/products:index", data="{not json}\n", headers=headers) as resp:
        assert resp.status == 400
    assert len(recorder.of("IndexProducts")) <= 1  # the first bad body never opened a call


async def test_bidi_streaming(http: aiohttp.ClientSession) -> None:
    inputs = [{"text": {"id": str(i), "text": t}} for i, t in enumerate(["good", "bad", "fine", "gut"])]
    body = "\n".join(json.dumps(x) for x in inputs)
    headers = {"Content-Type": "application/x-ndjson"}
    async with http.post("/v1/sentiment/analyze:stream", data=body, headers=headers) as resp:
        assert resp.status == 200
        lines = [json.loads(line) async for line in resp.content if line.strip()]
    labels = [(x["result"]["result"]["id"], x["result"]["result"]["label"]) for x in lines]
    assert labels == [
        ("0", "SENTIMENT_POSITIVE"),
        ("1", "SENTIMENT_NEGATIVE"),
        ("2", "SENTIMENT_NEUTRAL"),
        ("3", "SENTIMENT_POSITIVE"),
    ]


# --- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "what"),
    [
        ('{"userId": "u-1", "colour": "red"}', "unknown field"),
        ('{"userId": "u-1", "k": "three"}', "wrong type"),
        ('{"userId": ', "malformed JSON"),
        ("[1, 2]", "not an object"),
        ('{"filters": {"includeSeen": "yes"}}', "wrong nested type"),
        ('{"userId": "\\ud800"}', "lone surrogate"),
        ("\xff\xfe", "not UTF-8"),
    ],
)
async def test_bad_json_is_400_with_a_status_body(http: aiohttp.ClientSession, body: str, what: str) -> None:
    data = body.encode("latin-1") if what == "not UTF-8" else body.encode()
    async with http.post(
        "/v1/recommender/recommend", data=data, headers={"Content-Type": "application/json"}
    ) as resp:
        payload = await resp.json()
        assert resp.status == 400, (what, payload)
    assert payload["code"] == 3 and payload["message"]
    assert details_of(payload, "BadRequest")[0]["fieldViolations"]
    assert details_of(payload, "RequestInfo")[0]["requestId"] == resp.headers["X-Request-Id"]
    assert "Traceback" not in json.dumps(payload)


async def test_body_over_the_limit_is_413(make_gateway: Any) -> None:
    gw = await make_gateway(max_request_bytes=2048)
    big = json.dumps({"userId": "x" * 5000}).encode()
    async with aiohttp.ClientSession(base_url=gw.http_url, headers={"x-api-key": FULL_KEY}) as http:
        async with http.post("/v1/recommender/recommend", data=big) as resp:
            body = await resp.json()
            assert resp.status == 413 and details_of(body, "ErrorInfo")[0]["reason"] == "REQUEST_TOO_LARGE"
            # A limit of the request, not load: INVALID_ARGUMENT naming the limit, never 429.
            assert body["code"] == 3 and "2048 bytes" in body["message"]

        async def chunks() -> Any:  # no Content-Length: refused while reading
            for _ in range(10):
                yield b" " * 1000

        async with http.post("/v1/recommender/recommend", data=chunks()) as resp:
            assert resp.status == 413


async def test_routing_errors(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/nothing/here") as resp:
        assert resp.status == 404 and (await resp.json())["code"] == 5
    async with http.get("/v1/recommender/recommend") as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
        assert (await resp.json())["code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]


# A valid event (the contract requires at least one, with item_id and type), so the call reaches it.
INTERACTION = {"userId": "u-1", "itemId": "sku-001", "type": "INTERACTION_TYPE_VIEW"}


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
async def test_grpc_codes_map_to_http_statuses(
    make_gateway: Any, recorder: Recorder, code: grpc.StatusCode
) -> None:
    gw = await make_gateway(breaker_failure_threshold=10_000)
    recorder.fail("RecordInteractions", code)  # not idempotent, so never retried
    async with (
        aiohttp.ClientSession(base_url=gw.http_url, headers={"x-api-key": FULL_KEY}) as http,
        http.post("/v1/recommender/interactions", json={"interactions": [INTERACTION]}) as resp,
    ):
        body = await resp.json()
    assert resp.status == HTTP_STATUS[code]
    assert body["code"] == code.value[0] and body["message"] == f"injected {code.name} in RecordInteractions"


async def test_backend_not_found_keeps_its_message(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/recommender/similar-items", json={"itemId": "nope", "k": 1}) as resp:
        body = await resp.json()
        assert resp.status == 404 and body["message"] == "unknown item 'nope'"


async def test_backend_down_is_503_and_hang_is_504(
    http: aiohttp.ClientSession, backends: Any, recorder: Recorder
) -> None:
    recorder.delay("Analyze", 30)
    headers = {"grpc-timeout": "300m"}
    texts = {"texts": [{"id": "a", "text": "fine"}]}
    async with http.post("/v1/sentiment/analyze", json=texts, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 504 and body["code"] == 4
    async with http.post("/v1/sentiment/analyze", json={}, headers={"grpc-timeout": "soon"}) as resp:
        assert resp.status == 400
    await backends["risk"].stop(grace=0)
    async with http.post("/v1/risk/score", json={"transaction": TX}) as resp:
        body = await resp.json()
        assert resp.status == 503 and body["code"] == 14
        assert body["message"] == "risk backend is unavailable" and "127.0.0.1" not in json.dumps(body)
    async with http.post("/v1/gateway/assess-order", json={"order": TX}) as resp:
        body = await resp.json()
        assert resp.status == 503 and details_of(body, "ErrorInfo")[0]["reason"] == "RISK_UNAVAILABLE"


async def test_request_id_is_propagated_and_returned(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.post(
        "/v1/gateway/home-feed", json={"userId": "u-1", "k": 2}, headers={"X-Request-Id": "abc-1"}
    ) as r:
        assert r.status == 200 and r.headers["X-Request-Id"] == "abc-1"
    assert {c.request_id for c in recorder.calls} == {"abc-1"} and len(recorder.calls) == 3
    async with http.get("/v1/vision/index/stats", headers={"X-Request-Id": "bad id with spaces"}) as r:
        made_up = r.headers["X-Request-Id"]
    assert len(made_up) == 32 and recorder.calls[-1].request_id == made_up


# --- CORS and health ----------------------------------------------------------------------------------
async def test_cors(make_gateway: Any) -> None:
    gw = await make_gateway(cors_origins="https://shop.example, https://admin.example")
    async with aiohttp.ClientSession(base_url=gw.http_url) as http:
        preflight = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"}
        async with http.options("/v1/recommender/recommend", headers=preflight) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
            assert "x-api-key" in resp.headers["Access-Control-Allow-Headers"]
            assert resp.headers["Access-Control-Allow-Methods"] == "POST"
        async with http.options(
            "/v1/recommender/recommend",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        ) as resp:
            assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
        headers = {"Origin": "https://admin.example", "x-api-key": FULL_KEY}
        async with http.get("/v1/vision/index/stats", headers=headers) as resp:
            assert (
                resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "https://admin.example"
            )
            assert "x-request-id" in resp.headers["Access-Control-Expose-Headers"]
        async with http.get("/v1/vision/index/stats", headers={"Origin": "https://shop.example"}) as resp:
            assert (
                resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
            )


async def test_readiness_reflects_backend_health(gw: Any, backends: Any, make_gateway: Any) -> None:
    async with aiohttp.ClientSession(base_url=gw.http_url) as http:
        async with http.get("/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200 and body["status"] == "SERVING"
            assert {b["health"] for b in body["backends"].values()} == {"SERVING"}
        await backends["vision"].stop(grace=0)
        gw.service.backends["vision"]._health = (0.0, "")  # skip the one-second cache
        async with http.get("/readyz") as resp:
            body = await resp.json()
            assert resp.status == 503 and body["backends"]["vision"]["health"] == "UNREACHABLE"
        async with http.get("/healthz") as resp:
            assert resp.status == 200
    relaxed = await make_gateway(ready_requires="risk,recommender")
    async with aiohttp.ClientSession(base_url=relaxed.http_url) as http, http.get("/readyz") as resp:
        body = await resp.json()
        assert resp.status == 200 and body["backends"]["vision"]["required"] is False


async def test_metrics_cover_backends_breakers_and_http(make_gateway: Any) -> None:
    gw = await make_gateway(metrics_enabled=True, metrics_port=0)
    async with aiohttp.ClientSession(base_url=gw.http_url, headers={"x-api-key": FULL_KEY}) as http:
        async with http.post("/v1/recommender/recommend", json={"userId": "u-1", "k": 1}) as resp:
            assert resp.status == 200
        async with http.get(f"http://127.0.0.1:{gw.server.metrics_port}/metrics") as resp:
            text = await resp.text()
    assert 'gateway_http_requests_total{route="POST /v1/recommender/recommend",status="200"} 1.0' in text
    assert (
        'gateway_backend_calls_total{backend="recommender",grpc_code="OK",grpc_method="Recommend"} 1.0'
        in text
    )
    assert 'gateway_breaker_state{backend="risk"} 0.0' in text


async def test_backend_rejecting_a_stream_early_is_a_400_not_a_500(
    gw: Any, http: aiohttp.ClientSession
) -> None:
    """grpcio's asyncio client turns such a rejection into INTERNAL (grpc/grpc#36066); gateway.grpcfix."""
    lines = [json.dumps({"text": {"utf8Bytes": "9NdQtqU="}})] + [json.dumps({"text": {"text": "ok"}})] * 30
    headers = {"Content-Type": "application/x-ndjson"}
    for _ in range(8):
        async with http.post("/v1/sentiment/analyze:stream", data="\n".join(lines), headers=headers) as resp:
            body = await resp.json()
            assert resp.status == 400, body
            assert details_of(body, "BadRequest")[0]["fieldViolations"][0]["field"] == "text.utf8_bytes"
    assert gw.service.backends["sentiment"].breaker.state == "closed"
