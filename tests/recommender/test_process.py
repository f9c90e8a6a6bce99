"""The service as a real process: SIGKILL right after RecordInteractions returned loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from cbec.recommender.v1 import recommender_pb2 as pb
from cbec.recommender.v1 import recommender_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.recommender.events import EventStore
from tests.recommender.conftest import Shop

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    shop: Shop, state_dir: Path, extra_env: dict[str, str] | None = None, port: int = 0
) -> tuple[subprocess.Popen[bytes], int]:
    """The service as the chart starts it: settings from the environment, state in CBEC_STATE_DIR
    (the embedded store) or in the shared PostgreSQL (``extra_env``: tests.stores.store_env)."""
    port = port or free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CBEC_")},
        "CBEC_HOST": "127.0.0.1",
        "CBEC_GRPC_PORT": str(port),
        "CBEC_METRICS_ENABLED": "false",
        "CBEC_MODELS_DIR": str(shop.models_dir),
        "CBEC_DEVICE": "cpu",
        "CBEC_STATE_DIR": str(state_dir),
        "CBEC_RECOMMENDER_EMBEDDINGS_CACHE": str(shop.cache_path),
        "CBEC_LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.recommender"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL
    )
    return proc, port


async def wait_serving(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("recommender never reported SERVING")


async def test_sigkill_right_after_record_interactions_loses_no_event(shop: Shop, tmp_path: Path) -> None:
    state = tmp_path / "state"
    items = [str(i) for i in shop.prepared.items.item_id[:6]]
    proc, port = start(shop, state)
    try:
        await wait_serving(port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = recommender_pb2_grpc.RecommenderServiceStub(ch)
            batch = [
                pb.Interaction(user_id="durable", item_id=i, type=pb.INTERACTION_TYPE_CART) for i in items
            ]
            r = await stub.RecordInteractions(pb.RecordInteractionsRequest(interactions=batch), timeout=30)
            assert r.accepted_count == len(items)
            proc.send_signal(signal.SIGKILL)  # no drain, no clean close: straight after the reply
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = EventStore(state / "recommender.sqlite3")  # the embedded store lives in CBEC_STATE_DIR
    assert sorted(e.item_id for e in store.events_for_user("durable")) == sorted(items)
    store.close()
    # a new process replays the events: the user is personalised on them and they are not re-recommended
    proc, port = start(shop, state)
    try:
        await wait_serving(port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = recommender_pb2_grpc.RecommenderServiceStub(ch)
            r = await stub.Recommend(pb.RecommendRequest(user_id="durable", k=5), timeout=30)
            assert r.strategy == pb.STRATEGY_HYBRID
            assert not set(items) & {i.item_id for i in r.items}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
