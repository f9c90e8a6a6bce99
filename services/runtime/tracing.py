"""OpenTelemetry tracing for every service (issue 18): set-up, and the hooks that carry context.

Off unless ``CBEC_TRACE_OTLP_ENDPOINT`` (an OTLP/gRPC collector, ``http://host:4317``) or
``CBEC_TRACE_FILE`` (OTLP JSON lines, the format the collector's ``otlpjsonfile`` receiver reads) is set.
Each ``Server`` owns one ``TracerProvider`` (resource ``service.name`` = the service, a
``ParentBased(TraceIdRatioBased(CBEC_TRACE_SAMPLE_RATIO))`` sampler, a ``BatchSpanProcessor``), flushed
when the server stops. W3C ``traceparent``/``tracestate`` carry the context between services.

Who makes which span:

- the runtime's server interceptor: a SERVER span per call, its parent taken from the call's metadata;
- the client channel (``services/runtime/channel.py``, every channel between services) through
  :func:`outgoing` and :func:`end_when_done` in its call wrapper: a CLIENT span per outgoing call and
  the ``traceparent`` it sends;
- the HTTP bridge: a SERVER span per request from its ``traceparent`` header;
- the micro-batcher: ``queue`` and ``model`` spans under each sampled request;
- the state stores: a CLIENT span per SQL statement or Redis round-trip under a sampled span.

Why these hooks are this module's own and not ``opentelemetry-instrumentation-grpc``'s (or -redis,
-psycopg): several servers share one process in tests and benchmarks, each with its own provider, so
the tracer of an outgoing call or a store round-trip is the calling service's, found through the
context of the call being served; the instrumentations bind one provider per channel or patch every
client of the process with one, their gRPC server interceptor would be a second interceptor layer on
every call (the runtime keeps one, for speed) and their client interceptors make every call an
intercepted one (a task per call, and not the plain call ``gateway.grpcfix`` needs). Store spans are
made only under a sampled request, so health checks make none.

Spans are only ever children (of a served call or request): background work starts no trace of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter, default_getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from .config import RuntimeSettings

log = logging.getLogger("cbec.tracing")
T = TypeVar("T")

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_FIELDS = (TRACEPARENT, TRACESTATE)
_PROPAGATOR = TraceContextTextMapPropagator()

#: The tracer of the service whose call or request is being handled (set by the server interceptor and
#: the HTTP bridge): outgoing calls and store round-trips record their spans with it.
_tracer_var: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar("cbec_tracer", default=None)
#: Providers set up in this process; while 0, every hook returns at once.
_active = 0

# gRPC codes a server reports as its own failure (OpenTelemetry's RPC conventions); every other code
# is the caller's (a bad argument, a missing item) and leaves a server span's status unset.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class TracingUnavailable(OSError):
    """Tracing is configured but cannot be set up (the message names the setting); the service exits 1."""


# --- set-up -------------------------------------------------------------------------------------------
class Tracing:
    """One service's tracer provider, or nothing when tracing is off (``tracer`` is None)."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        global _active
        self.provider = provider
        self.tracer: Tracer | None = provider.get_tracer("cbec.runtime") if provider is not None else None
        if provider is not None:
            _active += 1

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @classmethod
    def from_settings(cls, settings: RuntimeSettings) -> Tracing:
        """Tracing as ``CBEC_TRACE_*`` configure it: off without an endpoint or a file."""
        endpoint = settings.trace_otlp_endpoint
        path = settings.trace_file
        if not endpoint and path is None:
            return cls(None)
        exporters: list[Any] = []
        if endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            # http:// is plaintext, https:// TLS (the exporter reads the scheme); 5 s per export attempt,
            # so a collector that is down cannot hold a shutdown past the grace period.
            exporters.append(OTLPSpanExporter(endpoint=endpoint, timeout=5))
        if path is not None:
            from opentelemetry.exporter.otlp.json.file import FileSpanExporter

            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                exporters.append(FileSpanExporter(path))
            except OSError as exc:
                raise TracingUnavailable(f"CBEC_TRACE_FILE={path}: {exc}") from None
        return cls(make_provider(settings.service, exporters, settings.trace_sample_ratio))

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export every finished span now (tests; the batch processor otherwise sends every few seconds)."""
        return self.provider.force_flush(int(timeout_s * 1000)) if self.provider is not None else True

    def shutdown(self) -> None:
        """Flush what is queued and stop the exporters (blocking: run it off the event loop)."""
        global _active
        if self.provider is None:
            return
        provider, self.provider, self.tracer = self.provider, None, None
        _active -= 1
        try:
            provider.shutdown()
        except Exception:
            log.exception("tracing shutdown failed")


def _coin_sampler(ratio: float) -> Any:
    """A sampler keeping a random share of calls whatever their trace id. At the edge the trace id and
    the sampled flag come from the client: trusting the flag, or hashing the id as TraceIdRatioBased
    does (a client can pick ids below its bound), would let any caller make every service record and
    export every call."""
    import random

    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class CoinSampler(Sampler):
        def should_sample(
            self,
            parent_context: Any,
            trace_id: int,
            name: str,
            kind: Any = None,
            attributes: Any = None,
            links: Any = None,
            trace_state: Any = None,
        ) -> SamplingResult:
            keep = random.random() < ratio
            state = trace.get_current_span(parent_context).get_span_context().trace_state
            return SamplingResult(
                Decision.RECORD_AND_SAMPLE if keep else Decision.DROP, attributes if keep else None, state
            )

        def get_description(self) -> str:
            return f"CoinSampler{{{ratio}}}"

    return CoinSampler()


def make_provider(
    service: str, exporters: Iterable[Any], sample_ratio: float, edge: bool | None = None
) -> TracerProvider:
    """A provider for ``service`` that samples new traces at ``sample_ratio`` and follows the caller's
    decision for continued ones, exporting through a batch processor per exporter. At the edge (a
    service no other calls: the gateway, per the registry) a client's "sampled" is only a request: such
    calls are kept at ``sample_ratio`` too, at random; behind it the services follow the edge."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from .registry import SERVICES, callers

    if edge is None:
        edge = service in SERVICES and not callers(service)

    # Resource.create also merges OTEL_RESOURCE_ATTRIBUTES (e.g. the pod's name from the chart).
    resource = Resource.create(
        {"service.name": service, "service.namespace": "cbec", "service.instance.id": socket.gethostname()}
    )
    root = TraceIdRatioBased(sample_ratio)
    edge_rule = {"remote_parent_sampled": _coin_sampler(sample_ratio)} if edge else {}
    sampler = ParentBased(root, **edge_rule)
    provider = TracerProvider(resource=resource, sampler=sampler)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def use_tracer(tracer: Tracer | None) -> None:
    """Make ``tracer`` the one of the call or request being handled (in this task's context)."""
    _tracer_var.set(tracer)


