"""The HTTP/JSON bridge (aiohttp, port 8080): every annotated RPC of every service, from the descriptors.

One catch-all handler matches the request against the route table built from the ``google.api.http``
options (``descriptors.RouteTable``), authenticates, rate-limits, transcodes (``transcode``) and calls:
the aggregations in-process, every other service over its backend channel (``backends``), the
model-admin API on the backend its ``{service}`` variable names.

- Unary: JSON in, JSON out.
- Server streaming: NDJSON (``{"result": ...}`` per line, a final ``{"error": Status}`` if the stream
  fails) or server-sent events when the client sends ``Accept: text/event-stream``. An error before the
  first message is an ordinary HTTP error.
- Client and bidi streaming: the body is NDJSON (``Content-Type: application/x-ndjson``, read and sent
  message by message with gRPC flow control) or a JSON array; a bad line cancels the call.
- Errors: the HTTP status from ``google/rpc/code.proto``, a ``google.rpc.Status`` JSON body with its
  details plus a ``RequestInfo`` with the request id, ``Retry-After`` when there is a ``RetryInfo``;
  never a stack trace.
- ``X-Request-Id`` (taken from the request or made up) goes to every backend and comes back.
- Tracing on (``services/runtime/tracing.py``): a W3C ``traceparent`` header (and ``tracestate``)
  continues the caller's trace, a missing or malformed one starts a new trace; the request's SERVER
  span is the parent of every backend call, and the response's ``traceparent`` header names it.
- ``grpc-timeout`` (e.g. ``500m``) sets the call's deadline; otherwise ``CBEC_GATEWAY_DEFAULT_DEADLINE_S``.
- ``/healthz`` liveness, ``/readyz`` the backends' gRPC health, ``/openapi.json`` the API document.
- Slow and oversized clients: a request head must arrive within ``CBEC_GATEWAY_HTTP_HEADER_TIMEOUT_S`` of
  its first byte, a unary body (or one NDJSON line) within ``CBEC_GATEWAY_HTTP_BODY_TIMEOUT_S`` (else
  408), and a connection with no request for ``CBEC_GATEWAY_HTTP_IDLE_TIMEOUT_S`` is closed. A header line
  over ``CBEC_GATEWAY_HTTP_MAX_HEADER_BYTES`` or more than ``CBEC_GATEWAY_HTTP_MAX_HEADERS`` of them is a
  431; an unknown method a 501, a known one on the wrong path a 405 with ``Allow``; all as
  ``google.rpc.Status`` JSON.
- A client that goes away is logged at INFO and counted as 499; its backend call is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from google.protobuf.message import Message

from services.runtime import tracing
from services.runtime.errors import InvalidArgument, ServiceError, Violation
from services.runtime.logs import request_id_var
from services.runtime.validation import validate

from . import grpcfix
from .auth import API_KEY_HEADER, Authenticator, bind_user, principal_var
from .backends import Backend, BackendPool
from .config import GatewaySettings
from .descriptors import Route, RouteTable
from .errors import (
    HTTP_STATUS,
    BackendError,
    GatewayError,
    code_of,
    retry_after_header,
    retry_after_s,
    status_json,
    status_of,
    with_request_id,
)
from .metrics import GatewayMetrics
from .transcode import (
    NDJSON_TYPES,
    build_request,
    dumps,
    encode_response,
    ndjson_values,
    parse_json,
    parse_timeout,
    read_body,
)
from .web import Storefront

log = logging.getLogger("cbec.gateway.http")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
LocalHandler = Callable[[Any, float | None], Awaitable[Message]]
_CORS_ALLOW_HEADERS = (
    "authorization, content-type, x-api-key, x-request-id, grpc-timeout, accept, traceparent, tracestate"
)
_CORS_EXPOSE_HEADERS = "x-request-id, retry-after, www-authenticate, traceparent"


class Bridge:
    def __init__(
        self,
        settings: GatewaySettings,
        routes: RouteTable,
        backends: BackendPool,
        local: dict[str, LocalHandler],
        auth: Authenticator,
        metrics: GatewayMetrics,
        openapi: dict[str, Any],
        tracer: Any = None,
    ) -> None:
        self.settings = settings
        #: The gateway's tracer (``Runtime.tracer``); None: tracing is off.
        self._tracer = tracer
        self.routes = routes
        self.backends = backends
        self.local = local
        self.auth = auth
        self.metrics = metrics
        self._openapi = dumps(openapi)
        self._cors = settings.cors_origin_list
        self._in_flight = 0
        self._runner: web.ServerRunner | None = None
        self.port = 0
        self._internal: dict[str, Callable[[], Awaitable[web.StreamResponse]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/openapi.json": self._openapi_doc,
        }
        self._route_metrics: dict[str, tuple[Any, dict[int, Any]]] = {}
        self._storefront = Storefront(settings)  # the web storefront's public files (gateway/web.py)

    # --- server lifecycle -------------------------------------------------------------------------
    def make_server(self) -> web.Server:
        """aiohttp's low-level server with the bridge's connection handler (``_Connection``) and limits.

        One handler serves every path, so the application router adds nothing; the low-level server is
        what lets the bridge supply its own connection class (header timeout, JSON parse errors).
        """
        s = self.settings
        return _Server(
            self.dispatch,
            bridge=self,
            handler_cancellation=True,  # a client that goes away cancels its backend call too
            header_timeout=s.http_header_timeout_s,
            keepalive_timeout=s.http_idle_timeout_s,
            max_line_size=s.http_max_header_bytes,
            max_field_size=s.http_max_header_bytes,
            max_headers=s.http_max_headers,
            lingering_time=_LINGER_S,
            access_log=None,
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if s.tls_cert_file is None or s.tls_key_file is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(s.tls_cert_file), str(s.tls_key_file))
        if s.tls_client_ca_file is not None:
            context.load_verify_locations(str(s.tls_client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    async def start(self) -> int:
        s = self.settings
        runner = web.ServerRunner(self.make_server(), shutdown_timeout=s.grace_period_s)
        await runner.setup()
        site = web.TCPSite(
            runner,
            s.http_bind_host,
            s.http_port,
            ssl_context=self._ssl_context(),
            backlog=1024,
            reuse_address=True,
        )
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"cannot bind HTTP port {s.http_bind_host}:{s.http_port}: {exc}") from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("HTTP bridge listening", extra={"http_port": self.port, "routes": len(self.routes.routes)})
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- dispatch ---------------------------------------------------------------------------------
    async def dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        if self._tracer is None or request.rel_url.raw_path in self._internal:  # no spans for probes
            return await self._dispatch(request, None)
        attributes = {"http.request.method": request.method, "url.path": request.rel_url.path}
        span = tracing.start_server_span(
            self._tracer, request.method, request.headers, attributes, tracing.HTTP_HEADERS
        )
        status = _CLIENT_CLOSED
        try:
            response = await self._dispatch(request, tracing.traceparent(span))
            status = response.status
            return response
        finally:
            tracing.end_http_span(span, status)

    async def _dispatch(self, request: web.BaseRequest, traceparent: str | None) -> web.StreamResponse:
        started = time.perf_counter()
        supplied = request.headers.get("X-Request-Id", "")
        request_id = supplied if _REQUEST_ID_RE.match(supplied) else uuid.uuid4().hex
        request_id_var.set(request_id)
        principal_var.set(None)
        headers = {"X-Request-Id": request_id, "Server": "cbec-gateway", **self._cors_headers(request)}
        if traceparent is not None:
            headers[tracing.TRACEPARENT] = traceparent
        label = "unmatched"
        response: web.StreamResponse
        try:
            path = request.rel_url.raw_path
            if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                label = "preflight"
                response = self._preflight(request, headers)
            elif path in self._internal and request.method in ("GET", "HEAD"):
                label = path
                response = await self._internal[path]()
            elif request.method in ("GET", "HEAD") and (page := self._storefront.match(path)) is not None:
                label, handler = page
                response = await handler(request)
            else:
                route, variables, allowed = self.routes.match(request.method, path)
                if route is None:
                    raise _no_route(request.method, path, allowed)
                label = route.label
                response = await self._call(request, route, variables, headers)
        except asyncio.CancelledError:
            if request.transport is None or request.transport.is_closing():
                _log_client_gone(label, request.method, started)
            self._observe(label, _CLIENT_CLOSED, started)
            raise
        except (ConnectionError, web.RequestPayloadError) as exc:
            if not isinstance(exc, ConnectionError) and request.transport is not None:
                response = self._error_response(_malformed_body(exc), request_id)
            else:  # the client went away: nothing to answer, and not the server's failure
                _log_client_gone(label, request.method, started)
                self._observe(label, _CLIENT_CLOSED, started)
                return web.Response(status=_CLIENT_CLOSED)
        except Exception as exc:
            response = self._error_response(exc, request_id)
        if not response.prepared:
            response.headers.update(headers)
        self._observe(label, response.status, started)
        if response.status >= 500 or self.settings.access_log:
            log.log(
                logging.WARNING if response.status >= 500 else logging.INFO,
                "http",
                extra={
                    "route": label,
                    "http_method": request.method,
                    "http_status": response.status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    "principal": getattr(principal_var.get(), "id", ""),
                },
            )
        return response

    def _observe(self, label: str, status: int, started: float) -> None:
        tracing.name_http_span(label)  # the request's span (when sampled) is named after its route
        entry = self._route_metrics.get(label)
        if entry is None:
            entry = self._route_metrics[label] = (self.metrics.http_seconds.labels(label), {})
        entry[0].observe(time.perf_counter() - started)
        counter = entry[1].get(status)
        if counter is None:
            counter = entry[1][status] = self.metrics.http_requests.labels(label, str(status))
        counter.inc()

    async def _call(
        self, request: web.BaseRequest, route: Route, variables: dict[str, str], headers: dict[str, str]
    ) -> web.StreamResponse:
        info = route.method
        await self.auth.admit(
            request.headers.get(API_KEY_HEADER), request.headers.get("Authorization"), info.scope
        )
        if self._in_flight >= self.settings.max_concurrent_calls:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the gateway is at its limit of {self.settings.max_concurrent_calls} concurrent requests",
                retry_after_s=1.0,
                reason="OVERLOADED",
            )
        self._in_flight += 1
        try:
            timeout = parse_timeout(request.headers.get("grpc-timeout"))
            if info.client_streaming:
                return await self._client_stream(request, route, variables, headers, timeout)
            raw = b""
            if route.body:
                await _send_continue(request)
                s = self.settings
                raw = await read_body(
                    request.content, request.content_length, s.max_request_bytes, s.http_body_timeout_s
                )
            body = parse_json(raw) if raw.strip() else None
            message = build_request(route, variables, request.rel_url.query.items(), body)
            bind_user(info, message)  # the user comes from the credentials, not the body
            if info.local:
                handler = self.local.get(info.key)
                if handler is None:
                    raise GatewayError(
                        grpc.StatusCode.UNIMPLEMENTED, f"{info.key} is not served by this gateway"
                    )
                # The gRPC port's runtime interceptor checks the contract there; here the bridge does.
                validate(message)
                result = await handler(message, self._unary_timeout(timeout) if timeout is not None else None)
                return self._json(encode_response(result, route.response_body))
            backend = self._backend_for(route, message)
            if info.server_streaming:
                return await self._server_stream(request, route, backend, message, headers, timeout)
            result = await backend.unary(info, message, self._unary_timeout(timeout))
            return self._json(encode_response(result, route.response_body))
        finally:
            self._in_flight -= 1

    def _unary_timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self.settings.default_deadline_s
        return min(timeout, self.settings.max_deadline_s)

    def _stream_timeout(self, timeout: float | None) -> float:
        return min(
            timeout if timeout is not None else self.settings.stream_deadline_s,
            self.settings.stream_deadline_s,
        )

    def _backend_for(self, route: Route, message: Message) -> Backend:
        info = route.method
        if info.routing_field:
            name = getattr(message, info.routing_field)
            if not name:
                raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"{info.routing_field} is required")
            backend = self.backends.get(name)
            if backend is None:
                raise GatewayError(
                    grpc.StatusCode.NOT_FOUND,
                    f"no model service named {name!r} behind this gateway",
                    reason="SERVICE_UNKNOWN",
                    metadata={"services": ",".join(self.backends.backends)},
                )
            return backend
        backend = self.backends.get(info.package_backend)
        if backend is None:
            raise GatewayError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"no backend is configured for {info.service.full_name}",
                reason="BACKEND_NOT_CONFIGURED",
            )
        return backend

    @staticmethod
    def _json(body: bytes, status: int = 200) -> web.Response:
        return web.Response(body=body, status=status, content_type="application/json", charset="utf-8")

    # --- streaming --------------------------------------------------------------------------------
    @staticmethod
    def _wants_sse(request: web.BaseRequest) -> bool:
        return "text/event-stream" in request.headers.get("Accept", "")

    @staticmethod
    def _encode_item(message: Message, route: Route, sse: bool) -> bytes:
        data = encode_response(message, route.response_body)
        return b"data: " + data + b"\n\n" if sse else b'{"result":' + data + b"}\n"

    @staticmethod
    def _encode_error(status: Any, sse: bool) -> bytes:
        data = dumps(status_json(with_request_id(status, request_id_var.get())))
        return b"event: error\ndata: " + data + b"\n\n" if sse else b'{"error":' + data + b"}\n"

    async def _stream_out(
        self,
        request: web.BaseRequest,
        route: Route,
        backend: Backend,
        call: Any,
        trial: bool,
        headers: dict[str, str],
        bad_input: list[BaseException],
    ) -> web.StreamResponse:
        """Relay a response stream: HTTP errors until the first message, in-stream errors after it."""
        info = route.method
        started = time.perf_counter()
        sse = self._wants_sse(request)
        try:
            first = await call.read()
        except grpc.RpcError as exc:
            error = BackendError.from_rpc(backend.name, exc)
            backend.record(info, grpc.StatusCode.CANCELLED if bad_input else error, trial, started)
            raise (bad_input[0] if bad_input else error) from None
        except asyncio.CancelledError:
            backend.record(info, grpc.StatusCode.CANCELLED, trial)
            if bad_input and not _task_cancelling():
                raise bad_input[0] from None
            raise
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = "text/event-stream" if sse else "application/x-ndjson"
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        code: grpc.StatusCode | BackendError = grpc.StatusCode.OK  # a BackendError keeps its details
        try:
            await response.prepare(request)
            item = first
            while item is not grpc.aio.EOF:
                await response.write(self._encode_item(item, route, sse))
                item = await call.read()
        except grpc.RpcError as exc:
            error = BackendError.from_rpc(backend.name, exc)
            code = error
            status = bad_input[0] if bad_input else error
            await response.write(self._encode_error(status_of(status), sse))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            call.cancel()
            if bad_input and not _task_cancelling():
                await response.write(self._encode_error(status_of(bad_input[0]), sse))
            else:
                raise
        except ConnectionError:  # the client went away
            code = grpc.StatusCode.CANCELLED
            call.cancel()
            _log_client_gone(route.label, request.method, started)
            return response
        except GatewayError as exc:  # a response with no JSON form
            code = grpc.StatusCode.CANCELLED  # the gateway ended the call: no failure of the backend's
            call.cancel()
            await response.write(self._encode_error(exc.to_status(), sse))
        except Exception as exc:  # headers are sent: the error can only go into the stream
            log.error("stream relay failed", exc_info=exc)
            code = grpc.StatusCode.CANCELLED  # the gateway ended the call: no failure of the backend's
            call.cancel()
            with contextlib.suppress(Exception):
                await response.write(self._encode_error(status_of(exc), sse))
        finally:
            backend.record(info, code, trial, started)
        await response.write_eof()
        return response

    async def _server_stream(
        self,
        request: web.BaseRequest,
        route: Route,
        backend: Backend,
        message: Message,
        headers: dict[str, str],
        timeout: float | None,
    ) -> web.StreamResponse:
        call, trial = backend.stream(route.method, message, self._stream_timeout(timeout))
        return await self._stream_out(request, route, backend, call, trial, headers, [])

    async def _messages(
        self, request: web.BaseRequest, route: Route, variables: dict[str, str]
    ) -> AsyncIterator[Message]:
        """The request messages of a client/bidi stream: NDJSON line by line, or a JSON array."""
        s = self.settings
        query = list(request.rel_url.query.items())
        await _send_continue(request)
        if request.content_type in NDJSON_TYPES:
            async for where, value in ndjson_values(
                request.content, s.max_request_bytes, s.max_stream_request_bytes, s.http_body_timeout_s
            ):
                yield build_request(route, variables, query, value, where)
            return
        raw = await read_body(
            request.content, request.content_length, s.max_stream_request_bytes, s.http_body_timeout_s
        )
        body = parse_json(raw) if raw.strip() else []
        items = body if isinstance(body, list) else [body]
        for i, value in enumerate(items):
            yield build_request(route, variables, query, value, f"[{i}]")

    async def _client_stream(
        self,
        request: web.BaseRequest,
        route: Route,
        variables: dict[str, str],
        headers: dict[str, str],
        timeout: float | None,
    ) -> web.StreamResponse:
        info = route.method
        messages = self._messages(request, route, variables)
        # Validate the first message before opening the call, so a bad body is a plain 400.
        try:
            first: Message | None = await anext(messages)
        except StopAsyncIteration:
            first = None
        backend = self._backend_for(route, first if first is not None else info.request_cls())
        call, trial = backend.stream(info, None, self._stream_timeout(timeout))
        bad_input: list[BaseException] = []

        async def write() -> None:
            try:
                if first is not None:
                    if not await grpcfix.write(call, first):
                        return  # the call already ended; its status is read below
                    async for message in messages:
                        if not await grpcfix.write(call, message):
                            return
                await grpcfix.done_writing(call)
            except (ServiceError, GatewayError) as exc:  # a bad line: the call must not complete
                bad_input.append(exc)
                call.cancel()
            except (ConnectionError, web.RequestPayloadError) as exc:  # the client went away, or a bad body
                bad_input.append(exc)
                call.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("reading the request stream failed")
                bad_input.append(exc)
                call.cancel()

        writer = asyncio.create_task(write())
        try:
            if info.server_streaming:
                return await self._stream_out(request, route, backend, call, trial, headers, bad_input)
            started = time.perf_counter()
            try:
                result = await call
            except grpc.RpcError as exc:
                error = BackendError.from_rpc(backend.name, exc)
                backend.record(info, grpc.StatusCode.CANCELLED if bad_input else error, trial, started)
                raise (bad_input[0] if bad_input else error) from None
            except asyncio.CancelledError:
                backend.record(info, grpc.StatusCode.CANCELLED, trial)
                if bad_input and not _task_cancelling():
                    raise bad_input[0] from None
                raise
            backend.record(info, grpc.StatusCode.OK, trial, started)
            return self._json(encode_response(result, route.response_body))
        finally:
            if not writer.done():
                writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer

    # --- CORS, internal endpoints, errors ---------------------------------------------------------
    def _origin_allowed(self, origin: str) -> bool:
        return bool(origin) and ("*" in self._cors or origin.rstrip("/") in self._cors)

    def _cors_headers(self, request: web.BaseRequest) -> dict[str, str]:
        origin = request.headers.get("Origin", "")
        if not self._cors or not self._origin_allowed(origin):
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": _CORS_EXPOSE_HEADERS,
            "Vary": "Origin",
        }

    def _preflight(self, request: web.BaseRequest, headers: dict[str, str]) -> web.Response:
        origin = request.headers.get("Origin", "")
        if not self._origin_allowed(origin):
            raise GatewayError(grpc.StatusCode.PERMISSION_DENIED, "origin not allowed", reason="CORS_ORIGIN")
        wanted = request.headers.get("Access-Control-Request-Method", "").upper()
        path = request.rel_url.raw_path
        methods = sorted({r.http_method for r in self.routes.routes if r.template.match(path) is not None})
        if wanted not in methods:
            raise _no_route(wanted, path, methods)
        return web.Response(
            status=204,
            headers={
                **headers,
                "Access-Control-Allow-Methods": ", ".join(methods),
                "Access-Control-Allow-Headers": _CORS_ALLOW_HEADERS,
                "Access-Control-Max-Age": str(self.settings.cors_max_age_s),
            },
        )

    async def _healthz(self) -> web.Response:
        return self._json(dumps({"status": "SERVING"}))

    async def _readyz(self) -> web.Response:
        health = await self.backends.health()
        required = [n for n in self.settings.required_backends if n in health]
        missing = [n for n in self.settings.required_backends if n not in health]
        ready = not missing and all(health[n] == "SERVING" for n in required)
        body = {
            "status": "SERVING" if ready else "NOT_SERVING",
            "backends": {
                name: {
                    "health": status,
                    "circuit": self.backends[name].breaker.state,
                    "required": name in required,
                }
                for name, status in health.items()
            },
        }
        return self._json(dumps(body), 200 if ready else 503)

    async def _openapi_doc(self) -> web.Response:
        return self._json(self._openapi)

    def _error_response(self, exc: BaseException, request_id: str) -> web.Response:
        if not isinstance(exc, ServiceError | BackendError):
            log.error("HTTP bridge error", exc_info=exc)
        status = status_of(exc)
        code = code_of(status)
        http_status = HTTP_STATUS.get(code, 500)
        headers: dict[str, str] = {}
        if isinstance(exc, GatewayError):
            headers.update(exc.headers)
            http_status = exc.http_status or http_status
        wait = retry_after_s(status)
        if wait is not None:
            headers["Retry-After"] = retry_after_header(wait)
        response = self._json(dumps(status_json(with_request_id(status, request_id))), http_status)
        response.headers.update(headers)
        return response


def _no_route(method: str, path: str, allowed: list[str]) -> GatewayError:
    if allowed:
        return GatewayError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method} is not allowed on {path}; allowed: {', '.join(allowed)}",
            reason="METHOD_NOT_ALLOWED",
            headers={"Allow": ", ".join(allowed)},
            http_status=405,
        )
    return GatewayError(grpc.StatusCode.NOT_FOUND, f"no API at {path}", reason="ROUTE_NOT_FOUND")


def _task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


# --- connections: client-gone handling, parse errors, header timeout ----------------------------------
_CLIENT_CLOSED = 499  # nginx's "client closed request": counted apart from the server's own failures
_LINGER_S = 2.0  # how long an unread request body is drained after the answer before the connection closes


def _log_client_gone(label: str, method: str, started: float) -> None:
    log.info(
        "client closed the connection before the answer",
        extra={
            "route": label,
            "http_method": method,
            "http_status": _CLIENT_CLOSED,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        },
    )


def _malformed_body(exc: BaseException) -> ServiceError:
    """A body the HTTP parser refused (bad chunked encoding, a length that does not match)."""
    return InvalidArgument([Violation("body", f"is not a well-formed HTTP body ({type(exc).__name__})")])


async def _send_continue(request: web.BaseRequest) -> None:
    """``Expect: 100-continue`` (curl sends it for bodies over 1 KiB): ask for the body only once the
    request is admitted, so a refused one never uploads it. (aiohttp's router does this for its
    application handlers; the bridge runs on the low-level server.)"""
    if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the final answer has not started yet


def _parse_error(exc: BaseException | None, max_header_bytes: int, max_headers: int) -> GatewayError:
    """The answer to a request the HTTP parser refused; it never repeats the request's bytes."""
    if isinstance(exc, LineTooLong):
        return GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request line or a header line is longer than the limit of {max_header_bytes} bytes",
            violations=(Violation("headers", f"each line must be at most {max_header_bytes} bytes"),),
            reason="HEADER_TOO_LARGE",
            metadata={"limit_bytes": str(max_header_bytes)},
            http_status=431,
        )
    if isinstance(exc, HttpProcessingError) and "too many headers" in str(exc.message).lower():
        return GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request has more than the limit of {max_headers} header lines",
            violations=(Violation("headers", f"at most {max_headers} header lines"),),
            reason="TOO_MANY_HEADERS",
            metadata={"limit": str(max_headers)},
            http_status=431,
        )
    if isinstance(exc, BadHttpMethod):
        # The parser knows no such method, so it has no path to list the allowed ones for; RFC 9110
        # answers an unrecognised method with 501. A known method on the wrong path gets 405 + Allow.
        return GatewayError(
            grpc.StatusCode.UNIMPLEMENTED,
            "the request method is not an HTTP method this server knows (or this is not HTTP)",
            reason="METHOD_NOT_IMPLEMENTED",
            http_status=501,
        )
    return GatewayError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request is not well-formed HTTP/1.1 ({type(exc).__name__ if exc else 'unknown'})",
        reason="MALFORMED_REQUEST",
    )


