"""Helpers every service's tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc

from services.runtime.config import RuntimeSettings

S = TypeVar("S", bound=RuntimeSettings)
T = TypeVar("T")


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


@asynccontextmanager
async def serving(
    settings: RuntimeSettings, build: Callable[..., Any], stub: Callable[[grpc.aio.Channel], T]
) -> AsyncIterator[tuple[Any, T]]:
    """A real server of ``build`` on ``settings`` and a stub on a channel to it; stopped afterwards."""
    from services.runtime.server import Server

    server = Server(settings, build)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            yield server, stub(channel)
    finally:
        await server.stop(grace=1)
