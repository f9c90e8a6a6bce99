"""The runtime's TLS: mutual TLS on a real server, and a renewed certificate used without a restart."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.server import Server
from tests.gateway.certs import Pki, make_pki
from tests.runtime.conftest import make_settings
from tests.runtime.echo_service import EchoService


def _install(pki: Pki, live: Path) -> None:
    """Put a certificate set where the server reads it, the way a renewed Secret replaces its files."""
    live.mkdir(exist_ok=True)
    for source, name in ((pki.server_cert, "tls.crt"), (pki.server_key, "tls.key"), (pki.ca, "ca.crt")):
        shutil.copyfile(source, live / f".{name}.new")
        (live / f".{name}.new").replace(live / name)


async def _check(port: int, pki: Pki) -> int:
    """A health check over a new mTLS connection that trusts (and presents a client cert from) ``pki``."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return reply.status


async def test_mtls_and_a_renewed_certificate_without_restart(tmp_path: Path, models_dir: Path) -> None:
    first, second = make_pki(tmp_path / "first"), make_pki(tmp_path / "second")
    live = tmp_path / "live"
    _install(first, live)
    settings = make_settings(
        models_dir,
        tls_cert_file=live / "tls.crt",
        tls_key_file=live / "tls.key",
        tls_client_ca_file=live / "ca.crt",
    )
    server = Server(settings, EchoService)
    await server.start()
    try:
        port = server.grpc_port
        assert await _check(port, first) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:  # no TLS: refused
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

        _install(second, live)  # renewal under a new CA: new connections must get the new set
        assert await _check(port, second) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as old:  # the old CA no longer verifies the server
            await _check(port, first)
        assert old.value.code() is grpc.StatusCode.UNAVAILABLE

        (live / "tls.key").write_text("not a key")  # a broken set keeps the one in use
        assert await _check(port, second) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(grace=1)
