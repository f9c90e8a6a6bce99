"""Server bootstrap: one ``grpc.aio`` server per service with everything the runtime owns.

A service provides a ``Service`` (its servicers and, optionally, a model slot); ``Server`` adds
health (NOT_SERVING until the model is loaded, SERVING after, NOT_SERVING while draining),
reflection, the model-admin API, the interceptor, metrics on their own port, and graceful
shutdown: on SIGTERM it stops taking calls, lets those in flight finish within the grace period,
and exits 0. SIGHUP reloads the newest valid model version.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from cbec.common.v1 import common_pb2, common_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .access import AccessPolicy
from .admin import ModelAdminServicer
from .batching import BatcherConfig, MicroBatcher
from .config import ConfigError, RuntimeSettings, load_settings
from .device import Device, DeviceError, select_device
from .errors import ServiceError
from .interceptor import RuntimeInterceptor
from .logs import configure_logging
from .metrics import RuntimeMetrics
from .model_store import Loaded, Manifest, ModelLoadError, ModelSlot, ModelStore
from .state import (
    Database,
    PostgresDatabase,
    StateConfig,
    StateConfigError,
    StoreUnavailable,
    open_database,
    redis_client,
)
from .tracing import Tracing

log = logging.getLogger("cbec.server")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ADMIN_SERVICE = common_pb2.DESCRIPTOR.services_by_name["ModelAdminService"].full_name

S = TypeVar("S", bound=RuntimeSettings)
M = TypeVar("M")


@dataclass
class Runtime:
    """What the runtime hands a service when it is built."""

    settings: RuntimeSettings
    metrics: RuntimeMetrics
    device: Device
    store: ModelStore
    health: health.aio.HealthServicer = field(default_factory=health.aio.HealthServicer)
    batchers: list[MicroBatcher[Any, Any]] = field(default_factory=list)
    #: (health name, check) of every store the service opened; checked every CBEC_STATE_CHECK_S.
    store_checks: list[tuple[str, Callable[[], Any], bool]] = field(default_factory=list)
    databases: list[Database] = field(default_factory=list)
    redis_clients: list[Any] = field(default_factory=list)
    #: The service's OpenTelemetry tracer (None: tracing off), for spans of its own (the HTTP bridge).
    tracer: Any = None

    @property
    def state(self) -> StateConfig:
        return StateConfig.from_settings(self.settings)

    def database(self, name: str, synchronous: str = "FULL") -> Database:
        """The service's store ``name`` (embedded SQLite file or the shared PostgreSQL), health-checked
        under ``<service>.<name>`` and closed by the runtime at shutdown."""
        db = open_database(self.state, name, synchronous)
        self.databases.append(db)
        self.watch_store(name, db.check)
        return db

    def redis(self, asyncio: bool = False) -> Any:
        """The shared Redis client (shared backend only), health-checked under ``<service>.redis`` and
        closed by the runtime at shutdown."""
        client = redis_client(self.state, asyncio=asyncio)
        self.redis_clients.append(client)
        self.watch_store("redis", client.ping, on_loop=asyncio)
        return client

    def watch_store(self, name: str, check: Callable[[], Any], on_loop: bool = False) -> None:
        """Run ``check()`` every CBEC_STATE_CHECK_S: a blocking call in a thread, or (``on_loop``) a
        call returning an awaitable, awaited on the server's loop (asyncio clients)."""
        self.store_checks.append((f"{self.settings.service}.{name}", check, on_loop))

    async def set_health(self, name: str, serving: bool) -> None:
        """Report a component's state under its own health name (e.g. ``cbec.risk.v1.RiskService.rates``).

        Probes check the server's overall status (""), so a degraded component is visible to
        clients and SREs without taking the pod out of service.
        """
        await self.health.set(name, SERVING if serving else NOT_SERVING)

    def batcher(
        self, fn: Callable[[list[Any]], Sequence[Any]], name: str, **overrides: Any
    ) -> MicroBatcher[Any, Any]:
        """A micro-batcher configured from ``CBEC_BATCH_*``; closed by the runtime at shutdown."""
        s = self.settings
        config = BatcherConfig(
            max_batch_size=s.batch_max_size,
            max_delay_s=s.batch_max_delay_ms / 1000,
            max_queue=s.batch_queue_size,
            name=name,
        )
        for key, value in overrides.items():
            setattr(config, key, value)
        batcher: MicroBatcher[Any, Any] = MicroBatcher(fn, config, self.metrics)
        self.batchers.append(batcher)
        return batcher

    def model_slot(self, loader: Callable[[Any, Manifest], M]) -> ModelSlot[M]:
        return ModelSlot(self.store, loader, self.metrics)


