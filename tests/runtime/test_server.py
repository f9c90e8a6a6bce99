"""The runtime on a real server: health, reflection, request ids, errors, limits, metrics, models."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
from cbec.common.v1 import common_pb2, common_pb2_grpc
from google.protobuf import wrappers_pb2 as w
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from services.runtime.errors import field_violations
from services.runtime.server import Server
from tests.runtime.conftest import EchoClient, ThreadedServer, make_settings
from tests.runtime.echo_service import SERVICE, EchoService, write_version
from tests.support import serving, token_file, trusted_channel

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_health_serving_once_model_loaded(channel: grpc.aio.Channel) -> None:
    assert await health_of(channel) == SERVING
    assert await health_of(channel, SERVICE) == SERVING


async def test_health_not_serving_without_model_then_admin_load(tmp_path: Path) -> None:
    models = tmp_path / "models"
    srv = Server(make_settings(models, internal_token_file=token_file()), EchoService)
    await srv.start()
    try:
        async with trusted_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            assert await health_of(ch) == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await EchoClient(ch).predict(w.DoubleValue(value=1.0))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            version = write_version(models, 3.0)
            admin = common_pb2_grpc.ModelAdminServiceStub(ch)
            loaded = await admin.LoadModelVersion(common_pb2.LoadModelVersionRequest(service="echo"))
            assert loaded.serving.version == version
            assert await health_of(ch) == SERVING
            assert (await EchoClient(ch).predict(w.DoubleValue(value=2.0))).value == 6.0
    finally:
        await srv.stop(grace=1)


async def test_reflection_lists_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for response in responses:
        names = {s.name for s in response.list_services_response.service}
        break
    assert {SERVICE, "grpc.health.v1.Health", "cbec.common.v1.ModelAdminService"} <= names


async def test_request_id_round_trip(client: EchoClient) -> None:
    call = client.echo(w.StringValue(value="hi"), metadata=(("x-request-id", "abc-123"),))
    assert (await call).value == "hi"
    assert ("x-request-id", "abc-123") in list(await call.trailing_metadata())
    call = client.echo(w.StringValue(value="hi"))
    await call
    made_up = dict(await call.trailing_metadata())["x-request-id"]
    assert len(made_up) == 32


async def test_invalid_argument_has_field_violations_and_request_id(client: EchoClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.echo(w.StringValue(value=""), metadata=(("x-request-id", "rid-1"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err.value) == [("value", "must not be empty")]
    assert dict(err.value.trailing_metadata())["x-request-id"] == "rid-1"


async def test_unexpected_exception_is_internal_without_leaking(client: EchoClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.echo(w.StringValue(value="crash"))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in err.value.details()
    assert "request id" in err.value.details()


async def test_malformed_request_is_invalid_argument(client: EchoClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.raw_echo(b"\xff\xff\xff\xff")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err.value)[0][0] == "request"


async def test_oversized_request_is_resource_exhausted(tmp_path: Path, models_dir: Path) -> None:
    srv = Server(make_settings(models_dir, max_message_bytes=4096), EchoService)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await EchoClient(ch).echo(w.StringValue(value="x" * 10_000))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (await EchoClient(ch).echo(w.StringValue(value="small"))).value == "small"
    finally:
        await srv.stop(grace=1)


async def test_load_is_shed_past_the_limit_and_probes_still_answer(models_dir: Path) -> None:
    srv = Server(make_settings(models_dir, max_concurrent_calls=2), EchoService)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            client = EchoClient(ch)
            calls = [asyncio.ensure_future(client.sleep(w.DoubleValue(value=0.5))) for _ in range(6)]
            await asyncio.sleep(0.2)
            assert await health_of(ch) == SERVING  # exempt from the limit
            results = await asyncio.gather(*calls, return_exceptions=True)
        ok = [r for r in results if not isinstance(r, Exception)]
        shed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(ok) == 2
        assert len(shed) == 4
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in shed)
        status = rpc_status.from_call(shed[0])
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
    finally:
        await srv.stop(grace=1)


async def test_call_whose_deadline_passed_is_not_computed(threaded_server: ThreadedServer) -> None:
    service = threaded_server.server.service
    async with grpc.aio.insecure_channel(f"127.0.0.1:{threaded_server.server.grpc_port}") as ch:
        client = EchoClient(ch)
        assert (await client.echo(w.StringValue(value="warm"))).value == "warm"
        before = service.computed
        blocker = asyncio.ensure_future(client.block(w.DoubleValue(value=0.5)))
        await asyncio.sleep(0.1)  # the server's event loop is now blocked for 0.4 s more
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.echo(w.StringValue(value="late"), timeout=0.05)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await blocker).value == "blocked"
        assert (await client.echo(w.StringValue(value="after"))).value == "after"
    assert service.computed == before + 1  # only "after" was computed


async def test_streaming_both_ways(client: EchoClient) -> None:
    got = [r.value async for r in client.count(w.Int32Value(value=5))]
    assert got == [0, 1, 2, 3, 4]

    async def numbers():
        for x in (1.0, 2.0, 3.5):
            yield w.DoubleValue(value=x)

    assert (await client.sum(numbers())).value == 6.5


async def test_metrics_endpoint(server: Server, client: EchoClient) -> None:
    await client.echo(w.StringValue(value="hi"))
    with pytest.raises(grpc.aio.AioRpcError):
        await client.echo(w.StringValue(value=""))
    await client.predict(w.DoubleValue(value=1.0))
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    )
    method = f'grpc_method="Echo",grpc_service="{SERVICE}",grpc_type="unary"'
    assert f"grpc_server_started_total{{{method}}} 2.0" in body
    assert f'grpc_server_handled_total{{grpc_code="OK",{method}}} 1.0' in body
    assert f'grpc_server_handled_total{{grpc_code="INVALID_ARGUMENT",{method}}} 1.0' in body
    assert "grpc_server_handling_seconds_bucket" in body
    version = server.service.slot.current.manifest.version
    assert f'model_info{{service="echo",version="{version}"}} 1.0' in body
    assert 'model_batch_size_count{model="echo"} 1.0' in body
    assert 'model_inference_seconds_count{model="echo"}' in body
    assert 'model_queue_depth{model="echo"}' in body


async def test_model_swap_and_failed_load_keeps_old(models_dir: Path) -> None:
    settings = make_settings(models_dir, internal_token_file=token_file())  # admin calls need it
    async with serving(settings, EchoService, EchoClient, admin=True) as (_, client):
        admin = common_pb2_grpc.ModelAdminServiceStub(client.channel)
        assert (await client.predict(w.DoubleValue(value=1.0))).value == 2.0
        new = write_version(models_dir, 5.0)
        response = await admin.LoadModelVersion(
            common_pb2.LoadModelVersionRequest(service="echo", version=new)
        )
        assert response.serving.version == new
        assert (await client.predict(w.DoubleValue(value=1.0))).value == 5.0
        broken = write_version(models_dir, 7.0, broken=True)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.LoadModelVersion(common_pb2.LoadModelVersionRequest(service="echo", version=broken))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (await client.predict(w.DoubleValue(value=1.0))).value == 5.0
        status = await admin.GetModelStatus(common_pb2.GetModelStatusRequest(service="echo"))
        assert status.serving.version == new
        assert status.versions[0].version == broken
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.GetModelStatus(common_pb2.GetModelStatusRequest(service="risk"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
