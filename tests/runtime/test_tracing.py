"""Tracing in the runtime (``services/runtime/tracing.py``), with real exporters: a real OTLP/gRPC
receiver (``tests/otlp.py``) or the OTLP JSON file, real servers on ephemeral ports, real stores."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2 as w
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.runtime import tracing
from services.runtime.config import ConfigError, RuntimeSettings, load_settings
from services.runtime.logs import configure_logging
from services.runtime.server import Server
from services.runtime.state import PostgresDatabase, SqliteDatabase, StateConfig, redis_client
from tests import stores
from tests.otlp import INTERNAL, SERVER, Receiver, otlp_receiver
from tests.runtime.conftest import EchoClient, make_settings
from tests.runtime.echo_service import SERVICE, EchoService

postgres_server, pg_url = stores.postgres_server, stores.pg_url
redis_server, redis_db = stores.redis_server, stores.redis_db

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
ECHO = f"{SERVICE}/Echo"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with otlp_receiver() as r:
        yield r


@asynccontextmanager
async def echo_server(settings: RuntimeSettings) -> AsyncIterator[tuple[Server, EchoClient]]:
    server = Server(settings, EchoService)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            yield server, EchoClient(channel)
    finally:
        await server.stop(grace=1)


async def flush(server: Server) -> None:
    """Export the finished spans now, off the event loop (the receiver answers on it)."""
    await asyncio.to_thread(server.tracing.force_flush)


def traced(models_dir: Path, receiver: Receiver, **over: Any) -> RuntimeSettings:
    fields: dict[str, Any] = {"trace_otlp_endpoint": receiver.endpoint, "trace_sample_ratio": 1.0, **over}
    return make_settings(models_dir, **fields)


def one(spans: list[Any], match: Callable[[Any], bool]) -> Any:
    found = [s for s in spans if match(s)]
    assert len(found) == 1, [(s.service, s.name) for s in spans]
    return found[0]


async def test_a_call_continues_the_callers_trace_in_a_server_span(
    models_dir: Path, receiver: Receiver
) -> None:
    async with echo_server(traced(models_dir, receiver)) as (server, client):
        assert await client.echo(w.StringValue(value="hi"), metadata=(("traceparent", TRACEPARENT),))
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await client.echo(w.StringValue(value=""), metadata=(("traceparent", TRACEPARENT),))
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as crash:
            await client.echo(w.StringValue(value="crash"), metadata=(("traceparent", TRACEPARENT),))
        assert crash.value.code() is grpc.StatusCode.INTERNAL
        health = health_pb2_grpc.HealthStub(client.channel)  # probes make no spans
        await health.Check(health_pb2.HealthCheckRequest(), metadata=(("traceparent", TRACEPARENT),))
        await flush(server)
        spans = await receiver.wait_for(lambda s: len(receiver.trace(TRACE_ID)) >= 3)
    calls = [s for s in spans if s.trace_id == TRACE_ID]
    assert len(calls) == 3 and {s.service for s in calls} == {"echo"}
    assert all(s.name == ECHO and s.kind == SERVER and s.parent_id == PARENT_ID for s in calls)
    assert all(s.attribute("rpc.system") == "grpc" and s.attribute("rpc.method") == "Echo" for s in calls)
    by_code = {s.attribute("rpc.grpc.status_code"): s for s in calls}
    assert set(by_code) == {0, 3, 13}  # OK, INVALID_ARGUMENT, INTERNAL
    # A caller's bad argument is not the server's failure; an internal error is.
    assert by_code[3].span.status.code == 0  # unset
    assert by_code[13].span.status.code == 2  # error
    assert all(s.attribute("cbec.request_id") for s in calls)


async def test_a_batched_call_records_queue_and_model_time_under_its_span(
    models_dir: Path, receiver: Receiver
) -> None:
    async with echo_server(traced(models_dir, receiver)) as (server, client):
        result = await client.predict(w.DoubleValue(value=3.0), metadata=(("traceparent", TRACEPARENT),))
        assert result.value == 6.0
        await flush(server)
        await receiver.wait_for(lambda s: len(receiver.trace(TRACE_ID)) >= 3)
    spans = receiver.trace(TRACE_ID)
    call = one(spans, lambda s: s.kind == SERVER)
    queue = one(spans, lambda s: s.name == "queue echo")
    model = one(spans, lambda s: s.name == "model echo")
    assert queue.parent_id == model.parent_id == call.span_id
    assert queue.kind == model.kind == INTERNAL
    assert model.attribute("batch.size") == 1
    # The queue wait ends where the model call starts, and both lie inside the call.
    assert queue.span.end_time_unix_nano <= model.span.start_time_unix_nano
    assert call.span.start_time_unix_nano <= queue.span.start_time_unix_nano
    assert model.span.end_time_unix_nano <= call.span.end_time_unix_nano


@pytest.mark.parametrize(
    "bad",
    [
        "garbage",
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # upper-case hex
        f"00-{TRACE_ID}-{PARENT_ID}",  # no flags
        "",
    ],
)
async def test_a_malformed_traceparent_starts_a_new_trace_and_is_never_an_error(
    models_dir: Path, receiver: Receiver, bad: str
) -> None:
    async with echo_server(traced(models_dir, receiver)) as (server, client):
        reply = await client.echo(w.StringValue(value="hi"), metadata=(("traceparent", bad),))
        assert reply.value == "hi"
        await flush(server)
        spans = await receiver.wait_for(lambda s: any(x.name == ECHO for x in s))
    span = one(spans, lambda s: s.name == ECHO)
    assert span.parent_id == ""  # a root: the header was ignored
    assert span.trace_id not in (TRACE_ID, "0" * 32)


async def test_the_callers_sampling_decision_is_followed(models_dir: Path, receiver: Receiver) -> None:
    """ParentBased: a caller that did not sample its trace gets no spans from us; at ratio 0 a new
    trace is not sampled either; a sampled caller is recorded whatever the ratio."""
    unsampled = f"00-{'1' * 32}-{PARENT_ID}-00"
    settings = traced(models_dir, receiver, trace_sample_ratio=0.0)
    async with echo_server(settings) as (server, client):
        await client.echo(w.StringValue(value="a"), metadata=(("traceparent", unsampled),))
        await client.echo(w.StringValue(value="b"))
        await client.echo(w.StringValue(value="c"), metadata=(("traceparent", TRACEPARENT),))
        await flush(server)
        spans = await receiver.wait_for(lambda s: bool(receiver.trace(TRACE_ID)))
    assert [s.trace_id for s in spans] == [TRACE_ID]


async def test_tracing_is_off_by_default_no_provider_no_ids(models_dir: Path, receiver: Receiver) -> None:
    settings = make_settings(models_dir)
    assert settings.trace_otlp_endpoint == "" and settings.trace_file is None
    async with echo_server(settings) as (server, client):
        assert not server.tracing.enabled and server.tracing.provider is None
        assert server.runtime.tracer is None
        reply = await client.echo(w.StringValue(value="hi"), metadata=(("traceparent", TRACEPARENT),))
        assert reply.value == "hi"
        assert tracing.current_ids() == ("", "")
    assert receiver.requests == []


async def test_spans_are_written_to_a_file_as_otlp_json_lines(models_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "traces" / "spans.jsonl"
    settings = make_settings(models_dir, trace_file=path)
    async with echo_server(settings) as (_, client):
        await client.echo(w.StringValue(value="hi"), metadata=(("traceparent", TRACEPARENT),))
    # Stopping the server flushed the batch processor.
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    spans = [
        (resource["resource"], span)
        for line in lines
        for resource in line["resourceSpans"]
        for scope in resource["scopeSpans"]
        for span in scope["spans"]
    ]
    (resource, span), *_ = [(r, s) for r, s in spans if s["name"] == ECHO]
    assert span["traceId"] == TRACE_ID and span["parentSpanId"] == PARENT_ID
    assert {"key": "service.name", "value": {"stringValue": "echo"}} in resource["attributes"]


def test_a_bad_collector_address_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CBEC_TRACE_OTLP_ENDPOINT", "collector:4317")  # no scheme: TLS or not is unknown
    with pytest.raises(ConfigError):
        load_settings(RuntimeSettings, "echo")
    assert "CBEC_TRACE_OTLP_ENDPOINT='collector:4317'" in capsys.readouterr().err
    monkeypatch.setenv("CBEC_TRACE_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setenv("CBEC_TRACE_SAMPLE_RATIO", "1.5")
    with pytest.raises(ConfigError):
        load_settings(RuntimeSettings, "echo")
    assert "CBEC_TRACE_SAMPLE_RATIO=" in capsys.readouterr().err


async def test_log_lines_carry_the_request_id_and_the_trace_and_span_ids(
    models_dir: Path, receiver: Receiver
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging("echo", "INFO", stream)
    try:
        settings = traced(models_dir, receiver, access_log=True)
        async with echo_server(settings) as (server, client):
            call = client.echo(w.StringValue(value="hi"), metadata=(("traceparent", TRACEPARENT),))
            await call
            request_id = dict(await call.trailing_metadata())["x-request-id"]
            await flush(server)
            await receiver.wait_for(lambda s: bool(receiver.trace(TRACE_ID)))
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    span = one(receiver.trace(TRACE_ID), lambda s: s.name == ECHO)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    rpc = [line for line in lines if line["message"] == "rpc" and line.get("grpc_method") == "Echo"]
    assert rpc and rpc[0]["request_id"] == request_id
    assert rpc[0]["trace_id"] == TRACE_ID and rpc[0]["span_id"] == span.span_id
    # Every line has the keys; lines outside a call have them empty.
    assert all("trace_id" in line and "span_id" in line for line in lines)
    assert any(line["message"] == "listening" and line["trace_id"] == "" for line in lines)


def _metrics(port: int, openmetrics: bool) -> str:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read().decode()


async def test_latency_histograms_link_to_the_trace_as_exemplars(
    models_dir: Path, receiver: Receiver
) -> None:
    settings = traced(models_dir, receiver, metrics_enabled=True, metrics_port=0)
    async with echo_server(settings) as (server, client):
        await client.predict(w.DoubleValue(value=1.0), metadata=(("traceparent", TRACEPARENT),))
        text = _metrics(server.metrics_port, openmetrics=True)
        plain = _metrics(server.metrics_port, openmetrics=False)
    for metric in ("grpc_server_handling_seconds", "model_queue_seconds", "model_inference_seconds"):
        buckets = [line for line in text.splitlines() if line.startswith(f"{metric}_bucket")]
        assert any(" # {" in line and f'trace_id="{TRACE_ID}"' in line for line in buckets), metric
    assert "trace_id" not in plain  # the Prometheus text format has no exemplars


async def test_store_round_trips_are_client_spans_under_a_sampled_span(
    tmp_path: Path, pg_url: str, redis_db: str
) -> None:
    exporter = InMemorySpanExporter()
    provider = tracing.make_provider("store-test", [exporter], 1.0)
    traces = tracing.Tracing(provider)
    assert traces.tracer is not None
    sqlite = SqliteDatabase(tmp_path / "t.sqlite3", name="things")
    postgres = PostgresDatabase(pg_url, stores.PG_PASSWORD, name="things")
    config = StateConfig(backend="shared", redis_url=redis_db, redis_password=stores.REDIS_PASSWORD)
    blocking, aio = redis_client(config), redis_client(config, asyncio=True)
    try:
        sqlite.execute("SELECT 1")  # outside any span: no span (health checks, start-up)
        blocking.ping()
        tracing.use_tracer(traces.tracer)
        with traces.tracer.start_as_current_span("request", kind=SpanKind.SERVER) as request:
            for db in (sqlite, postgres):
                db.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER)")
                db.execute("INSERT INTO t (k, v) VALUES (?, ?)", ("a", 1))
                assert db.scalar("SELECT v FROM t WHERE k = ?", ("a",)) == 1
            blocking.set(b"k", b"v")
            with blocking.pipeline(transaction=True) as pipe:
                pipe.incr(b"n").expire(b"n", 60)
                pipe.execute()
            assert await aio.get(b"k") == b"v"
            async with aio.pipeline(transaction=False) as apipe:
                await apipe.incr(b"m").execute()
        traces.force_flush()
    finally:
        tracing.use_tracer(None)
        sqlite.close()
        postgres.close()
        blocking.close()
        await aio.aclose()
        traces.shutdown()
    spans = exporter.get_finished_spans()
    parent = request.get_span_context().span_id
    stored = [s for s in spans if s.name != "request"]
    assert stored and all(s.kind is SpanKind.CLIENT and s.parent.span_id == parent for s in stored)
    names = [(s.attributes["db.system.name"], s.name) for s in stored]
    for system in ("sqlite", "postgresql"):
        assert (system, "CREATE things") in names
        assert (system, "INSERT things") in names
        assert (system, "SELECT things") in names
    assert [n for n in names if n[0] == "redis"] == [
        ("redis", "SET redis"),
        ("redis", "MULTI redis"),
        ("redis", "GET redis"),
        ("redis", "PIPELINE redis"),
    ]
    insert = next(s for s in stored if s.name == "INSERT things")
    assert insert.attributes["db.query.text"] == "INSERT INTO t (k, v) VALUES (?, ?)"  # never the values


def test_at_the_edge_a_clients_sampled_flag_does_not_force_recording() -> None:
    """The gateway takes trace ids and flags from anyone: a sampled ``traceparent`` is kept at the
    sample ratio, at random (not by its client-chosen id); behind the gateway the services follow it."""
    sampled = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}

    def recorded(service: str, ratio: float) -> int:
        exporter = InMemorySpanExporter()
        tracer = tracing.make_provider(service, [exporter], ratio).get_tracer("t")
        count = 0
        for _ in range(200):
            parent = tracing._PROPAGATOR.extract(sampled)
            span = tracer.start_span("call", parent, SpanKind.SERVER)
            count += span.is_recording()
            span.end()
        return count

    assert recorded("gateway", 0.0) == 0
    assert recorded("gateway", 1.0) == 200
    assert 0 < recorded("gateway", 0.5) < 200  # the same trace id each time: decided at random
    assert recorded("risk", 0.0) == 200  # called by the gateway: follows its decision
