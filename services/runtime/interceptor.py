"""One server interceptor for every cross-cutting concern of a call.

In order: request id (from ``x-request-id`` metadata or made up; returned in trailing metadata),
access (internal token, trusted identity, admin scopes: ``access.py``; or the service's own
``admit_call``, e.g. the gateway's API keys, JWTs and rate limits),
deadline check (a call whose deadline has passed is not computed), load shedding (past
``max_concurrent_calls`` a call gets RESOURCE_EXHAUSTED at once; health, reflection and admin calls
are exempt so probes still answer under overload), malformed-request detection (INVALID_ARGUMENT
instead of grpc's INTERNAL "Exception deserializing request"), the contract's field limits on every
request message (``validation.py``), error mapping (``ServiceError`` to a
rich status; any other exception to INTERNAL with no stack trace leaked), metrics and logs, and (when
tracing is on) a SERVER span continuing the caller's W3C ``traceparent`` (``tracing.py``).

It is one interceptor rather than a chain because every wrapper layer costs a coroutine per call;
the runtime benchmark measures what is left.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from .access import AccessPolicy
from .errors import (
    REQUEST_ID_KEY,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Violation,
    status_metadata,
)
from .logs import request_id_var
from .metrics import RuntimeMetrics
from .tracing import end_server_span, start_server_span
from .validation import validate

log = logging.getLogger("cbec.rpc")

EXEMPT_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
        "cbec.common.v1.ModelAdminService",
    }
)


#: Probes and tooling: no span for their calls (a kubelet's health checks would be most of the traces).
UNTRACED_SERVICES = EXEMPT_SERVICES - {"cbec.common.v1.ModelAdminService"}


@dataclass(frozen=True)
class _Malformed:
    """What a request deserializes to when its bytes are not a valid message."""

    reason: str


@dataclass
class _MethodInfo:
    service: str
    method: str
    exempt: bool
    started: Any
    seconds: Any
    handled: dict[grpc.StatusCode, Any]
    labels: tuple[str, str, str]
    traced: bool

    @property
    def name(self) -> str:
        """The span name OpenTelemetry's RPC conventions give a call: ``package.Service/Method``."""
        return f"{self.service}/{self.method}"

    @property
    def span_attributes(self) -> dict[str, str]:
        return {"rpc.system": "grpc", "rpc.service": self.service, "rpc.method": self.method}


def _malformed_error(reason: str) -> ServiceError:
    return InvalidArgument(
        [Violation("request", f"malformed message: {reason}")], "request is not a valid message"
    )


class RuntimeInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        metrics: RuntimeMetrics,
        max_concurrent_calls: int,
        access_log: bool = False,
        access: AccessPolicy | None = None,
        admit_call: Callable[[str, str, grpc.aio.ServicerContext], Awaitable[None]] | None = None,
        tracer: Any = None,
    ) -> None:
        self._metrics = metrics
        self._tracer = tracer
        self._access = access or AccessPolicy(None, enforce=False)
        #: A service's own admission (the gateway authenticates end users): runs before anything reads
        #: the request, so an unauthenticated or rate-limited caller costs no validation or compute.
        self._admit_call = admit_call
        self._max = max_concurrent_calls
        self._access_log = access_log
        self._in_flight = 0
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        metrics.in_flight.set_function(lambda: self._in_flight)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._cache[method] = (handler, wrapped)
        return wrapped

    # --- wrapping -----------------------------------------------------------------------------
    def _method_info(self, full_method: str, grpc_type: str) -> _MethodInfo:
        _, service, method = (
            full_method.split("/", 2) if full_method.count("/") == 2 else ("", "", full_method)
        )
        labels = (grpc_type, service, method)
        m = self._metrics
        return _MethodInfo(
            service=service,
            method=method,
            exempt=service in EXEMPT_SERVICES,
            started=m.started.labels(*labels),
            seconds=m.handling_seconds.labels(*labels),
            handled={code: m.handled.labels(*labels, code.name) for code in grpc.StatusCode},
            labels=labels,
            traced=self._tracer is not None and service not in UNTRACED_SERVICES,
        )

    def _wrap(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        deserializer = handler.request_deserializer
        if deserializer is not None:
            inner = deserializer

            def deserializer(data: bytes, _inner=inner) -> Any:  # type: ignore[no-redef]
                try:
                    return _inner(data)
                except Exception as exc:
                    return _Malformed(str(exc) or type(exc).__name__)

        serializer = handler.response_serializer
        if handler.unary_unary:
            info = self._method_info(full_method, "unary")
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, info, stream_in=False), deserializer, serializer
            )
        if handler.stream_unary:
            info = self._method_info(full_method, "client_stream")
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, info, stream_in=True), deserializer, serializer
            )
        if handler.unary_stream:
            info = self._method_info(full_method, "server_stream")
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, info, stream_in=False), deserializer, serializer
            )
        info = self._method_info(full_method, "bidi_stream")
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, info, stream_in=True), deserializer, serializer
        )

    def _unary(self, behavior: Callable[..., Any], info: _MethodInfo, stream_in: bool) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            entered = self._enter(info, context)
            code = grpc.StatusCode.OK
            try:
                await self._admit(info, context)
                if stream_in:
                    request = _checked_stream(request)
                elif isinstance(request, _Malformed):
                    raise _malformed_error(request.reason)
                else:
                    validate(request)  # the contract's limits (validation.py)
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                code = _code_of(context)
                return result
            except BaseException as exc:
                code = self._classify(exc, info, context)
                await self._abort_for(exc, code, context)
                raise
            finally:
                self._leave(info, entered, code)

        return wrapper

    def _streaming(
        self, behavior: Callable[..., Any], info: _MethodInfo, stream_in: bool
    ) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            entered = self._enter(info, context)
            code = grpc.StatusCode.OK
            try:
                await self._admit(info, context)
                if stream_in:
                    request = _checked_stream(request)
                elif isinstance(request, _Malformed):
                    raise _malformed_error(request.reason)
                else:
                    validate(request)  # the contract's limits (validation.py)
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        yield response
                elif inspect.isawaitable(result):  # handler that writes with context.write()
                    await result
                code = _code_of(context)
            except BaseException as exc:
                code = self._classify(exc, info, context)
                await self._abort_for(exc, code, context)
                raise
            finally:
                self._leave(info, entered, code)

        return wrapper

    # --- per-call steps -----------------------------------------------------------------------
    def _enter(self, info: _MethodInfo, context: grpc.aio.ServicerContext) -> tuple[float, str, Any]:
        request_id = ""
        metadata = context.invocation_metadata()
        for key, value in metadata or ():
            if key == REQUEST_ID_KEY:
                request_id = str(value)[:128]
                break
        request_id = request_id or os.urandom(16).hex()
        request_id_var.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        span = None
        if info.traced:
            span = start_server_span(self._tracer, info.name, metadata, info.span_attributes)
            if span.is_recording():
                span.set_attribute("cbec.request_id", request_id)
        info.started.inc()
        self._in_flight += 1
        # The peer is read now: once a call is torn down (client cancelled) the context must not be used.
        return time.perf_counter(), context.peer(), span

    async def _admit(self, info: _MethodInfo, context: grpc.aio.ServicerContext) -> None:
        self._access.admit(info.service, info.method, context)  # token, identity, admin scope
        if self._admit_call is not None:
            await self._admit_call(info.service, info.method, context)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the call was computed"
            )
        if not info.exempt and self._in_flight > self._max:
            self._metrics.shed.inc()
            raise ResourceExhausted(
                f"server is at its limit of {self._max} concurrent calls", retry_after_s=0.1
            )

    def _leave(self, info: _MethodInfo, entered: tuple[float, str, Any], code: grpc.StatusCode) -> None:
        start, peer, span = entered
        elapsed = time.perf_counter() - start
        self._in_flight -= 1
        info.seconds.observe(elapsed)
        info.handled[code].inc()
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS):
            level = logging.ERROR
        elif code is grpc.StatusCode.OK:
            level = logging.INFO if self._access_log else logging.DEBUG
        else:
            level = logging.INFO if self._access_log else logging.DEBUG
            if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                level = logging.WARNING
        if log.isEnabledFor(level):
            log.log(
                level,
                "rpc",
                extra={
                    "grpc_service": info.service,
                    "grpc_method": info.method,
                    "grpc_code": code.name,
                    "duration_ms": round(elapsed * 1000, 3),
                    "peer": peer,
                },
            )
        if span is not None:  # after the metrics and the log line, which name it
            end_server_span(span, code)

    def _classify(
        self, exc: BaseException, info: _MethodInfo, context: grpc.aio.ServicerContext
    ) -> grpc.StatusCode:
        if isinstance(exc, ServiceError):
            return exc.code
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            # The client went away (a closed response stream raises GeneratorExit): nothing to send.
            return grpc.StatusCode.CANCELLED
        code = _code_of(context)
        if code is not grpc.StatusCode.OK:  # the servicer called context.abort() itself
            return code
        log.error(
            "unhandled error in %s/%s",
            info.service,
            info.method,
            exc_info=exc,
            extra={"grpc_service": info.service, "grpc_method": info.method},
        )
        return grpc.StatusCode.INTERNAL

    @staticmethod
    async def _abort_for(
        exc: BaseException, code: grpc.StatusCode, context: grpc.aio.ServicerContext
    ) -> None:
        """Send the status for a raised error; raises grpc's AbortError (which ends the call cleanly)."""
        request_id = request_id_var.get()
        if isinstance(exc, ServiceError):
            await context.abort(exc.code, exc.message, (*status_metadata(exc), (REQUEST_ID_KEY, request_id)))
        elif code is grpc.StatusCode.INTERNAL:
            await context.abort(
                code, f"internal error (request id {request_id})", ((REQUEST_ID_KEY, request_id),)
            )


def _code_of(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:  # some grpc versions return the integer value
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.UNKNOWN


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    index = 0
    async for request in requests:
        if isinstance(request, _Malformed):
            raise _malformed_error(request.reason)
        validate(request, f"requests[{index}].")
        index += 1
        yield request
