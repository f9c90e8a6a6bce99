"""Helpers every service's tests share."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc

from services.runtime.access import SCOPES_KEY, USER_KEY, identity_metadata
from services.runtime.config import RuntimeSettings

S = TypeVar("S", bound=RuntimeSettings)
T = TypeVar("T")

#: The internal token of servers under test that require one (``token_file()``).
INTERNAL_TOKEN = "test-internal-token-0123456789abcdef0123456789"
_token_file: Path | None = None


def local_settings(cls: type[S], models_dir: Path, **fields: Any) -> S:
    """Settings for a server under test: loopback, ephemeral ports, no metrics endpoint, CPU."""
    base: dict[str, Any] = dict(
        host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        metrics_enabled=False,
        models_dir=models_dir,
        device="cpu",
    )
    return cls(**{**base, **fields})


def token_file() -> Path:
    """A file (mode 0600) holding ``INTERNAL_TOKEN``, for ``CBEC_INTERNAL_TOKEN_FILE``; one per process."""
    global _token_file
    if _token_file is None:
        folder = Path(tempfile.mkdtemp(prefix="cbec-token-"))
        atexit.register(shutil.rmtree, folder, True)
        path = folder / "internal-token"
        path.write_text(INTERNAL_TOKEN + "\n")
        path.chmod(0o600)
        _token_file = path
    return _token_file


def with_token(settings: S) -> S:
    """``settings`` with the test token configured: the server then requires it on every call."""
    if settings.internal_token_file is not None:
        return settings
    return settings.model_copy(update={"internal_token_file": token_file()})


def trusted_metadata(
    user: str = "", scopes: Iterable[str] = ("admin",), principal: str = "test"
) -> tuple[tuple[str, str], ...]:
    """What the gateway would send for ``principal`` acting for ``user``: token, identity, scopes."""
    return identity_metadata(INTERNAL_TOKEN, user, principal, frozenset(scopes))


class _AddMetadata:
    """Adds fixed metadata to every call of a channel (a call's own metadata is kept). grpc.aio files
    an interceptor under the first call kind it implements, so there is one subclass per kind."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], user_from_request: bool = False) -> None:
        self._metadata = metadata
        self._user_from_request = user_from_request

    def _details(
        self, details: grpc.aio.ClientCallDetails, request: Any = None
    ) -> grpc.aio.ClientCallDetails:
        added = self._metadata
        user = getattr(request, "user_id", "") if self._user_from_request else ""
        if user and isinstance(user, str):  # what the gateway sends for a key that may act for users
            added = tuple((k, v) for k, v in added if k != USER_KEY) + tuple(
                (k, v) for k, v in identity_metadata(INTERNAL_TOKEN, user) if k == USER_KEY
            )
        # The call's own metadata first: the server believes the first value of a key.
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *added)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnary(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details, request), request)


class _UnaryStream(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details, request), request)


class _StreamUnary(_AddMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStream(_AddMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def trusted_channel(
    address: str,
    user: str = "",
    scopes: Iterable[str] = ("admin",),
    principal: str = "test",
    user_from_request: bool = False,
) -> grpc.aio.Channel:
    """A channel whose every call carries ``trusted_metadata`` (as the gateway's calls do).

    ``user_from_request``: a request's non-empty ``user_id`` names the user instead (what the gateway
    sends for a key with the ``act_as_user`` scope). Metadata given to a call wins over the channel's."""
    metadata = trusted_metadata(user, scopes, principal)
    kinds = (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)
    return grpc.aio.insecure_channel(
        address, interceptors=[kind(metadata, user_from_request) for kind in kinds]
    )


def as_user(user: str, scopes: Iterable[str] = ()) -> tuple[tuple[str, str], ...]:
    """Per-call metadata for a ``trusted_channel``: this call is for ``user`` (and ``scopes``)."""
    return tuple((k, v) for k, v in trusted_metadata(user, scopes) if k in (USER_KEY, SCOPES_KEY))


@asynccontextmanager
async def serving(
    settings: RuntimeSettings,
    build: Callable[..., Any],
    stub: Callable[[grpc.aio.Channel], T],
    admin: bool = False,
) -> AsyncIterator[tuple[Any, T]]:
    """A real server of ``build`` on ``settings`` and a stub on a channel to it; stopped afterwards.

    ``admin``: the server requires the internal token and the stub's channel sends it with the
    ``admin`` scope, and a request's ``user_id`` as the user (what the gateway does for a key with
    the ``admin`` and ``act_as_user`` scopes), so admin RPCs can be called."""
    from services.runtime.server import Server

    if admin:
        settings = with_token(settings)
    server = Server(settings, build)
    await server.start()
    address = f"127.0.0.1:{server.grpc_port}"
    try:
        channel = (
            trusted_channel(address, user_from_request=True) if admin else grpc.aio.insecure_channel(address)
        )
        async with channel:
            yield server, stub(channel)
    finally:
        await server.stop(grace=1)
