"""The service as a real process: reviews whose ingestion was acknowledged survive ``kill -9``, in the
embedded store (an SQLite file under CBEC_STATE_DIR) and in the shared PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cbec.sentiment.v1 import sentiment_pb2 as pb
from cbec.sentiment.v1 import sentiment_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.sentiment.store import ReviewStore

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(models: Path, state: Path, **extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "CBEC_HOST": "127.0.0.1",
        "CBEC_GRPC_PORT": str(port),
        "CBEC_METRICS_ENABLED": "false",
        "CBEC_MODELS_DIR": str(models),
        "CBEC_STATE_DIR": str(state),
        "CBEC_DEVICE": "cpu",
        "CBEC_LOG_LEVEL": "WARNING",
        **extra,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.sentiment"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL
    )
    return proc, port


async def wait_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            assert proc.poll() is None, "server exited"
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError("sentiment server never reported SERVING")


async def test_acknowledged_reviews_survive_kill_9(
    trained: tuple[Path, str, dict[str, Any]], tmp_path: Path
) -> None:
    models, _, _ = trained
    state = tmp_path / "state"
    now = datetime.now(UTC)
    created = now - timedelta(hours=3)
    proc, port = start(models, state)
    try:
        await wait_serving(port, proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = sentiment_pb2_grpc.SentimentServiceStub(ch)
            for batch in range(3):
                reviews = []
                for i in range(4):
                    r = pb.Review(
                        review_id=f"b{batch}-{i}",
                        product_id="sku-9",
                        category="coats",
                        market="PL",
                        text=f"Ciepły płaszcz, świetna jakość ({batch}-{i}).",
                        rating=5,
                    )
                    r.created_time.FromDatetime(created)
                    reviews.append(r)
                response = await stub.IngestReviews(pb.IngestReviewsRequest(reviews=reviews), timeout=120)
                assert response.accepted_count == 4
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()

    # the file alone, opened fresh: every acknowledged review and its aggregates are there
    assert sorted(p.name for p in state.glob("*.sqlite3")) == ["sentiment.sqlite3"]
    assert not (models / "sentiment-data").exists()  # nothing written under the models dir
    store = ReviewStore(state / "sentiment.sqlite3")
    assert store.count() == 12
    stored = store.get("b2-3")
    assert stored is not None and stored["market"] == "PL" and stored["lang"] == "pl"
    store.close()

    proc, port = start(models, state)
    try:
        await wait_serving(port, proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = sentiment_pb2_grpc.SentimentServiceStub(ch)
            report = await stub.GetMarketReport(
                pb.GetMarketReportRequest(product_id="sku-9", market="PL"), timeout=60
            )
            assert report.distribution.total == 12
            assert report.languages["pl"] == 12
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
