"""Gateway metrics, registered in the runtime's registry (served with the runtime's on port 9100).

Latency histograms carry the trace id of a sampled request as an exemplar (``TracedHistogram``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.runtime.metrics import TracedHistogram

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.backend_calls = Counter(
            "gateway_backend_calls",
            "Calls from the gateway to a backend, by outcome.",
            ("backend", "grpc_method", "grpc_code"),
            registry=r,
        )
        self.backend_seconds = TracedHistogram(
            "gateway_backend_seconds",
            "Latency of a backend call seen from the gateway (retries included).",
            ("backend",),
            buckets=_BUCKETS,
            registry=r,
        )
        self.breaker_state = Gauge(
            "gateway_breaker_state",
            "Circuit breaker per backend: 0 closed, 1 half-open, 2 open.",
            ("backend",),
            registry=r,
        )
        self.breaker_rejected = Counter(
            "gateway_breaker_rejected",
            "Calls failed fast by an open circuit breaker.",
            ("backend",),
            registry=r,
        )
        self.partial_responses = Counter(
            "gateway_partial_responses",
            "Aggregated responses returned with a missing part.",
            ("rpc", "part"),
            registry=r,
        )
        self.http_requests = Counter(
            "gateway_http_requests",
            "HTTP bridge requests, by route and status.",
            ("route", "status"),
            registry=r,
        )
        self.http_seconds = TracedHistogram(
            "gateway_http_seconds",
            "HTTP bridge latency until the response started (whole call for unary).",
            ("route",),
            buckets=_BUCKETS,
            registry=r,
        )
        self.auth_failures = Counter(
            "gateway_auth_failures", "Requests refused by authentication or scopes.", ("reason",), registry=r
        )
        self.rate_limited = Counter(
            "gateway_rate_limited",
            "Requests refused by a principal's rate limit.",
            ("principal",),
            registry=r,
        )
        self.rate_limit_shared = Gauge(
            "gateway_rate_limit_shared",
            "1 while rate limits are global (buckets in Redis), 0 while this replica limits alone.",
            registry=r,
        )
        self.rate_limit_fallback = Counter(
            "gateway_rate_limit_fallback",
            "Rate-limit checks decided by this replica's own bucket because Redis did not answer.",
            registry=r,
        )
        self.breaker_outcomes = Counter(
            "gateway_breaker_outcomes",
            "How each backend call counted for its breaker: success, neutral, transport_failure, "
            "application_failure.",
            ("backend", "outcome"),
            registry=r,
        )
        self.deadline_refused = Counter(
            "gateway_deadline_refused",
            "Backend calls failed at once because the caller's deadline left too little time.",
            ("backend",),
            registry=r,
        )
        self.backend_in_flight = Gauge(
            "gateway_backend_in_flight",
            "Calls in flight to a backend (streams until they end).",
            ("backend",),
            registry=r,
        )
        self.backend_principals = Gauge(
            "gateway_backend_principals",
            "Principals with calls in flight to a backend (they share it fairly when it is full).",
            ("backend",),
            registry=r,
        )
        self.fair_share_rejected = Counter(
            "gateway_fair_share_rejected",
            "Backend calls refused because the principal was over its fair share of a full backend.",
            ("backend", "principal"),
            registry=r,
        )
