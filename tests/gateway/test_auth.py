"""Authentication, scopes and rate limits on the HTTP bridge and the gateway's gRPC port."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cbec.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError

from gateway import keys as keys_cli
from gateway.auth import hash_key
from gateway.config import DEV_API_KEY, GatewaySettings
from services.runtime.errors import status_from_error
from tests.gateway.conftest import FULL_KEY, RECOMMENDER_KEY, SLOW_KEY, make_jwt

# No userId: the user comes from the credentials (tests/gateway/test_identity.py).
RECOMMEND = ("/v1/recommender/recommend", {"k": 1})


async def post(
    gw: Any, headers: dict[str, str], path: str = RECOMMEND[0], body: Any = None
) -> tuple[int, Any, Any]:
    payload = RECOMMEND[1] if body is None else body
    async with (
        aiohttp.ClientSession(base_url=gw.http_url) as http,
        http.post(path, json=payload, headers=headers) as resp,
    ):
        return resp.status, await resp.json(), resp.headers


def reason(body: dict[str, Any]) -> str:
    return next(d["reason"] for d in body["details"] if d["@type"].endswith("ErrorInfo"))


async def test_http_requires_valid_credentials(gw: Any) -> None:
    status, body, headers = await post(gw, {})
    assert status == 401 and body["code"] == 16 and reason(body) == "CREDENTIALS_MISSING"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, body, _ = await post(gw, {"x-api-key": "not-a-key"})
    assert status == 401 and reason(body) == "API_KEY_INVALID"
    status, body, _ = await post(gw, {"Authorization": "Basic dXNlcjpwYXNz"})
    assert status == 401
    status, _, _ = await post(gw, {"x-api-key": FULL_KEY})
    assert status == 200
    status, _, _ = await post(gw, {"Authorization": f"Bearer {FULL_KEY}"})
    assert status == 200


async def test_scopes(gw: Any) -> None:
    status, _, _ = await post(gw, {"x-api-key": RECOMMENDER_KEY})
    assert status == 200
    status, body, _ = await post(gw, {"x-api-key": RECOMMENDER_KEY}, "/v1/gateway/home-feed", {})
    assert status == 403 and body["code"] == 7 and reason(body) == "SCOPE_MISSING"
    async with (
        aiohttp.ClientSession(base_url=gw.http_url) as http,
        http.get("/v1/admin/recommender/model", headers={"x-api-key": RECOMMENDER_KEY}) as resp,
    ):
        assert resp.status == 403  # the admin API needs the admin scope


async def test_jwt(gw: Any) -> None:
    token = make_jwt("recommender gateway")
    status, _, _ = await post(gw, {"Authorization": f"Bearer {token}"})
    assert status == 200
    status, body, _ = await post(gw, {"Authorization": f"Bearer {make_jwt('chat')}"})
    assert status == 403
    status, body, _ = await post(gw, {"Authorization": f"Bearer {make_jwt('recommender', ttl=-120)}"})
    assert status == 401 and "expired" in body["message"]
    forged = make_jwt("*", secret="another-secret-of-sufficient-length-123")
    status, body, _ = await post(gw, {"Authorization": f"Bearer {forged}"})
    assert status == 401 and reason(body) == "TOKEN_INVALID"
    unsigned = make_jwt("*").rsplit(".", 1)[0] + "."
    status, _, _ = await post(gw, {"Authorization": f"Bearer {unsigned}"})
    assert status == 401


async def test_grpc_port_authentication(gw: Any) -> None:
    request = gateway_pb2.AssessOrderRequest()
    async with grpc.aio.insecure_channel(gw.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.AssessOrder(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(err.value.trailing_metadata()).get("x-request-id")
        # Credentials are checked before the request is read: a bad request without them is refused
        # as unauthenticated, not validated (the contract limit on home-feed userId is 256 characters).
        oversized = gateway_pb2.GetHomeFeedRequest(user_id="u" * 10_000)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetHomeFeed(oversized, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.AssessOrder(request, metadata=(("x-api-key", RECOMMENDER_KEY),), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        token = make_jwt("gateway")
        with pytest.raises(grpc.aio.AioRpcError) as err:  # authenticated: now the request itself is checked
            await stub.AssessOrder(request, metadata=(("authorization", f"Bearer {token}"),), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # probes need no key; reflection does
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            ):
                pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = [
            a
            async for a in reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=(("x-api-key", FULL_KEY),),
            )
        ]
        names = {s.name for s in answers[0].list_services_response.service}
        assert "cbec.gateway.v1.GatewayService" in names


async def test_rate_limit_http_429_with_retry_after(gw: Any) -> None:
    statuses = []
    for _ in range(4):
        status, body, headers = await post(gw, {"x-api-key": SLOW_KEY})
        statuses.append(status)
    assert statuses == [200, 200, 200, 429]  # burst 3, then 1 per second
    assert body["code"] == 8 and reason(body) == "RATE_LIMITED"
    assert int(headers["Retry-After"]) >= 1
    retry = next(d for d in body["details"] if d["@type"].endswith("RetryInfo"))
    assert retry["retryDelay"].endswith("s")
    # another key is not affected
    status, _, _ = await post(gw, {"x-api-key": FULL_KEY})
    assert status == 200


async def test_rate_limit_grpc_is_shared_with_http(gw: Any) -> None:
    for _ in range(3):
        await post(gw, {"x-api-key": SLOW_KEY})
    async with grpc.aio.insecure_channel(gw.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetHomeFeed(
                gateway_pb2.GetHomeFeedRequest(), metadata=(("x-api-key", SLOW_KEY),), timeout=5
            )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = status_from_error(err.value)
    assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)


async def test_keys_file_holds_hashes_only_and_reloads(gw: Any, keys_file: Path, make_gateway: Any) -> None:
    text = await asyncio.to_thread(keys_file.read_text)
    assert FULL_KEY not in text and hash_key(FULL_KEY) in text
    fast = await make_gateway(keys_reload_s=0.05)
    new_key = keys_cli.new_key()
    raw = json.loads(text)
    raw["keys"].append(keys_cli.entry("rotated", new_key, ["recommender"], None, None))
    await asyncio.to_thread(keys_file.write_text, json.dumps(raw))
    await asyncio.sleep(0.1)
    status, _, _ = await post(fast, {"x-api-key": new_key})
    assert status == 200


def test_keys_cli(capsys: pytest.CaptureFixture[str]) -> None:
    keys_cli.main(["new", "--id", "shop", "--scopes", "gateway,chat", "--rate", "5"])
    out, err = capsys.readouterr()
    key = err.split(": ")[-1].strip()
    entry = json.loads(out)
    assert entry == {"id": "shop", "sha256": hash_key(key), "scopes": ["gateway", "chat"], "rate_per_s": 5.0}
    assert key not in out


async def test_dev_key_only_in_dev(make_gateway: Any) -> None:
    dev = await make_gateway(env="dev", api_keys_file=None, jwt_secret_file=None)
    status, _, _ = await post(dev, {"x-api-key": DEV_API_KEY})
    assert status == 200
    prod = await make_gateway(env="prod")
    status, _, _ = await post(prod, {"x-api-key": DEV_API_KEY})
    assert status == 401


def test_prod_without_credentials_refuses_to_start() -> None:
    with pytest.raises(ValidationError, match="CBEC_GATEWAY_ENV=prod needs"):
        GatewaySettings(env="prod", api_keys_file=None, jwt_secret_file=None)


def test_bad_keys_file_is_a_configuration_error(tmp_path: Path) -> None:
    bad = tmp_path / "keys.json"
    bad.write_text(json.dumps({"keys": [{"id": "x", "sha256": "not-a-digest"}]}))
    with pytest.raises(ValidationError, match="sha256 is not a SHA-256"):
        GatewaySettings(env="prod", api_keys_file=bad)
    bad.write_text("{")
    with pytest.raises(ValidationError, match="not readable JSON"):
        GatewaySettings(env="prod", api_keys_file=bad)


async def test_jwt_signed_with_a_private_key(tmp_path: Path, make_gateway: Any) -> None:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    public = tmp_path / "jwt.pub"
    public.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    gw = await make_gateway(
        jwt_secret_file=None,
        jwt_public_key_file=public,
        jwt_issuer="https://idp.example",
        jwt_audience="cbec",
    )
    claims = {"sub": "svc-1", "scope": "recommender", "iss": "https://idp.example", "aud": "cbec"}
    token = jwt.encode({**claims, "exp": int(time.time()) + 60}, private, algorithm="ES256")
    status, _, _ = await post(gw, {"Authorization": f"Bearer {token}"})
    assert status == 200
    wrong_audience = jwt.encode(
        {**claims, "aud": "other", "exp": int(time.time()) + 60}, private, algorithm="ES256"
    )
    status, body, _ = await post(gw, {"Authorization": f"Bearer {wrong_audience}"})
    assert status == 401 and "audience" in body["message"].lower()


async def test_keys_and_addresses_from_the_helm_chart_variables(
    monkeypatch: pytest.MonkeyPatch, backends: Any, make_gateway: Any
) -> None:
    """The chart sets CBEC_GATEWAY_<SERVICE>_ADDR and puts the keys document in
    CBEC_GATEWAY_API_KEYS_SHA256."""
    document = json.dumps(
        {"keys": [{"id": "chart", "sha256": hash_key("chart-key-0123456789"), "scopes": ["risk"]}]}
    )
    monkeypatch.setenv("CBEC_GATEWAY_RISK_ADDR", f"127.0.0.1:{backends['risk'].grpc_port}")
    settings = GatewaySettings(env="prod", api_keys_sha256=document)
    assert settings.risk_addr == f"127.0.0.1:{backends['risk'].grpc_port}"
    gw = await make_gateway(api_keys_file=None, jwt_secret_file=None, api_keys_sha256=document)
    tx = {"transactionId": "t", "cardFingerprint": "c", "occurredTime": "2026-01-01T00:00:00Z", "amount": 3,
          "currency": "EUR"}  # fmt: skip
    status, body, _ = await post(
        gw, {"x-api-key": "chart-key-0123456789"}, "/v1/risk/score", {"transaction": tx}
    )
    assert status == 200 and body["assessment"]["decision"] == "DECISION_APPROVE"
