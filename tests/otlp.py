"""A real OTLP/gRPC trace receiver for tests: the collector's ``TraceService`` on an ephemeral port.

The services under test export to it with their real OTLP exporter (``CBEC_TRACE_OTLP_ENDPOINT``), so
a test sees exactly what a collector would: spans with their resource (``service.name``), ids, parents,
kinds and attributes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
INTERNAL = trace_pb2.Span.SPAN_KIND_INTERNAL


@dataclass(frozen=True)
class Received:
    """One exported span with the service that sent it."""

    service: str
    span: trace_pb2.Span

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def kind(self) -> int:
        return self.span.kind

    def attribute(self, key: str) -> Any:
        for kv in self.span.attributes:
            if kv.key == key:
                value = kv.value
                return getattr(value, value.WhichOneof("value"))
        return None


@dataclass
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every ``ExportTraceServiceRequest``; ``endpoint`` is what a service is configured with."""

    endpoint: str = ""
    requests: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)

    async def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    @property
    def spans(self) -> list[Received]:
        found = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope in resource_spans.scope_spans:
                    found.extend(Received(service, span) for span in scope.spans)
        return found

    def trace(self, trace_id: str) -> list[Received]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def wait_for(
        self, ready: Callable[[list[Received]], bool], timeout_s: float = 20.0
    ) -> list[Received]:
        """The spans once ``ready(spans)`` holds; exporters send in the background, so wait for them."""
        deadline = time.monotonic() + timeout_s
        while not ready(self.spans):
            if time.monotonic() > deadline:
                names = sorted(f"{s.service}:{s.name}" for s in self.spans)
                raise AssertionError(f"the expected spans did not arrive; received {names}")
            await asyncio.sleep(0.05)
        return self.spans


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    receiver.endpoint = f"http://127.0.0.1:{port}"
    try:
        yield receiver
    finally:
        await server.stop(0)
