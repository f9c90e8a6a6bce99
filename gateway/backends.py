"""One gRPC channel per backend, with retries, a circuit breaker, deadlines and request ids.

The channel is the runtime's (``services/runtime/channel.py``): TLS/mTLS, keepalive, a reconnect
backoff capped by ``CBEC_RECONNECT_MAX_BACKOFF_S``, gRPC retries of the methods whose proto declares
them idempotent (UNAVAILABLE and shed RESOURCE_EXHAUSTED, within a retry budget), the request id and
the trace context on every call.

The breaker (``services/runtime/breaker.py``) sits on top and sees only the backend's health
(``Backend.outcome``): client errors, calls the caller cancelled, deadlines the caller chose and per-request
size limits never count; load shedding counts against this backend only; INTERNAL-like failures count
only when several principals see them. Refusals by the gateway itself (rate limits, fair share, a
deadline too short to use) never reach the backend or its breaker.

Fair share (``fairness``): each call holds a slot of its backend for the principal it is made for,
from before the breaker check until it ends (a stream until its call is done, however it ends).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.breaker import (
    APPLICATION_FAILURE,
    NEUTRAL,
    OUTCOMES,
    STATE_VALUE,
    SUCCESS,
    TRANSPORT_FAILURE,
    CircuitOpen,
)
from services.runtime.channel import circuit_breaker, client_channel
from services.runtime.errors import REQUEST_ID_KEY
from services.runtime.logs import request_id_var

from .auth import principal_var
from .config import GatewaySettings
from .descriptors import MethodInfo, RouteTable
from .errors import (
    APPLICATION_FAILURES,
    CLIENT_ERRORS,
    BackendError,
    GatewayError,
    is_load_shedding,
)
from .fairness import FairShare, FairShareExceeded, Slot
from .metrics import GatewayMetrics

log = logging.getLogger("cbec.gateway.backends")
CALLER_KEY = "x-cbec-caller"
#: Seconds a call refused for its fair share is told to wait (a slot frees when any call of the key ends).
FAIR_SHARE_RETRY_S = 1.0


def call_metadata() -> tuple[tuple[str, str], ...]:
    """What every backend call carries: the request id, and who the gateway is calling for: the
    internal token with the verified identity (``services/runtime/access.py``) once a request is
    authenticated; outside one (no end user), the token and no identity."""
    from services.runtime.access import identity_metadata

    from .auth import current_identity, gateway_token

    identity = current_identity()
    md: tuple[tuple[str, str], ...] = ((REQUEST_ID_KEY, request_id_var.get()),)
    if identity is None:
        return md + identity_metadata(gateway_token(), "", "gateway")
    p = identity.principal
    return (*md, (CALLER_KEY, p.id), *identity_metadata(identity.token, identity.user, p.id, p.scopes))


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
        #: The proto services this backend serves for the gateway (their contract sets the retries).
        self.services = sorted({m.service.full_name for m in self.methods})
        self.breaker = circuit_breaker(name, settings, on_change=self._breaker_changed)
        metrics.breaker_state.labels(name).set(0)
        self.fair = FairShare(
            name, settings.backend_max_in_flight, settings.backend_min_share, on_change=self._fair_changed
        )
        self._in_flight = metrics.backend_in_flight.labels(name)
        self._principals = metrics.backend_principals.labels(name)
        self._outcomes = {o: metrics.breaker_outcomes.labels(name, o) for o in OUTCOMES}
        self.channel: grpc.aio.Channel | None = None
        self._callables: dict[tuple[str, str], Any] = {}
        self._counters: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._seconds = metrics.backend_seconds.labels(name)
        self._health: tuple[float, str] = (0.0, "UNKNOWN")

    def _fair_changed(self, fair: FairShare) -> None:
        self._in_flight.set(fair.in_flight)
        self._principals.set(fair.active)

    def _breaker_changed(self, name: str, state: str) -> None:
        self.metrics.breaker_state.labels(name).set(STATE_VALUE[state])
        level = logging.WARNING if state != "closed" else logging.INFO
        log.log(level, "circuit %s", state, extra={"backend": name})

    async def open(self) -> None:
        self.channel = client_channel(
            self.address,
            self.settings,
            self.services,
            max_message_bytes=self.settings.backend_max_message_bytes,
        )

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

    def _check_time(self, timeout: float) -> None:
        """A deadline too short to make a call fails here, DEADLINE_EXCEEDED: no backend call, no breaker."""
        least = self.settings.min_backend_timeout_ms / 1000
        if timeout <= 0 or timeout < least:
            self.metrics.deadline_refused.labels(self.name).inc()
            raise BackendError.make(
                self.name,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no time left to call the {self.name} backend: the deadline leaves "
                f"{max(timeout, 0) * 1000:.3g} ms, a call needs at least {least * 1000:g} ms",
            )

    def _take_slot(self) -> Slot:
        """This call's place in the backend's fair share; RESOURCE_EXHAUSTED (429) when over it."""
        principal = principal_var.get()
        who = principal.id if principal is not None else ""
        try:
            return self.fair.acquire(who)
        except FairShareExceeded as exc:
            label = "jwt" if principal is not None and principal.kind == "jwt" else who or "anonymous"
            self.metrics.fair_share_rejected.labels(self.name, label).inc()
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many calls in flight to the {self.name} backend for these credentials "
                f"({exc.held}, the fair share while it is busy is {exc.share}); retry shortly",
                retry_after_s=FAIR_SHARE_RETRY_S,
                reason="FAIR_SHARE_EXCEEDED",
                metadata={"backend": self.name, "share": str(exc.share)},
            ) from None

    def outcome(
        self,
        info: MethodInfo,
        code: grpc.StatusCode,
        status: Any | None = None,
        timeout: float | None = None,
    ) -> str:
        """How a call's end counts for the breaker (see ``breaker``): SUCCESS, NEUTRAL or a failure.

        DEADLINE_EXCEEDED is a failure only for a unary call whose deadline was at least the gateway's
        own timeout for this backend (``CBEC_GATEWAY_BACKEND_TIMEOUT_S``/``CBEC_GATEWAY_BACKEND_TIMEOUTS``): a
        shorter one is the caller's choice, and a stream's length is up to its client. (So with
        ``CBEC_GATEWAY_DEFAULT_DEADLINE_S`` below a backend's timeout, calls without a caller deadline that
        run out are neutral too.) RESOURCE_EXHAUSTED is a failure only when it is load shedding
        (``errors.is_load_shedding``; a bare code is not).
        """
        if code is grpc.StatusCode.OK or code in CLIENT_ERRORS:
            return SUCCESS
        if code in APPLICATION_FAILURES:
            return APPLICATION_FAILURE
        if code is grpc.StatusCode.UNAVAILABLE:
            return TRANSPORT_FAILURE
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            own = self.settings.backend_timeout(self.name)
            gateways = info.kind == "unary" and timeout is not None and timeout >= own
            return TRANSPORT_FAILURE if gateways else NEUTRAL
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return TRANSPORT_FAILURE if is_load_shedding(status) else NEUTRAL
        if code is grpc.StatusCode.CANCELLED:
            return NEUTRAL
        return SUCCESS  # any other code: the backend answered

    def record(
        self,
        info: MethodInfo,
        result: grpc.StatusCode | BackendError,
        trial: bool,
        started: float | None = None,
        timeout: float | None = None,
    ) -> None:
        """Count a call's end (a code, or the ``BackendError`` with its details) for metrics and breaker.

        Failures are attributed to the principal the call was made for (``auth.principal_var``)."""
        code, status = (result.code, result.status) if isinstance(result, BackendError) else (result, None)
        self._count(info, code)
        if started is not None:
            self._seconds.observe(time.perf_counter() - started)
        outcome = self.outcome(info, code, status, timeout)
        self._outcomes[outcome].inc()
        if outcome == SUCCESS:
            self.breaker.on_success(trial)
        elif outcome == NEUTRAL:
            self.breaker.on_neutral(trial)
        else:
            principal = principal_var.get()
            self.breaker.on_failure(
                trial,
                principal=principal.id if principal is not None else "",
                application=outcome == APPLICATION_FAILURE,
            )

    async def unary(self, info: MethodInfo, request: Any, timeout: float) -> Any:
        """One unary call with the fair share, the breaker, the deadline and the request id; raises
        ``BackendError`` (or ``GatewayError`` FAIR_SHARE_EXCEEDED)."""
        self._check_time(timeout)
        slot = self._take_slot()
        try:
            trial = self.admit()
            started = time.perf_counter()
            try:
                response = await self._callable(info)(request, timeout=timeout, metadata=call_metadata())
            except grpc.RpcError as exc:
                error = BackendError.from_rpc(self.name, exc)
                self.record(info, error, trial, started, timeout)
                raise error from None
            except asyncio.CancelledError:
                self.record(info, grpc.StatusCode.CANCELLED, trial)
                raise
            except BaseException:  # not a call outcome (e.g. the request would not serialize)
                self.breaker.on_neutral(trial)
                raise
            self.record(info, grpc.StatusCode.OK, trial, started, timeout)
            return response
        finally:
            slot.release()

    def stream(self, info: MethodInfo, request: Any | None, timeout: float) -> tuple[Any, bool]:
        """Start a streaming call (request is None for client/bidi streams: use ``write``); the caller
        records the outcome with ``record``. Returns (call, is_trial). The call holds a fair-share slot
        until it is done, whatever ends it (its end, an error, a cancel, its deadline)."""
        self._check_time(timeout)
        slot = self._take_slot()
        trial = False
        try:
            trial = self.admit()
            fn = self._callable(info)
            if info.client_streaming:
                call = fn(timeout=timeout, metadata=call_metadata())
            else:
                call = fn(request, timeout=timeout, metadata=call_metadata())
            call.add_done_callback(slot.release)
        except BaseException:
            if trial:
                self.breaker.on_neutral(trial)
            slot.release()
            raise
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
