"""The gateway as a runtime service: GatewayService on the gRPC port, the HTTP bridge beside it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from cbec.gateway.v1 import gateway_pb2_grpc

from services.runtime.server import Runtime

from .aggregator import GATEWAY_SERVICE, Aggregator, GatewayServicer
from .auth import Authenticator, admit_grpc_call
from .backends import BackendPool
from .bridge import Bridge
from .config import GatewaySettings
from .descriptors import RouteTable
from .metrics import GatewayMetrics
from .openapi import build_openapi

log = logging.getLogger("cbec.gateway")


class Gateway:
    """``Service`` for ``services.runtime.server.Server``: no model, so SERVING as soon as it starts.

    The gateway starts whether or not its backends are up: their channels connect lazily and
    reconnect on their own, aggregations report the parts they could not get, and ``/readyz`` shows
    each backend's health.
    """

    service_names: Sequence[str] = (GATEWAY_SERVICE,)
    slot = None
    #: Its callers are end users with API keys or JWTs (``admit_call``), not holders of the internal token.
    authenticates_callers = True

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        if not isinstance(settings, GatewaySettings):
            settings = GatewaySettings(**settings.model_dump())
        self.settings = settings
        self.routes = RouteTable.load()
        self.metrics = GatewayMetrics(runtime.metrics.registry)
        self.backends = BackendPool(settings, self.routes, self.metrics)
        # Shared backend: per-principal buckets in Redis, so the rate limit holds across gateway replicas.
        redis = None
        if settings.state_backend == "shared":
            redis = runtime.redis(asyncio=True)
            runtime.redis()  # a blocking client for the runtime's health check (gateway.redis)
        self.auth = Authenticator(settings, self.metrics, redis=redis)
        self.aggregator = Aggregator(settings, self.routes, self.backends, self.metrics)
        self.servicer = GatewayServicer(self.aggregator)
        self.openapi = build_openapi(self.routes, sorted(self.backends.backends))
        self.bridge = Bridge(
            settings,
            self.routes,
            self.backends,
            self.aggregator.handlers(),
            self.auth,
            self.metrics,
            self.openapi,
            tracer=runtime.tracer,  # the HTTP request's span (services/runtime/tracing.py)
        )

    @property
    def http_port(self) -> int:
        return self.bridge.port

    async def admit_call(self, service: str, method: str, context: grpc.aio.ServicerContext) -> None:
        """The runtime's admission hook: API key or JWT, scope and rate limit, before the request is read."""
        await admit_grpc_call(self.auth, self._scope_of, service, method, context)

    def _scope_of(self, grpc_method: str) -> str | None:
        info = self.routes.methods.get(grpc_method.lstrip("/"))
        return info.scope if info is not None else None  # e.g. reflection: any valid credential

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        await self.backends.open()
        await self.bridge.start()
        log.info(
            "gateway up",
            extra={
                "http_port": self.bridge.port,
                "backends": {name: b.address for name, b in self.backends.backends.items()},
            },
        )

    async def stop(self) -> None:
        await self.bridge.stop()
        await self.backends.close()
        await self.auth.close()
