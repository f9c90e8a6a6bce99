"""Identity from credentials, end to end: a key bound to a user, a JWT's subject and a service key that
may act for users, through the gateway to the real chat service (sessions, orders) and to the test
backends (recommender, risk, aggregations), every backend requiring the internal token."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cbec.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway.auth import hash_key, user_fields
from gateway.descriptors import RouteTable
from services.chat.server import ChatService
from services.runtime.server import Server
from tests.chat.conftest import Prepared, chat_settings, embedder, prepared, state_dir  # noqa: F401
from tests.gateway.backends import Recorder
from tests.gateway.conftest import FULL_KEY, RunningGateway, make_jwt
from tests.support import with_token

SHOPPER_1 = "test-key-shopper-1-0123456789"  # bound to u-1001, who owns order CB-100231
SHOPPER_2 = "test-key-shopper-2-0123456789"  # bound to u-1002
STOREFRONT = "test-key-storefront-0123456789"  # a service: may act for the user it names
UNBOUND = "test-key-unbound-0123456789"  # neither bound nor allowed to act for users
SHOP_SCOPES = ["gateway", "chat", "recommender", "risk"]
ORDER_1_TRACKING = "JD014600006281"  # the tracking number of u-1001's order CB-100231


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    entries = [
        {"id": "full", "sha256": hash_key(FULL_KEY), "scopes": ["*"]},
        {"id": "shopper-1", "sha256": hash_key(SHOPPER_1), "scopes": SHOP_SCOPES, "user": "u-1001"},
        {"id": "shopper-2", "sha256": hash_key(SHOPPER_2), "scopes": SHOP_SCOPES, "user": "u-1002"},
        {"id": "storefront", "sha256": hash_key(STOREFRONT), "scopes": [*SHOP_SCOPES, "act_as_user"]},
        {"id": "unbound", "sha256": hash_key(UNBOUND), "scopes": SHOP_SCOPES},
    ]
    path.write_text(json.dumps({"keys": entries}))
    return path


@pytest.fixture
async def chat_gw(
    prepared: Prepared,  # noqa: F811
    state_dir: Path,  # noqa: F811
    make_gateway: Any,
) -> AsyncIterator[RunningGateway]:
    """The real chat service (requiring the internal token) behind a gateway; the rest are test backends."""
    chat = Server(with_token(chat_settings(prepared, state_dir)), ChatService)
    await chat.start()
    try:
        yield await make_gateway({"chat": f"127.0.0.1:{chat.grpc_port}"})
    finally:
        await chat.stop(grace=1)


async def call(
    gw: RunningGateway, method: str, path: str, headers: dict[str, str], body: Any = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(base_url=gw.http_url) as http,
        http.request(method, path, json=body, headers=headers) as resp,
    ):
        text = await resp.text()
    if resp.content_type == "application/x-ndjson":
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        return resp.status, next(x["result"]["result"] for x in lines if "result" in x["result"])
    return resp.status, json.loads(text)


def key(k: str) -> dict[str, str]:
    return {"x-api-key": k}


def bearer(sub: str, scopes: str = "chat") -> dict[str, str]:
    return {"Authorization": f"Bearer {make_jwt(scopes, sub=sub)}"}


def violations(body: dict[str, Any]) -> list[str]:
    return [
        v["field"]
        for d in body.get("details", [])
        if d["@type"].endswith("BadRequest")
        for v in d["fieldViolations"]
    ]


async def test_a_shoppers_key_reaches_only_that_shoppers_sessions_and_orders(chat_gw: RunningGateway) -> None:
    question = {"message": "Where is my order CB-100231?"}
    status, mine = await call(chat_gw, "POST", "/v1/chat/converse", key(SHOPPER_1), question)
    assert status == 200 and ORDER_1_TRACKING in mine["answer"]
    sid = mine["sessionId"]
    path = f"/v1/chat/sessions/{sid}"

    # Another shopper: the session does not exist for them, reading or ending it.
    status, body = await call(chat_gw, "GET", path, key(SHOPPER_2))
    assert status == 404 and ORDER_1_TRACKING not in json.dumps(body)
    assert (await call(chat_gw, "DELETE", path, key(SHOPPER_2)))[0] == 404
    continued = {**question, "sessionId": sid}
    assert (await call(chat_gw, "POST", "/v1/chat/converse", key(SHOPPER_2), continued))[0] == 404
    # Naming the other user in the body is refused, naming the field; the order stays theirs.
    status, body = await call(
        chat_gw, "POST", "/v1/chat/converse", key(SHOPPER_2), {**question, "userId": "u-1001"}
    )
    assert status == 403 and violations(body) == ["user_id"] and "userId" in body["message"]
    status, theirs = await call(chat_gw, "POST", "/v1/chat/converse", key(SHOPPER_2), question)
    assert status == 200 and ORDER_1_TRACKING not in theirs["answer"]

    # The owner still has it, whole.
    status, body = await call(chat_gw, "GET", path, key(SHOPPER_1))
    assert status == 200 and body["session"]["userId"] == "u-1001"
    assert ORDER_1_TRACKING in body["session"]["turns"][1]["text"]
    # An admin may end another user's session; then it is gone for its owner too.
    status, body = await call(chat_gw, "DELETE", path, key(FULL_KEY))
    assert status == 200 and body["ended"] is True
    assert (await call(chat_gw, "GET", path, key(SHOPPER_1)))[0] == 404


async def test_a_jwt_subject_is_the_user_and_a_service_key_acts_for_the_user_it_names(
    chat_gw: RunningGateway,
) -> None:
    question = {"message": "Where is my order CB-100231?"}
    status, jwt_result = await call(chat_gw, "POST", "/v1/chat/converse", bearer("u-1001"), question)
    assert status == 200 and ORDER_1_TRACKING in jwt_result["answer"]
    path = f"/v1/chat/sessions/{jwt_result['sessionId']}"
    assert (await call(chat_gw, "GET", path, bearer("u-1002")))[0] == 404
    status, body = await call(chat_gw, "GET", path, key(SHOPPER_1))  # the same user, another credential
    assert status == 200 and body["session"]["userId"] == "u-1001"

    # The storefront's key names the user; without a name it is nobody's, and sees no orders.
    as_1001 = {**question, "userId": "u-1001"}
    status, acted = await call(chat_gw, "POST", "/v1/chat/converse", key(STOREFRONT), as_1001)
    assert status == 200 and ORDER_1_TRACKING in acted["answer"]
    status, body = await call(chat_gw, "GET", f"/v1/chat/sessions/{acted['sessionId']}", key(SHOPPER_1))
    assert status == 200 and body["session"]["userId"] == "u-1001"
    status, anonymous = await call(chat_gw, "POST", "/v1/chat/converse", key(STOREFRONT), question)
    assert status == 200 and ORDER_1_TRACKING not in anonymous["answer"]
    # A key that is neither bound nor allowed to act for users cannot name one.
    status, body = await call(chat_gw, "POST", "/v1/chat/converse", key(UNBOUND), as_1001)
    assert status == 403 and violations(body) == ["user_id"]


async def test_body_user_ids_are_checked_and_filled_from_the_credentials(
    gw: RunningGateway, recorder: Recorder
) -> None:
    # Bound key: an empty userId is filled with the key's user; the backend is told it as trusted.
    status, body = await call(gw, "POST", "/v1/recommender/recommend", key(SHOPPER_1), {"k": 2})
    assert status == 200 and body["strategy"] == "STRATEGY_PERSONALISED"
    seen = recorder.of("Recommend")[-1]
    assert (seen.user, seen.trusted) == ("u-1001", True)
    status, body = await call(gw, "POST", "/v1/recommender/recommend", key(SHOPPER_1), {"userId": "u-1002"})
    assert status == 403 and violations(body) == ["user_id"]
    # Nested and repeated fields too: the risk transaction's user.
    tx = {"transactionId": "t-1", "cardFingerprint": "c-1", "amount": 10, "currency": "EUR",
          "occurredTime": "2026-01-01T00:00:00Z"}  # fmt: skip
    status, body = await call(
        gw, "POST", "/v1/risk/score", key(SHOPPER_1), {"transaction": {**tx, "userId": "u-9"}}
    )
    assert status == 403 and violations(body) == ["transaction.user_id"]
    batch = {"transactions": [tx, {**tx, "userId": "u-1001"}, {**tx, "userId": "u-9"}]}
    status, body = await call(gw, "POST", "/v1/risk/score:batch", key(SHOPPER_1), batch)
    assert status == 403 and violations(body) == ["transactions[2].user_id"]
    status, _ = await call(gw, "POST", "/v1/risk/score", key(SHOPPER_1), {"transaction": tx})
    assert status == 200 and recorder.of("ScoreTransaction")[-1].user == "u-1001"

    # The aggregations: a home feed is somebody's.
    status, _ = await call(gw, "POST", "/v1/gateway/home-feed", key(SHOPPER_1), {"k": 2})
    assert status == 200 and recorder.of("Recommend")[-1].user == "u-1001"
    status, body = await call(gw, "POST", "/v1/gateway/home-feed", key(UNBOUND), {"k": 2})
    assert status == 400 and violations(body) == ["user_id"] and "userId" in body["message"]
    status, body = await call(gw, "POST", "/v1/gateway/home-feed", key(UNBOUND), {"userId": "u-7"})
    assert status == 403 and violations(body) == ["user_id"]
    status, _ = await call(gw, "POST", "/v1/gateway/home-feed", key(STOREFRONT), {"userId": "u-7", "k": 2})
    assert status == 200 and recorder.of("Recommend")[-1].user == "u-7"
    order = {"order": {**tx, "userId": "u-1002"}}
    status, body = await call(gw, "POST", "/v1/gateway/assess-order", key(SHOPPER_1), order)
    assert status == 403 and violations(body) == ["order.user_id"]

    # The gateway's gRPC port applies the same rule.
    async with grpc.aio.insecure_channel(gw.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetHomeFeed(
                gateway_pb2.GetHomeFeedRequest(user_id="u-1002"), metadata=(("x-api-key", SHOPPER_1),)
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        feed = await stub.GetHomeFeed(
            gateway_pb2.GetHomeFeedRequest(k=2), metadata=(("x-api-key", SHOPPER_1),)
        )
        assert feed.items and recorder.of("Recommend")[-1].user == "u-1001"


async def test_erasure_needs_the_admin_scope_the_proto_declares(
    gw: RunningGateway, recorder: Recorder
) -> None:
    for credentials in (key(SHOPPER_1), key(STOREFRONT), bearer("u-1001", "recommender")):
        status, body = await call(gw, "DELETE", "/v1/recommender/users/u-1001", credentials)
        assert status == 403 and "'admin'" in body["message"]
    assert not recorder.of("ForgetUser")
    status, _ = await call(gw, "DELETE", "/v1/recommender/users/u-1001", key(FULL_KEY))
    assert status == 200
    seen = recorder.of("ForgetUser")[-1]
    assert seen.trusted  # the backend checked the admin scope the gateway passed on, with the token


def test_every_request_user_field_is_bound_by_the_bridge() -> None:
    """The bridge binds unary and server-streaming requests; a client stream carrying a user id would
    need binding per message, so none may until that exists."""
    routes = RouteTable.load()
    bound = {
        m.key: [".".join(f.name for f in chain) for chain in user_fields(m)] for m in routes.methods.values()
    }
    assert not [k for k, m in routes.methods.items() if m.client_streaming and bound[k]]
    assert bound["cbec.risk.v1.RiskService/ScoreTransactions"] == ["transactions.user_id"]
    assert bound["cbec.recommender.v1.RecommenderService/RecordInteractions"] == ["interactions.user_id"]
    assert bound["cbec.gateway.v1.GatewayService/AssessOrder"] == ["order.user_id"]
