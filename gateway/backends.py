"""One gRPC channel per backend, with retries, a circuit breaker, deadlines and request ids.

Retries are gRPC's own: each channel carries a service config whose ``retryPolicy`` names only the
idempotent methods of that backend (see ``descriptors.MethodInfo.idempotent``) and retries only
UNAVAILABLE, with exponential backoff inside the caller's deadline; ``retryThrottling`` is the retry
budget (once more than half the tokens are gone, gRPC stops retrying until successes refill them).
The breaker sits on top and counts the final outcome of each call.

Channels reconnect on their own with a backoff capped by ``CBEC_RECONNECT_MAX_BACKOFF_S`` (gRPC's
default grows to two minutes), so a restarted backend is used again within seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.errors import REQUEST_ID_KEY
from services.runtime.logs import request_id_var

from .breaker import STATE_VALUE, CircuitBreaker, CircuitOpen
from .config import GatewaySettings
from .descriptors import MethodInfo, RouteTable
from .errors import BACKEND_FAILURES, BackendError
from .metrics import GatewayMetrics

log = logging.getLogger("cbec.gateway.backends")
CALLER_KEY = "x-cbec-caller"


def retry_service_config(settings: GatewaySettings, methods: Sequence[MethodInfo]) -> dict[str, Any]:
    """The channel's service config: retryPolicy for the idempotent unary methods, retryThrottling."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    names = [
        {"service": m.service.full_name, "method": m.name}
        for m in methods
        if m.idempotent and m.kind == "unary"
    ]
    if names and settings.retry_max_attempts > 1:
        config["methodConfig"] = [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": settings.retry_max_attempts,
                    "initialBackoff": f"{settings.retry_initial_backoff_s}s",
                    "maxBackoff": f"{settings.retry_max_backoff_s}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
        config["retryThrottling"] = {
            "maxTokens": settings.retry_throttle_max_tokens,
            "tokenRatio": settings.retry_throttle_token_ratio,
        }
    return config


def channel_credentials(settings: GatewaySettings) -> grpc.ChannelCredentials | None:
    if settings.backend_tls_ca_file is None:
        return None
    key = settings.backend_tls_key_file.read_bytes() if settings.backend_tls_key_file else None
    cert = settings.backend_tls_cert_file.read_bytes() if settings.backend_tls_cert_file else None
    return grpc.ssl_channel_credentials(
        root_certificates=settings.backend_tls_ca_file.read_bytes(), private_key=key, certificate_chain=cert
    )


def call_metadata() -> tuple[tuple[str, str], ...]:
    """What every backend call carries: the request id, and who the gateway is calling for."""
    from .auth import principal_var

    principal = principal_var.get()
    md: tuple[tuple[str, str], ...] = ((REQUEST_ID_KEY, request_id_var.get()),)
    if principal is not None:
        md += ((CALLER_KEY, principal.id),)
    return md


class Backend:
    def __init__(
        self,
        name: str,
        address: str,
        settings: GatewaySettings,
        methods: Sequence[MethodInfo],
        metrics: GatewayMetrics,
    ) -> None:
        self.name = name
        self.address = address
        self.settings = settings
        self.metrics = metrics
        self.methods = list(methods)
        self.service_config = retry_service_config(settings, self.methods)
        self.breaker = CircuitBreaker(
            name,
            settings.breaker_failure_threshold,
            settings.breaker_open_s,
            on_change=self._breaker_changed,
        )
        metrics.breaker_state.labels(name).set(0)
        self.channel: grpc.aio.Channel | None = None
        self._callables: dict[tuple[str, str], Any] = {}
        self._counters: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._seconds = metrics.backend_seconds.labels(name)
        self._health: tuple[float, str] = (0.0, "UNKNOWN")

    def _breaker_changed(self, name: str, state: str) -> None:
        self.metrics.breaker_state.labels(name).set(STATE_VALUE[state])
        level = logging.WARNING if state != "closed" else logging.INFO
        log.log(level, "circuit %s", state, extra={"backend": name})

    async def open(self) -> None:
        s = self.settings
        options: list[tuple[str, Any]] = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(self.service_config)),
            ("grpc.max_send_message_length", s.backend_max_message_bytes),
            ("grpc.max_receive_message_length", s.backend_max_message_bytes),
            ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(s.reconnect_max_backoff_s * 1000)),
            ("grpc.per_rpc_retry_buffer_size", min(s.backend_max_message_bytes, 4 * 1024 * 1024)),
        ]
        credentials = channel_credentials(s)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(self.address, options=options)
        else:
            if s.backend_tls_server_name:
                options.append(("grpc.ssl_target_name_override", s.backend_tls_server_name))
            self.channel = grpc.aio.secure_channel(self.address, credentials, options=options)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    # --- calls ------------------------------------------------------------------------------------
    def _callable(self, info: MethodInfo) -> Any:
        key = (info.path, info.kind)
        fn = self._callables.get(key)
        if fn is None:
            assert self.channel is not None, "backend channel not open"
            make = {
                "unary": self.channel.unary_unary,
                "server_stream": self.channel.unary_stream,
                "client_stream": self.channel.stream_unary,
                "bidi_stream": self.channel.stream_stream,
            }[info.kind]
            fn = make(
                info.path,
                request_serializer=info.request_cls.SerializeToString,
                response_deserializer=info.response_cls.FromString,
            )
            self._callables[key] = fn
        return fn

    def _count(self, info: MethodInfo, code: grpc.StatusCode) -> None:
        key = (info.name, code)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.backend_calls.labels(self.name, info.name, code.name)
        counter.inc()

    def admit(self) -> bool:
        """Breaker check before a call; raises ``BackendError`` (UNAVAILABLE) when the circuit is open."""
        try:
            return self.breaker.before_call()
        except CircuitOpen as exc:
            self.metrics.breaker_rejected.labels(self.name).inc()
            raise BackendError.make(
                self.name,
                grpc.StatusCode.UNAVAILABLE,
                f"{self.name} backend is unavailable (circuit open after repeated failures)",
                retry_after_s=exc.retry_after_s,
            ) from None

    def record(
        self, info: MethodInfo, code: grpc.StatusCode, trial: bool, started: float | None = None
    ) -> None:
        self._count(info, code)
        if started is not None:
            self._seconds.observe(time.perf_counter() - started)
        if code in BACKEND_FAILURES:
            self.breaker.on_failure(trial)
        elif code is grpc.StatusCode.CANCELLED:
            self.breaker.on_neutral(trial)
        else:  # OK or a client error: the backend answered
            self.breaker.on_success(trial)

    async def unary(self, info: MethodInfo, request: Any, timeout: float) -> Any:
        """One unary call with the breaker, the deadline and the request id; raises ``BackendError``."""
        if timeout <= 0:
            raise BackendError.make(
                self.name, grpc.StatusCode.DEADLINE_EXCEEDED, f"no time left to call the {self.name} backend"
            )
        trial = self.admit()
        started = time.perf_counter()
        try:
            response = await self._callable(info)(request, timeout=timeout, metadata=call_metadata())
        except grpc.RpcError as exc:
            error = BackendError.from_rpc(self.name, exc)
            self.record(info, error.code, trial, started)
            raise error from None
        except asyncio.CancelledError:
            self.record(info, grpc.StatusCode.CANCELLED, trial)
            raise
        self.record(info, grpc.StatusCode.OK, trial, started)
        return response

    def stream(self, info: MethodInfo, request: Any | None, timeout: float) -> tuple[Any, bool]:
        """Start a streaming call (request is None for client/bidi streams: use ``write``); the caller
        records the outcome with ``record``. Returns (call, is_trial)."""
        trial = self.admit()
        fn = self._callable(info)
        if info.client_streaming:
            call = fn(timeout=timeout, metadata=call_metadata())
        else:
            call = fn(request, timeout=timeout, metadata=call_metadata())
        return call, trial

    # --- health -----------------------------------------------------------------------------------
    async def health(self, timeout: float = 1.0, max_age_s: float = 1.0) -> str:
        """The backend's gRPC health (``SERVING``, ``NOT_SERVING``, ``UNREACHABLE``...), cached briefly."""
        at, status = self._health
        if time.monotonic() - at < max_age_s:
            return status
        assert self.channel is not None
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout, metadata=call_metadata()
            )
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            status = (
                "UNREACHABLE"
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                else (f"ERROR_{code.name}" if isinstance(code, grpc.StatusCode) else "UNREACHABLE")
            )
        self._health = (time.monotonic(), status)
        return status


class BackendPool:
    def __init__(self, settings: GatewaySettings, routes: RouteTable, metrics: GatewayMetrics) -> None:
        self.settings = settings
        names = routes.backends()
        shared = [m for m in routes.methods.values() if m.routing_field]
        self.backends: dict[str, Backend] = {}
        for name in names:
            address = settings.backend_address(name)
            if address is None:
                log.warning("no address configured for backend %s (CBEC_%s_ADDR)", name, name.upper())
                continue
            methods = [m for m in routes.methods.values() if m.package_backend == name] + shared
            self.backends[name] = Backend(name, address, settings, methods, metrics)

    def __getitem__(self, name: str) -> Backend:
        return self.backends[name]

    def get(self, name: str) -> Backend | None:
        return self.backends.get(name)

    async def open(self) -> None:
        for backend in self.backends.values():
            await backend.open()

    async def close(self) -> None:
        for backend in self.backends.values():
            await backend.close()

    async def health(self) -> dict[str, str]:
        names = list(self.backends)
        statuses = await asyncio.gather(*(self.backends[n].health() for n in names))
        return dict(zip(names, statuses, strict=True))
