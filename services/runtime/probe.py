"""Health-check client (there is no grpc-health-probe here): ``python -m services.runtime.probe HOST:PORT``.

Exit status 0 when the server reports SERVING, 1 otherwise; ``--wait`` polls until it does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


async def check(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The health status name (``SERVING``, ``NOT_SERVING``, ...) or ``UNREACHABLE``."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def wait_serving(address: str, timeout: float, service: str = "", interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check(address, service) == "SERVING":
            return True
        await asyncio.sleep(interval)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address", help="host:port of a gRPC server")
    parser.add_argument("--service", default="", help="service name; empty = the whole server")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for SERVING")
    args = parser.parse_args()
    if args.wait:
        ok = asyncio.run(wait_serving(args.address, args.wait, args.service))
        status = "SERVING" if ok else asyncio.run(check(args.address, args.service))
    else:
        status = asyncio.run(check(args.address, args.service))
    print(status)
    sys.exit(0 if status == "SERVING" else 1)


if __name__ == "__main__":
    main()
