"""The runtime as a real process: configuration errors, JSON logs, SIGTERM under load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from google.protobuf import wrappers_pb2 as w

from services.runtime import probe
from tests.runtime.conftest import EchoClient
from tests.runtime.echo_service import write_version

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(env_extra: dict[str, str], models_dir: Path) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    env = {
        **os.environ,
        "CBEC_HOST": "127.0.0.1",
        "CBEC_GRPC_PORT": str(port),
        "CBEC_METRICS_PORT": "0",
        "CBEC_MODELS_DIR": str(models_dir),
        "CBEC_DEVICE": "cpu",
        **env_extra,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.runtime.echo_service"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, port


async def wait_serving(port: int, timeout: float = 20) -> None:
    if not await probe.wait_serving(f"127.0.0.1:{port}", timeout):
        raise TimeoutError(f"server on {port} never reported SERVING")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CBEC_GRPC_PORT", "not-a-port"), ("CBEC_MAX_CONCURRENT_CALLS", "0"), ("CBEC_DEVICE", "tpu")],
)
def test_bad_configuration_stops_start_naming_the_variable(tmp_path: Path, variable: str, value: str) -> None:
    proc, _ = start({variable: value}, tmp_path)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert variable in stderr
    assert "Traceback" not in stderr


def test_gpu_requested_without_gpu_stops_start(tmp_path: Path) -> None:
    proc, _ = start({"CBEC_DEVICE": "cuda:0"}, tmp_path)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "CBEC_DEVICE" in stderr and "GPU" in stderr


async def test_sigterm_under_load_drops_no_accepted_call(tmp_path: Path) -> None:
    write_version(tmp_path, 2.0)
    proc, port = start({"CBEC_ACCESS_LOG": "true", "CBEC_GRACE_PERIOD_S": "10"}, tmp_path)
    try:
        await wait_serving(port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            client = EchoClient(ch)
            in_flight = [
                asyncio.ensure_future(
                    client.sleep(w.DoubleValue(value=1.0), metadata=(("x-request-id", f"r{i}"),))
                )
                for i in range(20)
            ]
            await asyncio.sleep(0.4)  # all 20 accepted and sleeping
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await client.echo(w.StringValue(value="after SIGTERM"), timeout=2)
            results = await asyncio.gather(*in_flight, return_exceptions=True)
        assert all(not isinstance(r, Exception) and r.value == "slept" for r in results), results
        assert late.value.code() == grpc.StatusCode.UNAVAILABLE
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert records, stderr
    rpc = [r for r in records if r.get("message") == "rpc" and r.get("grpc_method") == "Sleep"]
    assert {r["request_id"] for r in rpc} == {f"r{i}" for i in range(20)}
    assert all(r["grpc_code"] == "OK" and r["service"] == "echo" for r in rpc)
    assert any(r.get("message") == "draining" for r in records)


CANCEL_STREAM = textwrap.dedent(
    """
    import asyncio, tempfile
    from pathlib import Path
    import grpc
    from google.protobuf import wrappers_pb2 as w
    from tests.runtime.conftest import EchoClient, make_settings
    from tests.runtime.echo_service import EchoService, write_version
    from services.runtime.server import Server

    async def main():
        d = Path(tempfile.mkdtemp())
        write_version(d, 2.0)
        server = Server(make_settings(d), EchoService)
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            client = EchoClient(channel)
            for _ in range(200):
                call = client.count(w.Int32Value(value=100000))
                n = 0
                async for _ in call:
                    n += 1
                    if n == 3:
                        call.cancel()
                        break
        await server.stop(1)
        print("survived")

    asyncio.run(main())
    """
)


def test_client_cancelling_a_server_stream_leaves_the_server_up() -> None:
    """200 streams cancelled mid-flight; run in a child process so a crash fails the test, not the run."""
    proc = subprocess.run(
        [sys.executable, "-c", CANCEL_STREAM], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "survived" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    assert "INTERNAL" not in proc.stderr