# --- reading the current context ------------------------------------------------------------------
def current_ids() -> tuple[str, str]:
    """(trace id, span id) in hex of the current span, or ("", "") outside any (for log lines)."""
    if not _active:
        return "", ""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def exemplar() -> dict[str, str] | None:
    """A histogram exemplar linking an observation to the current span, when that span is sampled."""
    if not _active:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not (ctx.is_valid and ctx.trace_flags.sampled):
        return None
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def traceparent(span: Span) -> str:
    """The W3C ``traceparent`` value naming ``span`` (for response headers)."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def recording() -> tuple[Span, Tracer] | None:
    """The current span and the service's tracer when that span is sampled (children worth making)."""
    if not _active:
        return None
    span = trace.get_current_span()
    tracer = _tracer_var.get()
    if tracer is None or not span.is_recording():
        return None
    return span, tracer


# --- server side -------------------------------------------------------------------------------------------
class _MetadataGetter(Getter[Any]):
    """Reads gRPC invocation metadata (a sequence of (key, value) pairs); keys are lower case."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        values = [str(v) for k, v in carrier or () if k == key]
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [k for k, _ in carrier or ()]


_METADATA_GETTER = _MetadataGetter()


def start_server_span(
    tracer: Tracer, name: str, carrier: Any, attributes: dict[str, Any], getter: Getter[Any] | None = None
) -> Span:
    """A SERVER span continuing the trace in ``carrier`` (gRPC metadata, or HTTP headers with their
    ``getter``), made current in this task's context. A missing or malformed ``traceparent`` starts a
    new trace: it is never an error."""
    parent = _PROPAGATOR.extract(carrier, getter=getter or _METADATA_GETTER)
    span = tracer.start_span(name, parent, SpanKind.SERVER, attributes)
    _tracer_var.set(tracer)
    # Attached for the rest of the task (each call and request has its own), like the request id.
    otel_context.attach(trace.set_span_in_context(span, parent))
    return span


#: Reads ``traceparent`` from HTTP headers (any mapping with ``get``; aiohttp's are case-insensitive).
HTTP_HEADERS: Getter[Any] = default_getter


def name_http_span(route: str) -> None:
    """Name the current HTTP request's span after its route (``GET /v1/...``), as HTTP's conventions do."""
    if not _active:
        return
    span = trace.get_current_span()
    template = route.partition(" ")[2]
    if template and span.is_recording():  # not for "unmatched" and the like: the method stays its name
        span.update_name(route)
        span.set_attribute("http.route", template)


def end_http_span(span: Span, status: int) -> None:
    if span.is_recording():
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, str(status)))
    span.end()


def end_server_span(span: Span, code: grpc.StatusCode) -> None:
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in _SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


# --- client side: the call wrapper of every channel between services ------------------------------------
def outgoing(method: str | bytes, metadata: Any) -> tuple[Any, Span | None]:
    """``metadata`` (None, pairs or ``grpc.aio.Metadata``) with the current context's ``traceparent``
    and, when that context is sampled and the calling service is known, the CLIENT span the call of
    ``method`` is recorded under (end it with :func:`end_when_done`). Outside a trace: unchanged."""
    if not _active:
        return metadata, None
    current = trace.get_current_span()
    if not current.get_span_context().is_valid:
        return metadata, None
    tracer = _tracer_var.get()
    span: Span | None = None
    ctx = None
    if tracer is not None and current.is_recording():
        name = (method.decode() if isinstance(method, bytes) else method).lstrip("/")
        service, _, rpc = name.rpartition("/")
        span = tracer.start_span(
            name,
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc},
        )
        ctx = trace.set_span_in_context(span)
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, ctx)
    kept = [(k, v) for k, v in metadata or () if k not in _FIELDS]
    return grpc.aio.Metadata(*kept, *carrier.items()), span


_pending: set[asyncio.Task[None]] = set()


def end_when_done(call: Any, span: Span | None) -> Any:
    """``call``, whose CLIENT ``span`` (from :func:`outgoing`) ends with the call's status."""
    if span is None:
        return call

    def done(finished: Any) -> None:
        ended = time.time_ns()
        task = asyncio.get_running_loop().create_task(_end_client_span(finished, span, ended))
        _pending.add(task)
        task.add_done_callback(_pending.discard)

    call.add_done_callback(done)
    return call


