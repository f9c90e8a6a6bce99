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
- ``grpc-timeout`` (e.g. ``500m``) sets the call's deadline; otherwise ``CBEC_DEFAULT_DEADLINE_S``.
- ``/healthz`` liveness, ``/readyz`` the backends' gRPC health, ``/openapi.json`` the API document.
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
from aiohttp import web
from google.protobuf.message import Message

from services.runtime.errors import ServiceError
from services.runtime.logs import request_id_var

from . import grpcfix
from .auth import API_KEY_HEADER, Authenticator, principal_var
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

log = logging.getLogger("cbec.gateway.http")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
LocalHandler = Callable[[Any, float | None], Awaitable[Message]]
_CORS_ALLOW_HEADERS = "authorization, content-type, x-api-key, x-request-id, grpc-timeout, accept"
_CORS_EXPOSE_HEADERS = "x-request-id, retry-after, www-authenticate"


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
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.backends = backends
        self.local = local
        self.auth = auth
        self.metrics = metrics
        self._openapi = dumps(openapi)
        self._cors = settings.cors_origin_list
        self._in_flight = 0
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._internal: dict[str, Callable[[], Awaitable[web.StreamResponse]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/openapi.json": self._openapi_doc,
        }
        self._route_metrics: dict[str, tuple[Any, dict[int, Any]]] = {}

    # --- server lifecycle -------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_request_bytes)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self.dispatch)  # newlines too
        return app

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
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=s.grace_period_s)
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
    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        supplied = request.headers.get("X-Request-Id", "")
        request_id = supplied if _REQUEST_ID_RE.match(supplied) else uuid.uuid4().hex
        request_id_var.set(request_id)
        principal_var.set(None)
        headers = {"X-Request-Id": request_id, "Server": "cbec-gateway", **self._cors_headers(request)}
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
            else:
                route, variables, allowed = self.routes.match(request.method, path)
                if route is None:
                    raise _no_route(request.method, path, allowed)
                label = route.label
                response = await self._call(request, route, variables, headers)
        except asyncio.CancelledError:
            self._observe(label, 499, started)
            raise
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
        entry = self._route_metrics.get(label)
        if entry is None:
            entry = self._route_metrics[label] = (self.metrics.http_seconds.labels(label), {})
        entry[0].observe(time.perf_counter() - started)
        counter = entry[1].get(status)
        if counter is None:
            counter = entry[1][status] = self.metrics.http_requests.labels(label, str(status))
        counter.inc()

    async def _call(
        self, request: web.Request, route: Route, variables: dict[str, str], headers: dict[str, str]
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
            limit = self.settings.max_request_bytes
            raw = await read_body(request.content, request.content_length, limit) if route.body else b""
            body = parse_json(raw) if raw.strip() else None
            message = build_request(route, variables, request.rel_url.query.items(), body)
            if info.local:
                handler = self.local.get(info.key)
                if handler is None:
                    raise GatewayError(
                        grpc.StatusCode.UNIMPLEMENTED, f"{info.key} is not served by this gateway"
                    )
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
    def _wants_sse(request: web.Request) -> bool:
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
        request: web.Request,
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
            backend.record(info, grpc.StatusCode.CANCELLED if bad_input else error.code, trial, started)
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
        code = grpc.StatusCode.OK
        try:
            await response.prepare(request)
            item = first
            while item is not grpc.aio.EOF:
                await response.write(self._encode_item(item, route, sse))
                item = await call.read()
        except grpc.RpcError as exc:
            error = BackendError.from_rpc(backend.name, exc)
            code = error.code
            status = bad_input[0] if bad_input else error
            await response.write(self._encode_error(status_of(status), sse))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            call.cancel()
            if bad_input and not _task_cancelling():
                await response.write(self._encode_error(status_of(bad_input[0]), sse))
            else:
                raise
        except (ConnectionResetError, ConnectionError):  # the client went away
            code = grpc.StatusCode.CANCELLED
            call.cancel()
            return response
        except GatewayError as exc:  # a response with no JSON form
            code = exc.code
            call.cancel()
            await response.write(self._encode_error(exc.to_status(), sse))
        except Exception as exc:  # headers are sent: the error can only go into the stream
            log.error("stream relay failed", exc_info=exc)
            code = grpc.StatusCode.INTERNAL
            call.cancel()
            with contextlib.suppress(Exception):
                await response.write(self._encode_error(status_of(exc), sse))
        finally:
            backend.record(info, code, trial, started)
        await response.write_eof()
        return response

    async def _server_stream(
        self,
        request: web.Request,
        route: Route,
        backend: Backend,
        message: Message,
        headers: dict[str, str],
        timeout: float | None,
    ) -> web.StreamResponse:
        call, trial = backend.stream(route.method, message, self._stream_timeout(timeout))
        return await self._stream_out(request, route, backend, call, trial, headers, [])

    async def _messages(
        self, request: web.Request, route: Route, variables: dict[str, str]
    ) -> AsyncIterator[Message]:
        """The request messages of a client/bidi stream: NDJSON line by line, or a JSON array."""
        s = self.settings
        query = list(request.rel_url.query.items())
        if request.content_type in NDJSON_TYPES:
            async for where, value in ndjson_values(
                request.content, s.max_request_bytes, s.max_stream_request_bytes
            ):
                yield build_request(route, variables, query, value, where)
            return
        raw = await read_body(request.content, request.content_length, s.max_stream_request_bytes)
        body = parse_json(raw) if raw.strip() else []
        items = body if isinstance(body, list) else [body]
        for i, value in enumerate(items):
            yield build_request(route, variables, query, value, f"[{i}]")

    async def _client_stream(
        self,
        request: web.Request,
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
                backend.record(info, grpc.StatusCode.CANCELLED if bad_input else error.code, trial, started)
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

    def _cors_headers(self, request: web.Request) -> dict[str, str]:
        origin = request.headers.get("Origin", "")
        if not self._cors or not self._origin_allowed(origin):
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": _CORS_EXPOSE_HEADERS,
            "Vary": "Origin",
        }

    def _preflight(self, request: web.Request, headers: dict[str, str]) -> web.Response:
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
