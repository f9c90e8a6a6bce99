"""The runtime's client channel on real servers: TLS and mutual TLS, retries exactly where the contract
declares a method idempotent, the request id and trace context on every call, the circuit breaker, and
the health probe that uses the same channel.

The test service's contract is a proto file built here and added to the default descriptor pool, so
the retry policy is read from ``idempotency_level`` exactly as it is for the real services.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf import wrappers_pb2 as w
from grpc_health.v1 import health, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.runtime import tracing
from services.runtime.breaker import OPEN, CircuitOpen
from services.runtime.channel import ClientTLS, circuit_breaker, client_channel, retryable_methods
from services.runtime.config import RuntimeSettings
from services.runtime.errors import REQUEST_ID_KEY
from services.runtime.logs import request_id_var
from services.runtime.probe import ProbeTLS, check
from tests.gateway.certs import Pki, make_pki

SERVICE = "cbec.test.v1.ChannelTestService"
M = descriptor_pb2.MethodOptions
#: method -> (idempotency level, client streaming, server streaming)
METHODS = {
    "Read": (M.NO_SIDE_EFFECTS, False, False),
    "Put": (M.IDEMPOTENT, False, False),
    "Append": (M.IDEMPOTENCY_UNKNOWN, False, False),
    "Watch": (M.NO_SIDE_EFFECTS, False, True),
    "Collect": (M.IDEMPOTENT, True, False),
}
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _register_contract() -> None:
    """``cbec/test/v1/channel_test.proto``, in the default pool as a generated module would put it."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(SERVICE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto(
        name="cbec/test/v1/channel_test.proto",
        package="cbec.test.v1",
        syntax="proto3",
        dependency=[w.DESCRIPTOR.name],
    )
    service = proto.service.add(name=SERVICE.rsplit(".", 1)[1])
    for name, (level, client_streaming, server_streaming) in METHODS.items():
        method = service.method.add(
            name=name,
            input_type=".google.protobuf.StringValue",
            output_type=".google.protobuf.StringValue",
            client_streaming=client_streaming,
            server_streaming=server_streaming,
        )
        if level != M.IDEMPOTENCY_UNKNOWN:
            method.options.idempotency_level = level
    pool.AddSerializedFile(proto.SerializeToString())


_register_contract()


@dataclass
class Seen:
    method: str
    request_ids: list[str]
    attempt: int
    traceparent: str = ""


