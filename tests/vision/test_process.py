"""The service as a real process: products accepted before a kill -9 are there after the restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from cbec.vision.v1 import vision_pb2, vision_pb2_grpc

from tests.runtime.test_process import free_port, wait_serving
from tests.vision import imagegen
from tests.vision.conftest import index_requests, stream

ROOT = Path(__file__).resolve().parents[2]


def start(
    tmp_path: Path, models_dir: Path, port: int, extra: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "CBEC_HOST": "127.0.0.1",
        "CBEC_GRPC_PORT": str(port),
        "CBEC_METRICS_PORT": "0",
        "CBEC_MODELS_DIR": str(models_dir),
        "CBEC_DEVICE": "cpu",
        "CBEC_LOG_LEVEL": "WARNING",
        "CBEC_STATE_DIR": str(tmp_path / "state"),
        "CBEC_VISION_DATA_DIR": str(tmp_path / "data"),
        "CBEC_VISION_SNAPSHOT_EVERY": "100000",  # no snapshot after indexing: the restart must replay
        **(extra or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.vision"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_kill_9_loses_no_indexed_product(tmp_path: Path, models_dir: Path) -> None:
    items = imagegen.catalogue(n_per=1)
    port = free_port()
    proc = start(tmp_path, models_dir, port)
    try:
        await wait_serving(port, timeout=180)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            reply = await stub.IndexProducts(stream(index_requests(items)), timeout=120)
            assert reply.indexed_count == len(items)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)

    proc = start(tmp_path, models_dir, port)
    try:
        await wait_serving(port, timeout=180)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            stats = await stub.GetIndexStats(vision_pb2.GetIndexStatsRequest(), timeout=30)
            assert stats.size == len(items)
            for pid, *_, png in items[::4]:
                found = await stub.SearchByImage(vision_pb2.SearchByImageRequest(image=png, k=1), timeout=30)
                assert found.matches[0].product_id == pid
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
