from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.runtime.config import RuntimeSettings
from services.runtime.server import Server
from tests.runtime.echo_service import SERVICE, EchoService, write_version


class EchoClient:
    """Typed-enough callables for the test service's methods over a real channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        from google.protobuf import wrappers_pb2 as w

        self.channel = channel

        def uu(name: str, req: Any, resp: Any) -> Any:
            return channel.unary_unary(f"/{SERVICE}/{name}", req.SerializeToString, resp.FromString)

        self.echo = uu("Echo", w.StringValue, w.StringValue)
        self.sleep = uu("Sleep", w.DoubleValue, w.StringValue)
        self.block = uu("Block", w.DoubleValue, w.StringValue)
        self.predict = uu("Predict", w.DoubleValue, w.DoubleValue)
        self.count = channel.unary_stream(
            f"/{SERVICE}/Count", w.Int32Value.SerializeToString, w.Int32Value.FromString
        )
        self.sum = channel.stream_unary(
            f"/{SERVICE}/Sum", w.DoubleValue.SerializeToString, w.DoubleValue.FromString
        )
        self.raw_echo = channel.unary_unary(f"/{SERVICE}/Echo")  # bytes in, bytes out


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    write_version(d, 2.0)
    return d


def make_settings(models_dir: Path, **overrides: Any) -> RuntimeSettings:
    base: dict[str, Any] = dict(
        service="echo", host="127.0.0.1", grpc_port=0, metrics_port=0, models_dir=models_dir, device="cpu"
    )
    base.update(overrides)
    return RuntimeSettings(**base)


@pytest.fixture
async def server(models_dir: Path) -> AsyncIterator[Server]:
    srv = Server(make_settings(models_dir), EchoService)
    await srv.start()
    yield srv
    await srv.stop(grace=1)


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        yield ch


@pytest.fixture
def client(channel: grpc.aio.Channel) -> EchoClient:
    return EchoClient(channel)


class ThreadedServer:
    """A Server on its own event loop in a thread, for tests that block or load the server's loop."""

    def __init__(self, settings: RuntimeSettings) -> None:
        import asyncio
        import threading

        self.server = Server(settings, EchoService)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(30)

    def stop(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.server.stop(grace=1), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture
def threaded_server(models_dir: Path) -> Any:
    ts = ThreadedServer(make_settings(models_dir))
    yield ts
    ts.stop()