class Service(Protocol):
    """What a service supplies: its servicers and, if it has one, its model slot."""

    #: Full proto service names, e.g. ("cbec.risk.v1.RiskService",).
    service_names: Sequence[str]
    #: The model this service serves; None for model-free services (the gateway).
    slot: ModelSlot[Any] | None

    def register(self, server: grpc.aio.Server) -> None: ...

    # Optional: ``authenticates_callers = True`` for a service that checks its own callers (the
    # gateway): the internal-token check is then off, and its
    # ``async admit_call(grpc_service, grpc_method, context)`` runs instead, before the request is read.

    async def start(self) -> None:
        """Warm up after the model is loaded (or at once for model-free services)."""

    async def stop(self) -> None:
        """Release resources after the last call has finished."""


class Server:
    def __init__(self, settings: RuntimeSettings, build: Callable[[Runtime], Service]) -> None:
        self.settings = settings
        self.metrics = RuntimeMetrics(settings.service)
        self.device = select_device(settings.device)
        self.tracing = Tracing.from_settings(settings)
        self.runtime = Runtime(
            settings,
            self.metrics,
            self.device,
            ModelStore(settings.models_dir, settings.service),
            tracer=self.tracing.tracer,
        )
        self.health = self.runtime.health
        self.service = build(self.runtime)
        access = AccessPolicy.from_settings(
            settings, enforce=not getattr(self.service, "authenticates_callers", False)
        )
        self.interceptor = RuntimeInterceptor(
            self.metrics,
            settings.max_concurrent_calls,
            settings.access_log,
            access,
            getattr(self.service, "admit_call", None),
            tracer=self.tracing.tracer,
        )
        self.grpc_port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics_server: Any = None
        self._stopped = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._started_service = False
        self.pins: ModelPins | None = None
        self._followers: set[asyncio.Task[None]] = set()
        self._follow_lock = asyncio.Lock()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._health_names = ("", *self.service.service_names)

    @property
    def ready(self) -> bool:
        return self.service.slot is None or self.service.slot.current is not None

    async def _set_health(self, status: int) -> None:
        for name in self._health_names:
            await self.health.set(name, status)

    async def start(self) -> None:
        s = self.settings
        self._loop = asyncio.get_running_loop()
        options = [
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            # Clients keep HTTP/2 connections for ever and resolve a headless Service's pods only when
            # one drops: ageing connections out lets new replicas from a scale-out receive calls.
            ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(s.grace_period_s * 1000) + 5_000),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(interceptors=[self.interceptor], options=options)
        self.service.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [*self.service.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        if self.service.slot is not None:
            common_pb2_grpc.add_ModelAdminServiceServicer_to_server(
                ModelAdminServicer(self.service.slot, self.admin_switch), server
            )
            names.append(ADMIN_SERVICE)
        reflection.enable_server_reflection(names, server)
        await self._set_health(NOT_SERVING)
        try:
            address = f"{s.host}:{s.grpc_port}"
            credentials = server_credentials(s)
            if credentials is None:
                self.grpc_port = server.add_insecure_port(address)
            else:
                self.grpc_port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot bind gRPC port {s.host}:{s.grpc_port}: {exc}") from None
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC port {s.host}:{s.grpc_port}")
        if s.metrics_enabled:
            self._metrics_server, self.metrics_port = self.metrics.serve(
                s.metrics_host or s.host, s.metrics_port
            )
        await server.start()
        self._server = server
        log.info(
            "listening",
            extra={
                "grpc_port": self.grpc_port,
                "metrics_port": self.metrics_port,
                "device": str(self.device),
            },
        )
        if s.state_backend == "shared" and s.database_url and self.service.slot is not None:
            self.pins = ModelPins(self.runtime.state, s.service)
            self.pins.listen(self._on_pin_changed)
        await self.load_model()
        if not self.ready:
            self._background.append(asyncio.create_task(self._retry_load()))
        if self.runtime.store_checks:
            self._background.append(asyncio.create_task(self._check_stores()))
        if s.model_poll_s > 0 and self.service.slot is not None and not s.model_version:
            current = self.service.slot.current
            seen = current.manifest.version if current is not None else None
            self._background.append(asyncio.create_task(self._poll_models(seen)))

    async def check_stores(self) -> dict[str, bool]:
        """Health of every store: a store that is down is NOT_SERVING under its own name, so the parts
        that need it fail fast with UNAVAILABLE while the rest of the service keeps serving."""
        states: dict[str, bool] = {}
        timeout = self.settings.state_timeout_s * 2
        for name, check, on_loop in self.runtime.store_checks:
            try:
                await asyncio.wait_for(check() if on_loop else asyncio.to_thread(check), timeout)
                states[name] = True
            except Exception as exc:
                states[name] = False
                log.warning("store down", extra={"store": name, "error": str(exc)[:200]})
            await self.runtime.set_health(name, states[name])
        return states

    async def _retry_load(self, period_s: float = 5.0) -> None:
        """No model could be loaded at start (none written yet, or a store it needs was down): keep
        trying, so the pod becomes ready when the cause goes away instead of waiting for a restart."""
        while not self.ready:
            await asyncio.sleep(period_s)
            await self.load_model()

    async def _check_stores(self) -> None:
        while True:
            await self.check_stores()
            await asyncio.sleep(self.settings.state_check_s)

    async def _poll_models(self, seen: str | None) -> None:
        """Load a version that appeared in the model store since the last look (a training job wrote
        it). Only a new arrival switches: a roll-back through the admin API stays in place."""
        slot = self.service.slot
        assert slot is not None
        while True:
            await asyncio.sleep(self.settings.model_poll_s)
            try:
                newest = await asyncio.to_thread(self.runtime.store.newest_valid)
                if newest is None or newest.version == seen:
                    continue
                if await self.pinned_version():  # a roll-out chose a version: arrivals wait for un-pinning
                    continue
                seen = newest.version
                current = slot.current
                if current is None or newest.version > current.manifest.version:
                    log.info("new model version found", extra={"version": newest.version})
                    await self.switch_model(newest.version)
            except ModelLoadError as exc:
                log.error("new model version failed to load: %s", exc)
            except Exception:
                log.exception("model poll failed")

    async def admin_switch(self, version: str | None) -> Loaded[Any] | None:
        """``LoadModelVersion``: switch here, then (shared backend) record the choice so every replica,
        and every replica started later, serves it. An empty version un-pins: newest valid.

        A version pinned in the deployment (CBEC_MODEL_VERSION, the chart's ``modelVersion``) wins over
        the shared choice on every replica, so with the shared backend the call is refused instead of
        switching only the replica that took it."""
        if self.pins is not None and self.settings.model_version:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.settings.service} is pinned to {self.settings.model_version} by CBEC_MODEL_VERSION "
                "(the chart's modelVersion): change that value to roll out another version",
            )
        loaded = await self.switch_model(version)
        if self.pins is not None:
            try:
                await asyncio.to_thread(self.pins.set, version or "")
            except StoreUnavailable as exc:
                raise StoreUnavailable(
                    "runtime",
                    f"switched on this replica only, the choice could not be shared ({exc.message}); retry",
                ) from exc
        return loaded

    async def pinned_version(self) -> str | None:
        """The version to serve: CBEC_MODEL_VERSION, else the shared pin, else None (newest valid)."""
        if self.settings.model_version:
            return self.settings.model_version
        if self.pins is None:
            return None
        try:
            return await asyncio.to_thread(self.pins.get) or None
        except Exception as exc:  # the store being down must not stop a model from loading
            log.warning("model pin unreadable, loading the newest version", extra={"error": str(exc)[:200]})
            return None

    def _on_pin_changed(self, payload: str | None) -> None:
        """A replica's admin call changed the shared choice (or the listener reconnected: re-check)."""
        loop = self._loop
        if loop is None or (payload is not None and payload != self.settings.service):
            return

        def follow() -> None:
            if not self._started_service or self._stopping:  # starting (start() loads it) or draining
                return
            task = loop.create_task(self._follow_pin())
            self._followers.add(task)
            task.add_done_callback(self._followers.discard)

        loop.call_soon_threadsafe(follow)

    async def _follow_pin(self) -> None:
        async with self._follow_lock:  # one at a time, each reading the newest choice
            await self._follow_pin_now()

    async def _follow_pin_now(self) -> None:
        version = await self.pinned_version()
        current = self.service.slot.current if self.service.slot is not None else None
        if version is None:
            newest = await asyncio.to_thread(self.runtime.store.newest_valid)
            version = newest.version if newest is not None else None
        if version is None or (current is not None and current.manifest.version == version):
            return
        log.info("following the shared model choice", extra={"version": version})
        await self.load_model(version)

    async def load_model(self, version: str | None = None) -> None:
        """Load the model at start (or on SIGHUP); without one the server stays up, NOT_SERVING."""
        if version is None:
            version = await self.pinned_version()
        try:
            await self.switch_model(version or None)
        except ModelLoadError as exc:
            log.error("no model loaded: %s", exc)
            if not self.ready:
                self.metrics.set_model_version(None)

    async def switch_model(self, version: str | None) -> Loaded[Any] | None:
        """Load a model version (newest valid when None) and report SERVING once one is loaded.

        Raises ModelLoadError, leaving the previous version serving.
        """
        loaded = await self.service.slot.load(version) if self.service.slot is not None else None
        if not self._started_service:
            await self.service.start()
            self._started_service = True
        await self._set_health(SERVING)
        log.info("serving")
        return loaded

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, finish calls in flight within the grace period."""
        if self._server is None:
            return
        grace = self.settings.grace_period_s if grace is None else grace
        log.info("draining", extra={"grace_s": grace, "in_flight": self.interceptor.in_flight})
        self._stopping = True
        await self._set_health(NOT_SERVING)
        for task in [*self._background, *self._followers]:
            task.cancel()
        await self._server.stop(grace)
        for batcher in self.runtime.batchers:
            await batcher.close()
        await self.service.stop()
        for db in self.runtime.databases:
            await asyncio.to_thread(db.close)
        if self.pins is not None:
            await asyncio.to_thread(self.pins.close)
        for client in self.runtime.redis_clients:
            with contextlib.suppress(Exception):
                closing = client.aclose() if hasattr(client, "aclose") else client.close()
                if inspect.isawaitable(closing):
                    await closing
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        await asyncio.to_thread(self.tracing.shutdown)  # export the spans still queued
        self._server = None
        self._stopped.set()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


class ModelPins:
    """The model version an operator chose through the admin API, shared by every replica (PostgreSQL
    row + NOTIFY), so one ``LoadModelVersion`` call rolls out to all replicas of a service and survives
    restarts, without patching the Helm-managed Deployment."""

    CHANNEL = "runtime_model_pins"
    MIGRATIONS = [
        "CREATE TABLE runtime_model_pins "
        "(service TEXT PRIMARY KEY, version TEXT NOT NULL, set_at REAL NOT NULL)"
    ]

    def __init__(self, config: StateConfig, service: str) -> None:
        self.service = service
        self.db = PostgresDatabase(
            config.database_url,
            config.database_password,
            name="runtime",
            max_size=2,
            timeout_s=config.timeout_s,
            application_name=f"cbec-{service}-runtime",
        )
        self._migrated = False

    def _ready(self) -> None:
        if not self._migrated:
            self.db.migrate("runtime", self.MIGRATIONS, wait_s=0)  # callers fall back at once
            self._migrated = True

    def get(self) -> str:
        self._ready()
        return str(
            self.db.scalar("SELECT version FROM runtime_model_pins WHERE service = ?", (self.service,)) or ""
        )

    def set(self, version: str) -> None:
        self._ready()
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO runtime_model_pins (service, version, set_at) VALUES (?, ?, ?) "
                "ON CONFLICT (service) DO UPDATE SET version = excluded.version, set_at = excluded.set_at",
                (self.service, version, time.time()),
            )
            tx.notify(self.CHANNEL, self.service)

    def listen(self, callback: Callable[[str | None], None]) -> None:
        self.db.listen(self.CHANNEL, callback)

    def close(self) -> None:
        self.db.close()


class CertificateFiles:
    """The server's certificate, key and client CA, re-read when a file changes.

    cert-manager renews a certificate by rewriting the mounted Secret (the kubelet swaps the files
    atomically); gRPC asks ``fetch`` before each new handshake, so new connections get the renewed
    certificate without a restart while established ones keep theirs. A half-written or unreadable
    set keeps the one in use (``fetch`` returns None: no change) and is logged once per change.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.paths = (cert, key, client_ca)
        self._stamp = self._read_stamp()
        self.current = self._config()

    def _read_stamp(self) -> tuple[tuple[int, int], ...]:
        return tuple(
            (p.stat().st_mtime_ns, p.stat().st_size) if p is not None else (0, 0) for p in self.paths
        )

    def _config(self) -> grpc.ServerCertificateConfiguration:
        cert, key, client_ca = self.paths
        return grpc.ssl_server_certificate_configuration(
            [(key.read_bytes(), cert.read_bytes())],
            root_certificates=client_ca.read_bytes() if client_ca is not None else None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self._read_stamp()
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            config = self._config()
        except (OSError, ValueError) as exc:
            log.error("cannot re-read the TLS files, keeping the current certificate: %s", exc)
            return None
        log.info("TLS certificate files changed: new connections use them")
        self.current = config
        return config


def server_credentials(settings: RuntimeSettings) -> grpc.ServerCredentials | None:
    """TLS when a certificate is configured; mutual TLS when a client CA is configured too. The files
    are followed (``CertificateFiles``): a renewed certificate needs no restart."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    files = CertificateFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    return grpc.dynamic_ssl_server_credentials(
        files.current, files.fetch, require_client_authentication=settings.tls_client_ca_file is not None
    )


async def serve(settings: RuntimeSettings, build: Callable[[Runtime], Service]) -> None:
    """Run until SIGTERM/SIGINT, then drain and return."""
    server = Server(settings, build)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(server.load_model())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    start = loop.create_task(server.start())
    stop_wait = loop.create_task(stop.wait())
    await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if start.done() and start.exception() is not None:
        stop_wait.cancel()
        raise start.exception()  # type: ignore[misc]
    await stop.wait()
    if not start.done():  # SIGTERM while the model was still loading
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start
    await server.stop()


def main(service: str, build: Callable[[Runtime], Service], settings_cls: type[S] = RuntimeSettings) -> None:  # type: ignore[assignment]
    """Entry point of ``python -m services.<name>``: settings, logs, serve, exit 0 after a drain."""
    try:
        settings = load_settings(settings_cls, service)
    except ConfigError as exc:
        sys.exit(exc.code)
    configure_logging(service, settings.log_level)
    try:
        asyncio.run(serve(settings, build))
    except StateConfigError as exc:
        log.error("invalid state configuration: %s", exc)
        print(f"invalid configuration: {exc}", file=sys.stderr)
        sys.exit(2)
    except DeviceError as exc:
        log.error("invalid device: %s", exc)
        print(f"invalid configuration: CBEC_DEVICE={settings.device!r}: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(1)
