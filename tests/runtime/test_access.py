"""Service-to-service access on real servers: the internal token, identity believed only with it, admin
scopes declared in the protos, health and reflection open to probes."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest
from cbec.common.v1 import common_pb2, common_pb2_grpc
from google.protobuf import wrappers_pb2 as w
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.runtime.access import (
    PRINCIPAL_KEY,
    SCOPES_KEY,
    TOKEN_KEY,
    USER_KEY,
    AccessPolicy,
    required_scope,
)
from services.runtime.config import ConfigError, RuntimeSettings, load_settings
from tests.runtime.conftest import make_settings
from tests.runtime.echo_service import SERVICE, EchoService
from tests.support import INTERNAL_TOKEN, serving, token_file, trusted_channel, trusted_metadata
from tools.launcher import internal_token_file

IDENTITY = ((USER_KEY, "u-1"), (PRINCIPAL_KEY, "storefront"), (SCOPES_KEY, "admin *"))


class Client:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.who = channel.unary_unary(
            f"/{SERVICE}/WhoAmI", w.StringValue.SerializeToString, w.StringValue.FromString
        )
        self.admin = common_pb2_grpc.ModelAdminServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    async def caller(self, metadata: Any = None) -> dict[str, Any]:
        return json.loads((await self.who(w.StringValue(value="?"), metadata=metadata)).value)


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def test_with_a_token_every_call_but_health_and_reflection_needs_it(models_dir: Path) -> None:
    settings = make_settings(models_dir, internal_token_file=token_file())
    async with serving(settings, EchoService, Client) as (_, client):
        code, message = await code_of(client.caller())
        assert code == grpc.StatusCode.UNAUTHENTICATED and TOKEN_KEY in message
        wrong = ((TOKEN_KEY, "x" * len(INTERNAL_TOKEN)), *IDENTITY)
        assert (await code_of(client.caller(wrong)))[0] == grpc.StatusCode.UNAUTHENTICATED
        status = client.admin.GetModelStatus(common_pb2.GetModelStatusRequest())
        assert (await code_of(status))[0] == grpc.StatusCode.UNAUTHENTICATED
        # Probes and discovery carry no secret.
        health = await client.health.Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for response in reflection.ServerReflectionInfo(iter([request])):
            assert SERVICE in {s.name for s in response.list_services_response.service}
            break
        # The token makes the call, and only then is the identity believed.
        who = await client.caller(trusted_metadata("u-1", ("admin",), "storefront"))
        assert who == {"user": "u-1", "principal": "storefront", "scopes": ["admin"], "trusted": True}


async def test_identity_metadata_is_ignored_without_the_token(models_dir: Path) -> None:
    async with serving(make_settings(models_dir), EchoService, Client) as (_, client):
        who = await client.caller(IDENTITY)
        assert who == {"user": "", "principal": "", "scopes": [], "trusted": False}
        # A token nobody configured proves nothing either.
        who = await client.caller(((TOKEN_KEY, INTERNAL_TOKEN), *IDENTITY))
        assert who["trusted"] is False and who["user"] == ""


async def test_identity_survives_characters_metadata_cannot_carry(models_dir: Path) -> None:
    settings = make_settings(models_dir, internal_token_file=token_file())
    async with (
        serving(settings, EchoService, Client) as (server, _),
        trusted_channel(f"127.0.0.1:{server.grpc_port}", "José 用户%", ("a b", "chat")) as ch,
    ):
        who = await Client(ch).caller()
    assert who["user"] == "José 用户%"
    assert who["scopes"] == ["chat"]  # a scope holding a space is dropped, never split into two


async def test_admin_rpcs_need_the_token_and_the_admin_scope(models_dir: Path) -> None:
    load = common_pb2.LoadModelVersionRequest(service="echo")
    async with serving(make_settings(models_dir), EchoService, Client) as (_, client):
        code, message = await code_of(client.admin.LoadModelVersion(load))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "CBEC_INTERNAL_TOKEN_FILE" in message
        # Trusted metadata cannot help a server that has no token to check it against.
        code, _ = await code_of(client.admin.LoadModelVersion(load, metadata=trusted_metadata()))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert (await client.admin.GetModelStatus(common_pb2.GetModelStatusRequest())).serving.version

    settings = make_settings(models_dir, internal_token_file=token_file())
    async with serving(settings, EchoService, Client) as (_, client):
        assert (await code_of(client.admin.LoadModelVersion(load)))[0] == grpc.StatusCode.UNAUTHENTICATED
        code, message = await code_of(
            client.admin.LoadModelVersion(load, metadata=trusted_metadata("", ("recommender",), "shop"))
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "'admin'" in message and "shop" in message
        for scopes in (("admin",), ("*",)):
            loaded = await client.admin.LoadModelVersion(load, metadata=trusted_metadata("", scopes))
            assert loaded.serving.version
        # Read-only status needs the token, not the admin scope.
        status = await client.admin.GetModelStatus(
            common_pb2.GetModelStatusRequest(), metadata=trusted_metadata("", ())
        )
        assert status.serving.version


def test_the_admin_scope_comes_from_the_protos() -> None:
    admin = {
        ("cbec.common.v1.ModelAdminService", "LoadModelVersion"),
        ("cbec.recommender.v1.RecommenderService", "ForgetUser"),
        ("cbec.vision.v1.VisionService", "RemoveProducts"),
        ("cbec.chat.v1.ChatService", "UpsertKnowledge"),
    }
    from gateway.descriptors import RouteTable

    declared = {tuple(key.split("/")) for key, m in RouteTable.load().methods.items() if m.access_scope}
    assert declared == admin
    for service, method in admin:
        assert required_scope(service, method) == "admin"
    assert required_scope("cbec.common.v1.ModelAdminService", "GetModelStatus") == ""
    assert required_scope(SERVICE, "Echo") == ""  # not in the descriptor pool: nothing declared


def test_the_token_file_is_checked_at_start(tmp_path: Path, models_dir: Path) -> None:
    short = tmp_path / "short"
    short.write_text("too-short\n")
    for path in (short, tmp_path / "missing"):
        with pytest.raises(ConfigError):
            load_settings(RuntimeSettings, "echo", models_dir=models_dir, internal_token_file=path)
    settings = make_settings(models_dir, internal_token_file=token_file())
    assert AccessPolicy.from_settings(settings).token_required
    assert not AccessPolicy.from_settings(settings, enforce=False).token_required


def test_services_listen_on_loopback_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import GatewaySettings

    monkeypatch.delenv("CBEC_HOST", raising=False)
    assert RuntimeSettings(service="risk").host == "127.0.0.1"
    assert GatewaySettings(env="dev").host == "0.0.0.0"  # the one public listener


def test_make_run_makes_one_private_token(tmp_path: Path) -> None:
    state = tmp_path / "var"
    path = internal_token_file(state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text()
    assert len(token.strip()) >= 32
    assert internal_token_file(state).read_text() == token  # kept across runs
