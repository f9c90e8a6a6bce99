"""Runtime behaviour across replicas on the shared backend: one admin call rolls a model version out to
every replica (and to replicas started later); training output is picked up without a restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from cbec.common.v1 import common_pb2, common_pb2_grpc

from services.runtime.server import Server
from tests.runtime.conftest import make_settings
from tests.runtime.echo_service import EchoService, write_version
from tests.stores import PG_PASSWORD
from tests.support import token_file, trusted_channel


def shared(models_dir: Path, url: str, **overrides: object) -> dict[str, object]:
    return dict(
        models_dir=models_dir,
        state_backend="shared",
        database_url=url,
        database_password=PG_PASSWORD,
        redis_url="redis://127.0.0.1:9/0",  # unused by the echo service
        internal_token_file=token_file(),  # admin calls need it
        **overrides,
    )


async def serving(server: Server, version: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while server.service.slot.current is None or server.service.slot.current.manifest.version != version:
        assert time.monotonic() < deadline, f"still on {server.service.slot.current}"
        await asyncio.sleep(0.05)


async def test_a_version_loaded_on_one_replica_is_served_by_every_replica(
    tmp_path: Path, pg_url: str
) -> None:
    models = tmp_path / "models"
    old = write_version(models, 1.0)
    new = write_version(models, 2.0)
    replicas = [Server(make_settings(**shared(models, pg_url)), EchoService) for _ in range(2)]
    for r in replicas:
        await r.start()
    try:
        for r in replicas:
            assert r.service.slot.current.manifest.version == new
        async with trusted_channel(f"127.0.0.1:{replicas[0].grpc_port}") as channel:
            admin = common_pb2_grpc.ModelAdminServiceStub(channel)
            await admin.LoadModelVersion(common_pb2.LoadModelVersionRequest(version=old), timeout=10)
        await serving(replicas[1], old)
        late = Server(make_settings(**shared(models, pg_url)), EchoService)
        await late.start()
        replicas.append(late)
        assert late.service.slot.current.manifest.version == old  # the choice outlives the call
        async with trusted_channel(f"127.0.0.1:{late.grpc_port}") as channel:
            admin = common_pb2_grpc.ModelAdminServiceStub(channel)
            await admin.LoadModelVersion(common_pb2.LoadModelVersionRequest(version=""), timeout=10)
        for r in replicas:
            await serving(r, new)
    finally:
        for r in replicas:
            await r.stop(grace=0)


async def test_new_versions_are_picked_up_unless_pinned(tmp_path: Path, pg_url: str) -> None:
    models = tmp_path / "models"
    first = write_version(models, 1.0)
    server = Server(make_settings(**shared(models, pg_url, model_poll_s=0.1)), EchoService)
    await server.start()
    try:
        assert server.service.slot.current.manifest.version == first
        trained = write_version(models, 3.0)  # a training job wrote a version
        await serving(server, trained)
        await server.admin_switch(first)  # an operator rolls back: new arrivals must wait
        write_version(models, 4.0)
        await asyncio.sleep(0.5)
        assert server.service.slot.current.manifest.version == first
    finally:
        await server.stop(grace=0)


async def test_a_deployment_pin_refuses_a_shared_roll_out(tmp_path: Path, pg_url: str) -> None:
    """CBEC_MODEL_VERSION wins on every replica, so switching one replica through the admin API would
    leave the service split: the call is refused, naming the setting."""
    models = tmp_path / "models"
    old = write_version(models, 1.0)
    new = write_version(models, 2.0)
    server = Server(make_settings(**shared(models, pg_url, model_version=old)), EchoService)
    await server.start()
    try:
        async with trusted_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            admin = common_pb2_grpc.ModelAdminServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.LoadModelVersion(common_pb2.LoadModelVersionRequest(version=new), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "CBEC_MODEL_VERSION" in (info.value.details() or "")
        assert server.service.slot.current.manifest.version == old
    finally:
        await server.stop(grace=0)
