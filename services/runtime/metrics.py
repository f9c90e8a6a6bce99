"""Prometheus metrics: the go-grpc-prometheus metric names for calls, plus model and batching metrics.

``grpc_code`` label values are gRPC status names as Python spells them (``OK``, ``INVALID_ARGUMENT``),
as py-grpc-prometheus does. A method's series for every code are created at 0 on its first call,
so ``rate()`` sees later errors from a known zero.

Each server owns its registry, so several servers in one process (tests, benchmarks) never mix.
Queue time and compute time are separate histograms, as Triton reports them.

Latency histograms are ``TracedHistogram``s: an observation made under a sampled span carries its trace
id as an exemplar, shown in the OpenMetrics exposition (``Accept: application/openmetrics-text``, what
Prometheus asks for with exemplar storage on), so a slow bucket links to a trace of a slow call.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from . import tracing

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class TracedHistogram(Histogram):
    """A histogram whose observations under a sampled span keep its trace id as their bucket's exemplar."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        super().observe(amount, exemplar if exemplar is not None else tracing.exemplar())


class RuntimeMetrics:
    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry or CollectorRegistry()
        r = self.registry
        rpc_labels = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter("grpc_server_started", "RPCs started on the server.", rpc_labels, registry=r)
        self.handled = Counter(
            "grpc_server_handled", "RPCs completed on the server.", (*rpc_labels, "grpc_code"), registry=r
        )
        self.handling_seconds = TracedHistogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC, from start to the last response.",
            rpc_labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("grpc_server_in_flight", "RPCs being handled now.", registry=r)
        self.shed = Counter(
            "grpc_server_shed", "RPCs refused because the server was at its limit.", registry=r
        )
        self.inference_seconds = TracedHistogram(
            "model_inference_seconds",
            "Compute time of one model call (a whole batch), excluding queueing.",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = TracedHistogram(
            "model_queue_seconds",
            "Time a request waited in the batch queue before its batch started.",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "model_batch_size", "Requests per model batch.", ("model",), buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "model_queue_depth", "Requests waiting in the batch queue.", ("model",), registry=r
        )
        self.queue_rejected = Counter(
            "model_queue_rejected",
            "Requests refused because the batch queue was full.",
            ("model",),
            registry=r,
        )
        self.model_info = Gauge(
            "model_info", "1 for the model version being served.", ("service", "version"), registry=r
        )
        self.model_loaded = Gauge(
            "model_loaded", "1 when a model is loaded and serving.", ("service",), registry=r
        )
        self.model_load_failures = Counter(
            "model_load_failures", "Model versions that failed to load.", ("service",), registry=r
        )

    def set_model_version(self, version: str | None) -> None:
        self.model_info.clear()
        if version:
            self.model_info.labels(self.service, version).set(1)
        self.model_loaded.labels(self.service).set(1 if version else 0)

    def serve(self, host: str, port: int) -> tuple[object, int]:
        """Start the /metrics HTTP server on its own port; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port