@dataclass
class ServerState:
    """What the server saw; ``fail[method]``: answer UNAVAILABLE to that many more calls (-1: all)."""

    address: str = ""
    seen: list[Seen] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)

    def of(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method]

    async def _enter(self, method: str, context: grpc.aio.ServicerContext) -> None:
        metadata = context.invocation_metadata() or ()
        self.seen.append(
            Seen(
                method,
                [str(v) for k, v in metadata if k == REQUEST_ID_KEY],
                int(dict(metadata).get("grpc-previous-rpc-attempts", 0)),
                str(dict(metadata).get("traceparent", "")),
            )
        )
        left = self.fail.get(method, 0)
        if left:
            self.fail[method] = left - 1 if left > 0 else left
            await context.abort(UNAVAILABLE, "failing on purpose")

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(name: str) -> Callable[[w.StringValue, Any], Awaitable[w.StringValue]]:
            async def call(request: w.StringValue, context: grpc.aio.ServicerContext) -> w.StringValue:
                await self._enter(name, context)
                return w.StringValue(value=f"{name}:{request.value}")

            return call

        async def watch(request: w.StringValue, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._enter("Watch", context)
            for i in range(2):
                yield w.StringValue(value=f"{request.value}:{i}")

        async def collect(requests: AsyncIterator[w.StringValue], context: Any) -> w.StringValue:
            await self._enter("Collect", context)
            return w.StringValue(value=",".join([r.value async for r in requests]))

        kw = dict(
            request_deserializer=w.StringValue.FromString, response_serializer=w.StringValue.SerializeToString
        )
        handlers = {n: grpc.unary_unary_rpc_method_handler(unary(n), **kw) for n in ("Read", "Put", "Append")}
        handlers["Watch"] = grpc.unary_stream_rpc_method_handler(watch, **kw)
        handlers["Collect"] = grpc.stream_unary_rpc_method_handler(collect, **kw)
        return grpc.method_handlers_generic_handler(SERVICE, handlers)


@pytest.fixture
async def make_server() -> AsyncIterator[Callable[..., Awaitable[ServerState]]]:
    servers: list[grpc.aio.Server] = []

    async def start(pki: Pki | None = None, mutual: bool = False) -> ServerState:
        state = ServerState()
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((state.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        if pki is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials(
                [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
                root_certificates=pki.ca.read_bytes() if mutual else None,
                require_client_auth=mutual,
            )
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        servers.append(server)
        state.address = f"127.0.0.1:{port}"
        return state

    yield start
    for server in servers:
        await server.stop(0)


def settings(**fields: Any) -> RuntimeSettings:
    return RuntimeSettings(service="client-test", **fields)


async def call(channel: grpc.aio.Channel, method: str, value: str = "x", **kw: Any) -> str:
    fn = channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=w.StringValue.SerializeToString,
        response_deserializer=w.StringValue.FromString,
    )
    return (await fn(w.StringValue(value=value), timeout=10, **kw)).value


async def collect(channel: grpc.aio.Channel, *values: str) -> str:
    """A client-streaming call written message by message, as the gateway's bridge does."""
    fn = channel.stream_unary(
        f"/{SERVICE}/Collect",
        request_serializer=w.StringValue.SerializeToString,
        response_deserializer=w.StringValue.FromString,
    )
    stream = fn(timeout=10)
    for value in values:
        await stream.write(w.StringValue(value=value))
    await stream.done_writing()
    return (await stream).value


async def code_of(awaitable: Awaitable[Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await awaitable
    return err.value.code()


# --- the retry policy comes from the contract ------------------------------------------------------
def test_retryable_methods_are_the_unary_ones_the_contract_declares_idempotent() -> None:
    assert retryable_methods([SERVICE]) == [
        {"service": SERVICE, "method": "Read"},
        {"service": SERVICE, "method": "Put"},
    ]
    with pytest.raises(ValueError, match=r"cbec\.test\.v1\.Nope"):
        retryable_methods(["cbec.test.v1.Nope"])


@pytest.mark.parametrize("method", ["Read", "Put"])
async def test_an_idempotent_method_is_retried_after_unavailable(make_server: Any, method: str) -> None:
    server = await make_server()
    server.fail[method] = 1
    async with client_channel(server.address, settings(), [SERVICE]) as channel:
        assert await call(channel, method) == f"{method}:x"
    attempts = server.of(method)
    assert [a.attempt for a in attempts] == [0, 1]  # the second is gRPC's retry
    assert attempts[0].request_ids == attempts[1].request_ids  # one request, one id


async def test_other_methods_are_not_retried(make_server: Any) -> None:
    server = await make_server()
    server.fail.update(Append=1, Watch=1)
    async with client_channel(server.address, settings(), [SERVICE]) as channel:
        assert await code_of(call(channel, "Append")) is UNAVAILABLE
        watch = channel.unary_stream(
            f"/{SERVICE}/Watch",
            request_serializer=w.StringValue.SerializeToString,
            response_deserializer=w.StringValue.FromString,
        )
        assert await code_of(watch(w.StringValue(value="x"), timeout=10).read()) is UNAVAILABLE
        assert await call(channel, "Append") == "Append:x"  # the service itself is fine
    assert len(server.of("Append")) == 2 and len(server.of("Watch")) == 1


async def test_no_retries_with_one_attempt_or_without_the_contract(make_server: Any) -> None:
    server = await make_server()
    server.fail["Read"] = 1
    async with client_channel(server.address, settings(retry_max_attempts=1), [SERVICE]) as channel:
        assert await code_of(call(channel, "Read")) is UNAVAILABLE
    server.fail["Read"] = 1
    async with client_channel(server.address, settings()) as channel:  # services not named
        assert await code_of(call(channel, "Read")) is UNAVAILABLE
    assert len(server.of("Read")) == 2


# --- request id, trace interceptors, options ---------------------------------------------------------
async def test_the_request_id_of_the_call_being_served_goes_along(make_server: Any) -> None:
    server = await make_server()
    async with client_channel(server.address, settings(), [SERVICE]) as channel:
        token = request_id_var.set("rid-served-1")
        try:
            await call(channel, "Read")
            watch = channel.unary_stream(f"/{SERVICE}/Watch", w.StringValue.SerializeToString)
            assert len([m async for m in watch(w.StringValue(value="x"), timeout=10)]) == 2
            assert await collect(channel, "a", "b") == "a,b"
            await call(channel, "Put", metadata=((REQUEST_ID_KEY, "rid-own"),))  # a caller's own id stays
        finally:
            request_id_var.reset(token)
        await call(channel, "Append")  # outside a call: a new id
        await call(channel, "Append")
    served = [s.request_ids for s in server.seen[:4]]
    assert served == [["rid-served-1"], ["rid-served-1"], ["rid-served-1"], ["rid-own"]]
    fresh = [s.request_ids for s in server.of("Append")]
    assert all(len(ids) == 1 and len(ids[0]) == 32 for ids in fresh) and fresh[0] != fresh[1]


async def test_the_trace_context_goes_along_with_a_client_span(make_server: Any) -> None:
    server = await make_server()
    exporter = InMemorySpanExporter()
    traced = tracing.Tracing(tracing.make_provider("caller", [exporter], 1.0))
    assert traced.tracer is not None
    try:
        async with client_channel(server.address, settings(), [SERVICE]) as channel:
            await call(channel, "Read")  # outside a trace: no context to send

            async def served() -> Any:  # a call being served: its own task, as under the server
                span = tracing.start_server_span(traced.tracer, "cbec.test.v1.Caller/Serve", None, {})
                await call(channel, "Read")
                assert await collect(channel, "a") == "a"  # a client stream keeps its plain call
                tracing.end_server_span(span, grpc.StatusCode.OK)
                return span.get_span_context()

            parent = await asyncio.create_task(served())
        for _ in range(200):  # a CLIENT span ends in a task scheduled when its call is done
            if len(exporter.get_finished_spans()) >= 3:
                break
            await asyncio.sleep(0.01)
        traced.force_flush()
    finally:
        traced.shutdown()
    first, read, collected = server.seen
    assert first.traceparent == ""
    trace_id = f"{parent.trace_id:032x}"
    assert read.traceparent.split("-")[1] == trace_id and collected.traceparent.split("-")[1] == trace_id
    clients = {s.name: s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT}
    assert set(clients) == {f"{SERVICE}/Read", f"{SERVICE}/Collect"}
    for span in clients.values():
        assert span.parent is not None and span.parent.span_id == parent.span_id
    # the server saw the CLIENT span as its parent
    assert read.traceparent.split("-")[2] == f"{clients[f'{SERVICE}/Read'].context.span_id:016x}"


async def test_the_message_size_limit_holds_before_sending(make_server: Any) -> None:
    server = await make_server()
    async with client_channel(server.address, settings(), [SERVICE], max_message_bytes=2048) as channel:
        assert await call(channel, "Read", "y" * 1000) == "Read:" + "y" * 1000
        assert await code_of(call(channel, "Read", "y" * 4000)) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(server.of("Read")) == 1


# --- TLS and mutual TLS ------------------------------------------------------------------------------
async def test_tls_per_the_backend_tls_settings(make_server: Any, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server = await make_server(pki)
    async with client_channel(server.address, settings(backend_tls_ca_file=pki.ca), [SERVICE]) as channel:
        assert await call(channel, "Read") == "Read:x"
    async with client_channel(server.address, settings(), [SERVICE]) as plain:
        assert await code_of(call(plain, "Read")) is UNAVAILABLE
    other = make_pki(tmp_path / "other")  # a CA that did not sign the server's certificate
    async with client_channel(server.address, settings(backend_tls_ca_file=other.ca), [SERVICE]) as wrong:
        assert await code_of(call(wrong, "Read")) is UNAVAILABLE
    named = settings(backend_tls_ca_file=pki.ca, backend_tls_server_name="not-the-server.example")
    async with client_channel(server.address, named, [SERVICE]) as misnamed:
        assert await code_of(call(misnamed, "Read")) is UNAVAILABLE
    assert len(server.of("Read")) == 1


async def test_mutual_tls_needs_the_client_certificate(make_server: Any, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server = await make_server(pki, mutual=True)
    mutual = settings(
        backend_tls_ca_file=pki.ca, backend_tls_cert_file=pki.client_cert, backend_tls_key_file=pki.client_key
    )
    async with client_channel(server.address, mutual, [SERVICE]) as channel:
        assert await call(channel, "Read") == "Read:x"
    async with client_channel(server.address, settings(backend_tls_ca_file=pki.ca), [SERVICE]) as no_cert:
        assert await code_of(call(no_cert, "Read")) is UNAVAILABLE
    assert len(server.of("Read")) == 1


async def test_the_probe_uses_the_channel_with_the_tls_of_its_flags(make_server: Any, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server = await make_server(pki, mutual=True)
    with_cert = ProbeTLS.from_files(pki.ca, pki.client_cert, pki.client_key, "localhost")
    assert isinstance(with_cert, ClientTLS)
    assert await check(server.address, tls=with_cert) == "SERVING"
    assert await check(server.address, tls=ProbeTLS.from_files(pki.ca)) == "UNREACHABLE"
    assert await check(server.address) == "UNREACHABLE"
    flags = ["--tls-ca", pki.ca, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key]
    for extra, code, out in ((flags, 0, "SERVING"), (flags[:2], 1, "UNREACHABLE")):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.runtime.probe", server.address, *map(str, extra),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, _ = await proc.communicate()
        assert (proc.returncode, stdout.decode().strip()) == (code, out)


# --- the circuit breaker --------------------------------------------------------------------------------
async def test_the_breaker_opens_after_repeated_failures(make_server: Any) -> None:
    server = await make_server()
    server.fail["Append"] = -1
    s = settings(breaker_failure_threshold=3, breaker_open_s=600)
    breaker = circuit_breaker("test", s)
    async with client_channel(server.address, s, [SERVICE]) as channel:
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                async with breaker.guard("key-1"):
                    await call(channel, "Append")
        async with breaker.guard("key-1"):  # a success ends the run of failures
            await call(channel, "Read")
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError):
                async with breaker.guard("key-1"):
                    await call(channel, "Append")
        assert breaker.state == OPEN
        with pytest.raises(CircuitOpen):
            async with breaker.guard("key-1"):
                await call(channel, "Append")
    assert len(server.of("Append")) == 5, "an open breaker lets no call through"


def test_the_channels_own_defaults_are_the_runtime_settings_defaults() -> None:
    """The probe's channel takes its defaults from ``ChannelDefaults`` (no pydantic at probe start):
    they must not drift from ``RuntimeSettings``."""
    import dataclasses

    from services.runtime.channel import ChannelDefaults
    from services.runtime.config import RuntimeSettings

    runtime = RuntimeSettings.model_construct(service="client")
    for default in dataclasses.fields(ChannelDefaults):
        assert getattr(ChannelDefaults(), default.name) == getattr(runtime, default.name), default.name


def test_the_probe_starts_without_loading_the_settings() -> None:
    import subprocess
    import sys

    code = (
        "import sys, services.runtime.probe as p; p._channel('127.0.0.1:1', None); "
        "print('pydantic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
