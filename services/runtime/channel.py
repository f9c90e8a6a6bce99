"""The one way a service opens a channel to another: the gateway to its backends, chat to sentiment, the
health probe, the demo loader.

``client_channel(target, settings, services)`` returns a ``grpc.aio`` channel with

- TLS, or mutual TLS with a client certificate, per ``CBEC_BACKEND_TLS_*`` (plaintext without a CA);
- keepalive, a reconnect backoff capped by ``CBEC_RECONNECT_MAX_BACKOFF_S`` (gRPC's default grows to
  two minutes, so a restarted service would wait that long to be used again) and message-size limits;
- a service config: ``round_robin`` over every address the target resolves to (a headless Service
  resolves to every pod; the default pick_first would send every call to one), and a ``retryPolicy``
  for the unary methods of ``services`` whose proto declares ``idempotency_level`` IDEMPOTENT or
  NO_SIDE_EFFECTS, read from the descriptors, so the contract and the retries cannot drift. It retries
  UNAVAILABLE and RESOURCE_EXHAUSTED (a shed call was never computed, and round robin may send the retry
  to another replica) with exponential backoff inside the caller's deadline; ``retryThrottling`` is the
  retry budget (once more than half its tokens are gone gRPC stops retrying until successes refill it),
  so a dead service is not hammered by retries;
- on every outgoing call, the request id (``x-request-id``) of the call being served, or a new one
  outside a call (a call that sets the header itself keeps its own), and the trace context
  (``traceparent``, with a CLIENT span when the trace is sampled: ``tracing.outgoing``).

Both are added by a thin wrapper around the channel's callables (``RuntimeChannel``) rather than by
``grpc.aio`` client interceptors: an intercepted call is a different
call object (its writes go through a queue and a task), which costs a task per call and defeats
``gateway.grpcfix``, which needs the plain call; the wrapper covers all four call kinds at no task.
The circuit breaker (``breaker.py``) sits above the channel, because what counts as a failure depends
on the caller (``circuit_breaker`` makes one from the settings).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool

from . import tracing
from .breaker import CircuitBreaker
from .errors import REQUEST_ID_KEY
from .logs import request_id_var

if TYPE_CHECKING:  # settings (pydantic) load only when asked for: the probe, run by the kubelet
    # every few seconds in every pod, needs none of it
    from .config import RuntimeSettings

#: Idempotency levels whose methods may be retried.
RETRYABLE_LEVELS = frozenset(
    {descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, descriptor_pb2.MethodOptions.IDEMPOTENT}
)
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")


@dataclass(frozen=True)
class ClientTLS:
    """TLS to a server: the CA that signed its certificate, optionally a client certificate (mutual
    TLS), and the name to check on the server's certificate (empty: the target's host)."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str = ""

    @classmethod
    def from_files(
        cls, ca: Path, cert: Path | None = None, key: Path | None = None, server_name: str = ""
    ) -> ClientTLS:
        return cls(
            ca.read_bytes(),
            cert.read_bytes() if cert else None,
            key.read_bytes() if key else None,
            server_name,
        )

    @classmethod
    def from_settings(cls, settings: RuntimeSettings) -> ClientTLS | None:
        """``CBEC_BACKEND_TLS_*``: None (plaintext) without a CA file."""
        if settings.backend_tls_ca_file is None:
            return None
        return cls.from_files(
            settings.backend_tls_ca_file,
            settings.backend_tls_cert_file,
            settings.backend_tls_key_file,
            settings.backend_tls_server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def channel_credentials(settings: RuntimeSettings) -> grpc.ChannelCredentials | None:
    """TLS to other services when ``CBEC_BACKEND_TLS_CA_FILE`` is set; mutual TLS with a client cert too."""
    tls = ClientTLS.from_settings(settings)
    return tls.credentials() if tls is not None else None


def retryable_methods(services: Iterable[str]) -> list[dict[str, str]]:
    """The unary methods of ``services`` (full proto names) that their proto declares IDEMPOTENT or
    NO_SIDE_EFFECTS, as service-config names. Their ``_pb2`` modules must be imported (the descriptors
    are read from the default pool); ValueError naming a service that is not."""
    pool = descriptor_pool.Default()
    names = []
    for name in sorted(set(services)):
        try:
            service = pool.FindServiceByName(name)
        except KeyError:
            raise ValueError(f"unknown proto service {name!r}: import its _pb2 module first") from None
        for method in service.methods:
            if method.client_streaming or method.server_streaming:
                continue  # gRPC retries a stream only until its first response: not worth the buffer
            if method.GetOptions().idempotency_level in RETRYABLE_LEVELS:
                names.append({"service": service.full_name, "method": method.name})
    return names


def service_config(settings: RuntimeSettings, services: Iterable[str] = ()) -> dict[str, Any]:
    """The channel's service config: round robin; retryPolicy for the retryable methods of ``services``
    and retryThrottling, unless ``CBEC_RETRY_MAX_ATTEMPTS=1``."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    names = retryable_methods(services)
    if names and settings.retry_max_attempts > 1:
        config["methodConfig"] = [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": settings.retry_max_attempts,
                    "initialBackoff": f"{settings.retry_initial_backoff_s}s",
                    "maxBackoff": f"{settings.retry_max_backoff_s}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": list(RETRYABLE_CODES),
                },
            }
        ]
        config["retryThrottling"] = {
            "maxTokens": settings.retry_throttle_max_tokens,
            "tokenRatio": settings.retry_throttle_token_ratio,
        }
    return config


def channel_options(
    settings: RuntimeSettings, services: Iterable[str] = (), max_message_bytes: int | None = None
) -> list[tuple[str, Any]]:
    """gRPC channel arguments: service config, message sizes, keepalive, reconnect backoff."""
    size = max_message_bytes or settings.max_message_bytes
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config(settings, services))),
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", int(settings.reconnect_max_backoff_s * 1000)),
        ("grpc.per_rpc_retry_buffer_size", min(size, 4 * 1024 * 1024)),
    ]


def client_channel(
    target: str,
    settings: RuntimeSettings | None = None,
    services: Sequence[str] = (),
    *,
    tls: ClientTLS | None = None,
    max_message_bytes: int | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> RuntimeChannel:
    """A channel to another service (see the module docstring).

    ``settings``: the calling service's (None: the runtime's defaults, no TLS); ``services``: the full
    names of the proto services it will call, for the retry policy; ``tls`` replaces the settings' TLS
    (the probe's command line); ``options`` add or replace channel arguments."""
    s = settings if settings is not None else _defaults()
    merged = dict(channel_options(s, services, max_message_bytes))
    tls = tls if tls is not None else ClientTLS.from_settings(s)
    if tls is not None and tls.server_name:
        merged["grpc.ssl_target_name_override"] = tls.server_name
    merged.update(options)
    args = list(merged.items())
    if tls is None:
        inner = grpc.aio.insecure_channel(target, options=args)
    else:
        inner = grpc.aio.secure_channel(target, tls.credentials(), options=args)
    return RuntimeChannel(inner)


def circuit_breaker(
    name: str, settings: RuntimeSettings | None = None, on_change: Callable[[str, str], None] | None = None
) -> CircuitBreaker:
    """The breaker for calls to ``name``, per ``CBEC_BREAKER_*`` (rules in ``breaker.py``)."""
    settings = settings if settings is not None else _defaults()
    return CircuitBreaker(
        name,
        settings.breaker_failure_threshold,
        settings.breaker_open_s,
        on_change=on_change,
        min_principals=settings.breaker_min_principals,
    )


def current_request_id() -> str:
    """The request id of the call being served, or a new one outside a call."""
    return request_id_var.get() or os.urandom(16).hex()


def with_request_id(metadata: Any) -> Any:
    """``metadata`` (None, pairs or ``grpc.aio.Metadata``) with ``x-request-id`` unless it has one."""
    if metadata is None:
        return ((REQUEST_ID_KEY, current_request_id()),)
    if isinstance(metadata, grpc.aio.Metadata):
        if REQUEST_ID_KEY not in metadata:
            metadata = grpc.aio.Metadata(*metadata, (REQUEST_ID_KEY, current_request_id()))
        return metadata
    for key, _ in metadata:
        if key == REQUEST_ID_KEY:
            return metadata
    return (*metadata, (REQUEST_ID_KEY, current_request_id()))


class _Propagating:
    """A multicallable that adds the request id and trace context to a call's metadata, makes the plain
    call, and ends the call's CLIENT span (if any) with its status."""

    __slots__ = ("_inner", "_method")

    def __init__(self, inner: Any, method: str) -> None:
        self._inner = inner
        self._method = method

    def __call__(self, *args: Any, metadata: Any = None, **kwargs: Any) -> Any:
        metadata, span = tracing.outgoing(self._method, with_request_id(metadata))
        call = self._inner(*args, metadata=metadata, **kwargs)
        return call if span is None else tracing.end_when_done(call, span)


class RuntimeChannel(grpc.aio.Channel):
    """A ``grpc.aio`` channel whose calls carry the request id and trace context (module docstring)."""

    def __init__(self, inner: grpc.aio.Channel) -> None:
        self.inner = inner

    async def __aenter__(self) -> RuntimeChannel:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self.inner.__aexit__(exc_type, exc, tb)

    async def close(self, grace: float | None = None) -> None:
        await self.inner.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.inner.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.inner.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.inner.channel_ready()

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _Propagating(
            self.inner.unary_unary(method, request_serializer, response_deserializer, _registered_method),
            method,
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _Propagating(
            self.inner.unary_stream(method, request_serializer, response_deserializer, _registered_method),
            method,
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _Propagating(
            self.inner.stream_unary(method, request_serializer, response_deserializer, _registered_method),
            method,
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _Propagating(
            self.inner.stream_stream(method, request_serializer, response_deserializer, _registered_method),
            method,
        )


@dataclass(frozen=True)
class ChannelDefaults:
    """``RuntimeSettings``' defaults for what a channel reads, for callers without settings. Declared
    here because the probe, which the kubelet runs in every pod every few seconds, would otherwise load
    pydantic for them (it doubled the probe's start-up); ``tests/runtime/test_channel.py`` checks that
    they equal ``RuntimeSettings``' own."""

    max_message_bytes: int = 8 * 1024 * 1024
    keepalive_time_s: float = 30.0
    reconnect_max_backoff_s: float = 2.0
    retry_max_attempts: int = 3
    retry_initial_backoff_s: float = 0.05
    retry_max_backoff_s: float = 0.5
    retry_throttle_max_tokens: int = 10
    retry_throttle_token_ratio: float = 0.1
    backend_tls_ca_file: Path | None = None
    backend_tls_cert_file: Path | None = None
    backend_tls_key_file: Path | None = None
    backend_tls_server_name: str = ""
    breaker_failure_threshold: int = 5
    breaker_open_s: float = 5.0
    breaker_min_principals: int = 2


def _defaults() -> RuntimeSettings:
    """The runtime's defaults without reading the environment (the probe takes its TLS from flags)."""
    return _DEFAULTS  # type: ignore[return-value]  # duck-typed: the fields a channel reads


_DEFAULTS = ChannelDefaults()