async def _end_client_span(call: Any, span: Span, ended_ns: int) -> None:
    try:
        code = await call.code()  # the call is over: answers at once
    except Exception:  # no status to read (the channel closed under it)
        code = grpc.StatusCode.UNKNOWN
    code = code or grpc.StatusCode.UNKNOWN
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end(ended_ns)


# --- child spans: stores, batches -----------------------------------------------------------------------
@contextlib.contextmanager
def _span(tracer: Tracer, name: str, kind: SpanKind, attributes: dict[str, Any]) -> Iterator[Span]:
    with tracer.start_as_current_span(name, kind=kind, attributes=attributes) as span:
        yield span


def store_span(
    system: str, operation: str, store: str, query: str = ""
) -> contextlib.AbstractContextManager[Any]:
    """A CLIENT span for one store round-trip (``system``: sqlite, postgresql, redis; ``query``: the
    statement with its placeholders, never its values) when it runs under a sampled span; a no-op
    context otherwise."""
    found = recording()
    if found is None:
        return contextlib.nullcontext()
    attributes = {"db.system.name": system, "db.operation.name": operation, "db.namespace": store}
    if query:
        attributes["db.query.text"] = query[:2000]
    return _span(found[1], f"{operation} {store}", SpanKind.CLIENT, attributes)


def run_in_span(span: Span, tracer: Tracer, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with ``span`` current and ``tracer`` the service's (work handed to a thread pool
    whose threads do not inherit the caller's context)."""
    token = otel_context.attach(trace.set_span_in_context(span))
    tracer_token = _tracer_var.set(tracer)
    try:
        return fn(*args)
    finally:
        _tracer_var.reset(tracer_token)
        otel_context.detach(token)
