"""Health-check client (there is no grpc-health-probe here): ``python -m services.runtime.probe HOST:PORT``.

Exit status 0 when the server reports SERVING, 1 otherwise; ``--wait`` polls until it does.

A server with mutual TLS (``CBEC_TLS_CLIENT_CA_FILE``) refuses a caller without a client certificate,
and the kubelet's native gRPC probe cannot present one: the Helm chart then execs this client with the
pod's own certificate (``--tls-ca/--tls-cert/--tls-key``) and the name the certificate carries
(``--tls-server-name``, as the address is 127.0.0.1). Health checks need no internal token.

The channel is the runtime's client channel (``channel.py``) with the TLS of the flags (the same
fields as ``CBEC_BACKEND_TLS_*``), not of the environment: a probe checks the server it names.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .channel import ClientTLS, client_channel

SERVING = health_pb2.HealthCheckResponse.SERVING
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: TLS for the probe: the CA of the server's certificate, a client certificate for mutual TLS, the name
#: to check on the server's certificate (empty: the address's host).
ProbeTLS = ClientTLS


def _channel(address: str, tls: ProbeTLS | None) -> grpc.aio.Channel:
    return client_channel(address, None, (HEALTH,), tls=tls)


async def check(address: str, service: str = "", timeout: float = 2.0, *, tls: ProbeTLS | None = None) -> str:
    """The health status name (``SERVING``, ``NOT_SERVING``, ...) or ``UNREACHABLE``."""
    async with _channel(address, tls) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def wait_serving(
    address: str, timeout: float, service: str = "", interval: float = 0.25, *, tls: ProbeTLS | None = None
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check(address, service, tls=tls) == "SERVING":
            return True
        await asyncio.sleep(interval)
    return False


def parser() -> argparse.ArgumentParser:
    """The command line (also parsed by the chart harness, tests/deploy/chart_run.py)."""
    p = argparse.ArgumentParser(prog="python -m services.runtime.probe", description=__doc__)
    p.add_argument("address", help="host:port of a gRPC server")
    p.add_argument("--service", default="", help="service name; empty = the whole server")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for SERVING")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds one health call may take")
    p.add_argument("--tls-ca", type=Path, help="PEM CA of the server's certificate: connect with TLS")
    p.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    p.add_argument("--tls-server-name", default="", help="name to check on the server's certificate")
    return p


def tls_from_args(args: argparse.Namespace) -> ProbeTLS | None:
    """The TLS settings of parsed arguments; exits with status 2 (argparse's) when they are inconsistent."""
    if args.tls_ca is None:
        if args.tls_cert or args.tls_key or args.tls_server_name:
            parser().error("--tls-cert, --tls-key and --tls-server-name need --tls-ca")
        return None
    if (args.tls_cert is None) != (args.tls_key is None):
        parser().error("--tls-cert and --tls-key go together")
    try:
        return ProbeTLS.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    except OSError as exc:
        parser().error(f"cannot read a TLS file: {exc}")
    raise AssertionError("unreachable")


def main() -> None:
    args = parser().parse_args()
    tls = tls_from_args(args)
    if args.wait:
        ok = asyncio.run(wait_serving(args.address, args.wait, args.service, tls=tls))
        status = "SERVING" if ok else asyncio.run(check(args.address, args.service, args.timeout, tls=tls))
    else:
        status = asyncio.run(check(args.address, args.service, args.timeout, tls=tls))
    print(status)
    sys.exit(0 if status == "SERVING" else 1)


if __name__ == "__main__":
    main()
