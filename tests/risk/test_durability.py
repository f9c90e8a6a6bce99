"""Velocity state and outcome labels survive a killed server process (SIGKILL, no shutdown code runs), on
the embedded backend and on the shared one (real PostgreSQL + Redis)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import psycopg
import redis
from cbec.risk.v1 import risk_pb2, risk_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.risk.features import Tx
from services.risk.state import StateStore
from services.runtime.state import PostgresDatabase
from tests.risk.conftest import Trained, good_transaction, now_ms, ts
from tests.stores import PG_PASSWORD, REDIS_PASSWORD, store_env

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def risk_process(
    models_dir: Path, state_dir: Path, port: int, **env_overrides: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m services.risk`` as the chart starts it; embedded state in ``state_dir`` unless the
    overrides (e.g. ``store_env``) say otherwise."""
    env = {
        **os.environ,
        "CBEC_HOST": "127.0.0.1",
        "CBEC_GRPC_PORT": str(port),
        "CBEC_METRICS_ENABLED": "false",
        "CBEC_MODELS_DIR": str(models_dir),
        "CBEC_STATE_DIR": str(state_dir),
        "CBEC_DEVICE": "cpu",
        "CBEC_LOG_LEVEL": "WARNING",
        "CBEC_GRACE_PERIOD_S": "2",
        **env_overrides,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.risk"], cwd=ROOT, env=env, stderr=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def wait_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while loop.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("risk server did not report SERVING")


async def test_state_and_labels_survive_sigkill(trained: Trained, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state = state_dir / "risk.sqlite3"
    base = now_ms() - 30 * 60_000
    port = free_port()
    with risk_process(trained.models_dir, state_dir, port) as proc:
        await wait_serving(port, proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = risk_pb2_grpc.RiskServiceStub(ch)
            for i in range(5):
                t = good_transaction(transaction_id=f"k{i}", card_fingerprint="survivor",
                                     occurred_time=ts(base + i * 60_000))  # fmt: skip
                await stub.ScoreTransaction(risk_pb2.ScoreTransactionRequest(transaction=t))
            await stub.ReportOutcome(
                risk_pb2.ReportOutcomeRequest(transaction_id="k2", outcome=risk_pb2.OUTCOME_CONFIRMED_FRAUD)
            )
        proc.send_signal(signal.SIGKILL)  # no drain, no close: only committed data may survive
        proc.wait(10)

    after = StateStore(state, read_only=True)
    probe = Tx("probe", "user-1", "survivor", 1.0, "EUR", base + 10 * 60_000)
    assert len(after.history(probe, 3_600_000, 3_600_000, 3_600_000).card) == 5
    assert after.outcome("k2") == risk_pb2.OUTCOME_CONFIRMED_FRAUD
    assert {r.tx.transaction_id: r.label for r in after.labelled_transactions()}["k2"] == 1
    after.close()

    port = free_port()
    with risk_process(trained.models_dir, state_dir, port) as proc:
        await wait_serving(port, proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = risk_pb2_grpc.RiskServiceStub(ch)
            known = await stub.ReportOutcome(
                risk_pb2.ReportOutcomeRequest(transaction_id="k4", outcome=risk_pb2.OUTCOME_LEGITIMATE)
            )
            assert known.transaction_known  # scored before the kill
            t = good_transaction(
                transaction_id="k5", card_fingerprint="survivor", occurred_time=ts(base + 6 * 60_000)
            )
            await stub.ScoreTransaction(risk_pb2.ScoreTransactionRequest(transaction=t))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    final = StateStore(state, read_only=True)
    assert len(final.history(probe, 3_600_000, 3_600_000, 3_600_000).card) == 6


async def test_acknowledged_state_survives_sigkill_shared(
    trained: Trained, tmp_path: Path, pg_url: str, redis_db: str
) -> None:
    """Shared backend: the risk process is killed while outcome reports are in flight; every score and
    every outcome it acknowledged is in PostgreSQL (and the velocity in Redis) afterwards."""
    base = now_ms() - 30 * 60_000
    port = free_port()
    acked: list[str] = []
    with risk_process(trained.models_dir, tmp_path / "state", port, **store_env(pg_url, redis_db)) as proc:
        await wait_serving(port, proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = risk_pb2_grpc.RiskServiceStub(ch)
            for i in range(5):
                t = good_transaction(transaction_id=f"k{i}", card_fingerprint="survivor",
                                     occurred_time=ts(base + i * 60_000))  # fmt: skip
                await stub.ScoreTransaction(risk_pb2.ScoreTransactionRequest(transaction=t))

            async def reporter(lane: int) -> None:
                for i in range(lane, 100_000, 4):
                    request = risk_pb2.ReportOutcomeRequest(
                        transaction_id=f"k{i % 5}" if i < 5 else f"o{i}", outcome=risk_pb2.OUTCOME_CHARGEBACK
                    )
                    try:
                        await stub.ReportOutcome(request, timeout=10)
                    except grpc.aio.AioRpcError:
                        return  # the process is gone: this one was not acknowledged
                    acked.append(request.transaction_id)

            lanes = [asyncio.create_task(reporter(lane)) for lane in range(4)]
            while len(acked) < 60:
                assert not all(lane.done() for lane in lanes), "reporters stopped before the kill"
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGKILL)  # mid-load: no drain, no close
            proc.wait(10)
            await asyncio.gather(*lanes)
    with psycopg.connect(pg_url, password=PG_PASSWORD) as conn:
        outcomes = {row[0] for row in conn.execute("SELECT tx_id FROM risk_outcomes")}
        scored = {row[0] for row in conn.execute("SELECT tx_id FROM risk_scored")}
    assert set(acked) <= outcomes, sorted(set(acked) - outcomes)
    assert scored == {f"k{i}" for i in range(5)}
    client = redis.Redis.from_url(redis_db, password=REDIS_PASSWORD)
    store = StateStore(PostgresDatabase(pg_url, PG_PASSWORD, name="risk"), client)
    probe = Tx("probe", "user-1", "survivor", 1.0, "EUR", base + 10 * 60_000)
    assert len(store.history(probe, 3_600_000, 3_600_000, 3_600_000).card) == 5
    store.db.close()
    client.close()