class _Connection(web.RequestHandler):
    """aiohttp's connection handler with what aiohttp 3.14 does not have (hence own code):

    - A header timeout: a request head must be complete ``header_timeout`` seconds after its first
      byte. aiohttp alone closes a connection only when it has waited ``keepalive_timeout`` since it
      opened or answered last, so a head sent a byte at a time could hold it for the whole idle timeout.
    - Errors of the HTTP parser (a header over the limit, too many headers, an unknown method, bytes
      that are not HTTP) answered as ``google.rpc.Status`` JSON and logged at INFO, instead of a
      plain-text body quoting the request and an ERROR with a traceback.

    - A body the parser finds malformed half-way (a bad chunk) ends the handler's read with an error
      (aiohttp only queues the error for after the request, so the handler would wait for its body).

    It reads three attributes of ``RequestHandler`` (``_waiter``, ``_messages``, ``_current_request``);
    aiohttp is pinned and ``tests/gateway/test_bridge_hardening.py`` covers each addition.
    """

    def __init__(self, manager: web.Server, *, bridge: Bridge, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._bridge = bridge
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def _awaiting_head(self) -> bool:
        """Waiting for the next request, none of which has arrived complete."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def data_received(self, data: bytes) -> None:
        request, queued = self._current_request, len(self._messages)
        super().data_received(data)
        if request is not None and len(self._messages) > queued and not request.content.is_eof():
            # The parser failed inside the body being read (a bad chunk): aiohttp queues the error for
            # after this request but leaves the handler waiting for the body; end that read now.
            request.content.set_exception(web.RequestPayloadError("the request body is malformed"))
        if data and self._awaiting_head():  # a head has started but is not complete
            if self._head_timer is None:
                self._head_timer = asyncio.get_running_loop().call_later(
                    self._header_timeout, self._head_timed_out
                )
        elif self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is not None and self._awaiting_head():
            log.info(
                "closed a connection whose request head did not arrive in time",
                extra={"timeout_s": self._header_timeout},
            )
            self._bridge._observe("incomplete_head", 408, time.perf_counter())
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: the answer has started, only closing is left
            raise ConnectionError("the response has started; the connection is closed")
        request_id = uuid.uuid4().hex
        if isinstance(exc, HttpProcessingError):
            s = self._bridge.settings
            error = _parse_error(exc, s.http_max_header_bytes, s.http_max_headers)
            log.info(
                "refused a malformed HTTP request",
                extra={
                    "reason": error.reason,
                    "http_status": error.http_status or 400,
                    "error": type(exc).__name__,
                },
            )
            label = "malformed"
        else:  # the handler failed outside dispatch's own error handling: a bug
            log.error("HTTP bridge error outside a handler", exc_info=exc)
            error = GatewayError(grpc.StatusCode.INTERNAL, "internal error")
            label = "unhandled"
        http_status = error.http_status or HTTP_STATUS.get(error.code, 400)
        self._bridge._observe(label, http_status, time.perf_counter())
        response = web.Response(
            body=dumps(status_json(with_request_id(error.to_status(), request_id))),
            status=http_status,
            content_type="application/json",
            charset="utf-8",
            headers={"X-Request-Id": request_id, "Server": "cbec-gateway"},
        )
        response.force_close()
        return response


class _Server(web.Server):
    """``web.Server`` making ``_Connection``s (it makes plain ``RequestHandler``s)."""

    def __init__(self, handler: Any, *, bridge: Bridge, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._bridge = bridge
        self._header_timeout = header_timeout

    def __call__(self) -> _Connection:
        return _Connection(
            self, bridge=self._bridge, header_timeout=self._header_timeout, loop=self._loop, **self._kwargs
        )
