"""Fixtures: real backend servers (in-process, ephemeral ports) and a real gateway in front of them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt
import pytest
from cbec.gateway.v1 import gateway_pb2_grpc

from gateway.auth import hash_key
from gateway.config import BACKENDS, GatewaySettings
from gateway.service import Gateway
from services.runtime.server import Server
from tests.gateway.backends import Recorder, make_server, write_model
from tests.support import token_file

ROOT = Path(__file__).resolve().parents[2]
FULL_KEY = "test-key-full-0123456789"
RECOMMENDER_KEY = "test-key-recommender-0123456789"
SLOW_KEY = "test-key-slow-0123456789"
JWT_SECRET = "test-jwt-secret-that-is-long-enough-for-hs256"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    for name in BACKENDS:
        write_model(d, name)
    return d


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    entries = [
        {"id": "full", "sha256": hash_key(FULL_KEY), "scopes": ["*"], "rate_per_s": 10_000, "burst": 10_000},
        {"id": "recommender-only", "sha256": hash_key(RECOMMENDER_KEY), "scopes": ["recommender"]},
        {"id": "slow", "sha256": hash_key(SLOW_KEY), "scopes": ["*"], "rate_per_s": 1, "burst": 3},
    ]
    path.write_text(json.dumps({"keys": entries}))
    return path


@pytest.fixture
def jwt_secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwt.secret"
    path.write_text(JWT_SECRET)
    return path


def make_jwt(
    scopes: str, sub: str = "user-1", ttl: float = 300, secret: str = JWT_SECRET, **claims: Any
) -> str:
    payload = {"sub": sub, "scope": scopes, "exp": int(time.time() + ttl), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def backends(models_dir: Path, recorder: Recorder) -> AsyncIterator[dict[str, Server]]:
    servers = {name: make_server(name, models_dir, recorder) for name in BACKENDS}
    for server in servers.values():
        await server.start()
    yield servers
    for server in servers.values():
        await server.stop(grace=0.5)


@dataclass
class RunningGateway:
    server: Server

    @property
    def service(self) -> Gateway:
        return self.server.service  # type: ignore[return-value]

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.server.settings.tls_cert_file else "http"
        return f"{scheme}://127.0.0.1:{self.service.http_port}"


def gateway_settings(
    backends: dict[str, Any], models_dir: Path, keys: Path, jwt_secret: Path, **over: Any
) -> GatewaySettings:
    values: dict[str, Any] = dict(
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        metrics_enabled=False,
        models_dir=models_dir,
        device="cpu",
        grace_period_s=1.0,
        env="prod",
        api_keys_file=keys,
        jwt_secret_file=jwt_secret,
        breaker_open_s=0.5,
        reconnect_max_backoff_s=0.5,
        internal_token_file=token_file(),  # the backends under test require it
    )
    for name, backend in backends.items():
        address = backend if isinstance(backend, str) else f"127.0.0.1:{backend.grpc_port}"
        values[f"{name}_addr"] = address
    values.update(over)
    return GatewaySettings(**values)


@pytest.fixture
async def make_gateway(
    backends: dict[str, Server], models_dir: Path, keys_file: Path, jwt_secret_file: Path
) -> AsyncIterator[Callable[..., Any]]:
    started: list[Server] = []

    async def start(addresses: dict[str, str] | None = None, **over: Any) -> RunningGateway:
        targets: dict[str, Any] = {**backends, **(addresses or {})}
        settings = gateway_settings(targets, models_dir, keys_file, jwt_secret_file, **over)
        server = Server(settings, Gateway)
        await server.start()
        started.append(server)
        return RunningGateway(server)

    yield start
    for server in started:
        await server.stop(grace=0.5)


@pytest.fixture
async def gw(make_gateway: Callable[..., Any]) -> RunningGateway:
    return await make_gateway()


@pytest.fixture
async def http(gw: RunningGateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=gw.http_url, headers={"x-api-key": FULL_KEY}) as session:
        yield session


@pytest.fixture
async def stub(gw: RunningGateway) -> AsyncIterator[gateway_pb2_grpc.GatewayServiceStub]:
    async with grpc.aio.insecure_channel(gw.grpc_address) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)


AUTH = (("x-api-key", FULL_KEY),)


# --- backends as processes (chaos) ----------------------------------------------------------------
@dataclass
class BackendProcess:
    names_ports: list[tuple[str, int]]
    models_dir: Path
    proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        args = [f"{n}={p}" for n, p in self.names_ports]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.gateway.backends", "--models-dir", str(self.models_dir), *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("ready"), line

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def backend_process(models_dir: Path) -> Iterator[Callable[..., BackendProcess]]:
    made: list[BackendProcess] = []

    def make(*names: str) -> BackendProcess:
        proc = BackendProcess([(n, free_port()) for n in names], models_dir)
        proc.start()
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()
