"""Risk on the shared backend, against real PostgreSQL + Redis (``tests/stores.py``): the same history as
the embedded backend for the same replayed sequence, velocity and outcomes across two replicas, training
reading the shared labels, and a store that is down answered UNAVAILABLE with RetryInfo, never INTERNAL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psycopg
import pytest
import redis
from cbec.risk.v1 import risk_pb2, risk_pb2_grpc
from google.rpc import error_details_pb2

from services.risk.config import RiskSettings
from services.risk.features import (
    CARD_WINDOW_MS,
    DAY_MS,
    DEVICE_WINDOW_MS,
    FEATURE_INDEX,
    HOUR_MS,
    MINUTE_MS,
    USER_WINDOW_MS,
    FeaturePipeline,
    RatesTable,
    Tx,
    tx_from_proto,
)
from services.risk.server import build
from services.risk.state import WINDOWS, ScoredRow, StateStore
from services.risk.train import load_outcomes
from services.runtime.errors import status_from_error
from services.runtime.server import Server
from services.runtime.state import PostgresDatabase
from tests.risk.conftest import (
    Trained,
    good_transaction,
    now_ms,
    shared_settings,
    to_proto,
    ts,
)
from tests.risk.synth import stream
from tests.stores import PG_PASSWORD, REDIS_PASSWORD, PostgresServer, RedisServer
from tests.support import serving

WINDOW_SETS = [WINDOWS, (HOUR_MS, 10 * MINUTE_MS, DAY_MS)]


def redis_of(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, password=REDIS_PASSWORD)


def sql(pg: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg, password=PG_PASSWORD) as conn:
        return conn.execute(query).fetchall()  # type: ignore[arg-type]


def running(
    settings: RiskSettings,
) -> AbstractAsyncContextManager[tuple[Server, risk_pb2_grpc.RiskServiceStub]]:
    return serving(settings, build, risk_pb2_grpc.RiskServiceStub)


async def score(stub: risk_pb2_grpc.RiskServiceStub, t: risk_pb2.Transaction) -> risk_pb2.RiskAssessment:
    return (
        await stub.ScoreTransaction(risk_pb2.ScoreTransactionRequest(transaction=t), timeout=30)
    ).assessment


async def report(
    stub: risk_pb2_grpc.RiskServiceStub, tx_id: str, outcome: int = risk_pb2.OUTCOME_CHARGEBACK
) -> bool:
    request = risk_pb2.ReportOutcomeRequest(transaction_id=tx_id, outcome=outcome)  # type: ignore[arg-type]
    return (await stub.ReportOutcome(request, timeout=30)).transaction_known


async def assert_unavailable(call: Awaitable[Any]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (err.value.code(), err.value.details())
    status = status_from_error(err.value)
    assert status is not None
    assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            if await check():
                return
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, (exc.code(), exc.details())
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


# --- the two backends agree -----------------------------------------------------------------------------
def replayed(seed: int) -> list[Tx]:
    """A synthetic stream with what live traffic adds: re-scored transactions (same id, sometimes
    within one call), several transactions of a card in one millisecond, late arrivals, and an id
    reused for another card (recorded once, as the embedded UNIQUE id does)."""
    rng = np.random.default_rng(seed)
    out: list[Tx] = []
    for labelled in stream(users=40, legit_per_user=6, fraud_rings=12, seed=seed):
        tx = labelled.tx
        out.append(tx)
        u = rng.random()
        if u < 0.06:
            out.append(out[int(rng.integers(0, len(out)))])
        elif u < 0.12:
            out.append(replace(tx, transaction_id=f"{tx.transaction_id}~tie", amount=tx.amount + 1))
        elif u < 0.16:
            late = tx.occurred_ms - int(rng.integers(1, 180)) * MINUTE_MS
            out.append(replace(tx, transaction_id=f"{tx.transaction_id}~late", occurred_ms=late))
        elif u < 0.18:
            out.append(replace(out[int(rng.integers(0, len(out)))], card=f"other-{tx.card}"))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_embedded_and_shared_history_are_identical(seed: int, pg_url: str, redis_db: str) -> None:
    """Property: for any replayed sequence, split into calls at random, with any history limit and
    windows, every transaction sees the same History from SQLite and from Redis. (Retention is longer
    than the stream here: expiry runs at other moments in each backend, every N events in SQLite and on
    every write in Redis, and is tested on its own.)"""
    rng = np.random.default_rng(100 + seed)
    limit = [2, 5, 2000][seed % 3]
    windows = WINDOW_SETS[seed % 2]
    rates = RatesTable.load()
    sequence = replayed(seed)
    keep = {"history_limit": limit, "event_retention_ms": 60 * DAY_MS}
    embedded = StateStore(":memory:", **keep)
    db = PostgresDatabase(pg_url, PG_PASSWORD, name="risk")
    client = redis_of(redis_db)
    shared = StateStore(db, client, redis_prefix=f"p{seed}:", **keep)
    try:
        compared = 0
        i = 0
        while i < len(sequence):
            part = sequence[i : i + int(rng.integers(1, 8))]
            i += len(part)
            with embedded.batch(), shared.batch():
                if rng.random() < 0.8:  # as the server does; without it each history is its own read
                    shared.prefetch(part, windows)
                for tx in part:
                    expected = embedded.history(tx, *windows)
                    assert shared.history(tx, *windows) == expected, (seed, tx)
                    amount = rates.to_reference(tx.amount, tx.currency)
                    embedded.record_event(tx, amount)
                    shared.record_event(tx, amount)
                    compared += 1
        assert compared == len(sequence) > 250
        # Outside a unit too, from what was written: a probe after each card's last transaction (the
        # cards that only a reused id named have no events: the id was recorded once, for its first card).
        last = {tx.card: tx for tx in sequence}
        for tx in last.values():
            probe = replace(tx, transaction_id="probe", occurred_ms=tx.occurred_ms + MINUTE_MS)
            assert shared.history(probe, *windows) == embedded.history(probe, *windows)
        assert shared.counts()["events"] == embedded.counts()["events"]
        assert shared.counts()["cards"] == embedded.counts()["cards"]
    finally:
        client.close()
        db.close()


def test_shared_units_write_nothing_when_they_fail(pg_url: str, redis_db: str) -> None:
    db = PostgresDatabase(pg_url, PG_PASSWORD, name="risk")
    store = StateStore(db, redis_of(redis_db))
    tx = Tx("t1", "U", "C", 10.0, "USD", 1_780_000_000_000, device="D")
    try:
        with pytest.raises(RuntimeError), store.batch():
            store.record_event(tx, 10.0)
            store.record_scored([ScoredRow(tx, 0.5, 0.5, 1, "v")])
            raise RuntimeError("crash mid-call")
        assert store.counts() == {"scored": 0, "outcomes": 0, "events": 0, "cards": 0}
        with store.batch():
            store.record_event(tx, 10.0)
            store.record_scored([ScoredRow(tx, 0.5, 0.5, 1, "v")])
        assert store.counts() == {"scored": 1, "outcomes": 0, "events": 1, "cards": 1}
        assert store.record_outcome("t1", risk_pb2.OUTCOME_CONFIRMED_FRAUD, 1) is True
        assert [(r.tx, r.label) for r in store.labelled_transactions()] == [(tx, 1)]
        client = store.redis_velocity.client if store.redis_velocity else None
        assert client is not None
        for key in (b"risk:c:C", b"risk:u:U", b"risk:d:D", b"risk:t:t1"):
            assert 34 * DAY_MS < client.pttl(key) <= 35 * DAY_MS  # velocity ages out
        assert 399 * DAY_MS < client.pttl(b"risk:f:C") <= 400 * DAY_MS  # first-seen is kept longer
        # Windows are trimmed by event time: 35 days behind the newest event of the key.
        later = replace(tx, transaction_id="t2", occurred_ms=tx.occurred_ms + 36 * DAY_MS)
        store.record_event(later, 1.0)
        assert client.zcard(b"risk:c:C") == client.zcard(b"risk:d:D") == 1
        probe = replace(later, transaction_id="probe", occurred_ms=later.occurred_ms + 1)
        assert store.history(probe, 40 * DAY_MS, 40 * DAY_MS, 40 * DAY_MS).card_first_ms == tx.occurred_ms
    finally:
        db.close()


# --- two replicas -----------------------------------------------------------------------------------------
async def test_velocity_and_outcomes_span_two_replicas(
    trained: Trained, tmp_path: Path, pg_url: str, redis_db: str
) -> None:
    settings_a = shared_settings(trained.models_dir, tmp_path / "a", pg_url, redis_db)
    settings_b = shared_settings(trained.models_dir, tmp_path / "b", pg_url, redis_db)
    base = now_ms() - 30 * MINUTE_MS
    purchases = [
        good_transaction(
            transaction_id=f"v{i}",
            card_fingerprint="roaming",
            user_id=f"user-{i % 3}",
            device_id=f"device-{i % 2}",
            occurred_time=ts(base + i * MINUTE_MS),
        )
        for i in range(10)
    ]
    async with running(settings_a) as (a, stub_a), running(settings_b) as (b, stub_b):
        stubs = (stub_a, stub_b)
        got = [(await score(stubs[i % 2], t)).fraud_probability for i, t in enumerate(purchases)]
        tenth = tx_from_proto(purchases[9])
        for srv in (a, b):
            history = srv.service.state.history(tenth, CARD_WINDOW_MS, USER_WINDOW_MS, DEVICE_WINDOW_MS)
            assert len(history.card) == 9  # the 10th purchase counts the 9 earlier ones, from both replicas
            assert history.card_first_ms == base
        # The same purchases through one in-memory store (training's path): the same features, so the
        # probabilities served by alternating replicas are those of one store.
        store = StateStore(":memory:")
        with store.batch():
            x, _ = FeaturePipeline(RatesTable.load()).transform([tx_from_proto(t) for t in purchases], store)
        assert x[9, FEATURE_INDEX["card_tx_1h"]] == 9
        assert x[9, FEATURE_INDEX["card_other_users_30d"]] == 2
        np.testing.assert_allclose(got, trained.result.model.score(x).probability, rtol=1e-9)

        # Outcomes reported on either replica, for transactions scored on the other, are known there
        # and land in the training data that train.load_outcomes reads from the shared store.
        assert await report(stub_a, "v3", risk_pb2.OUTCOME_CONFIRMED_FRAUD) is True  # scored on B
        assert await report(stub_b, "v4", risk_pb2.OUTCOME_LEGITIMATE) is True  # scored on A
        assert await report(stub_b, "never-scored") is False
    training = {r.tx.transaction_id: r.label for r in load_outcomes(settings_b, RatesTable.load())}
    assert training == {f"v{i}": {3: 1, 4: 0}.get(i) for i in range(10)}


async def test_served_scores_equal_the_training_path_on_shared_state(
    trained: Trained, tmp_path: Path, pg_url: str, redis_db: str
) -> None:
    """Parity through the shared backend: one call at a time, then a batch call (one Redis read for all
    of its transactions, later ones seeing earlier ones before anything is written)."""
    rows = [r.tx for r in trained.labelled[:240]]
    async with running(shared_settings(trained.models_dir, tmp_path / "a", pg_url, redis_db)) as (_, stub):
        got = [(await score(stub, to_proto(tx))).fraud_probability for tx in rows[:120]]
        batch = await stub.ScoreTransactions(
            risk_pb2.ScoreTransactionsRequest(transactions=[to_proto(tx) for tx in rows[120:]])
        )
    got += [a.fraud_probability for a in batch.assessments]
    expected = trained.result.model.score(trained.dataset.x[:240]).probability
    np.testing.assert_allclose(got, expected, rtol=1e-9)


# --- outages ---------------------------------------------------------------------------------------------
async def test_redis_down_is_unavailable_then_recovers(trained: Trained, tmp_path: Path, pg_url: str) -> None:
    with RedisServer() as rd:  # its own server: this test kills it
        settings = shared_settings(trained.models_dir, tmp_path / "state", pg_url, rd.url)
        base = now_ms() - 10 * MINUTE_MS
        async with running(settings) as (_, stub):

            def purchase(i: int) -> risk_pb2.Transaction:
                return good_transaction(
                    transaction_id=f"r{i}", card_fingerprint="outage", occurred_time=ts(base + i * 1000)
                )

            await score(stub, purchase(0))
            rd.kill9()
            await assert_unavailable(score(stub, purchase(1)))
            await assert_unavailable(
                stub.ScoreTransactions(risk_pb2.ScoreTransactionsRequest(transactions=[purchase(2)]))
            )
            assert await report(stub, "r0") is True  # labels need only PostgreSQL
            rd.start()

            async def scores() -> bool:
                return bool(await score(stub, purchase(3)))

            await eventually(scores, "scoring did not recover after Redis came back")
            store = StateStore(PostgresDatabase(pg_url, PG_PASSWORD, name="risk"), redis_of(rd.url))
            history = store.history(tx_from_proto(purchase(4)), HOUR_MS, HOUR_MS, HOUR_MS)
            assert len(history.card) == 2  # r0 (kept by Redis' append-only file) and r3; never r1, r2
            store.db.close()


async def test_postgres_down_is_unavailable_then_recovers(
    trained: Trained, tmp_path: Path, redis_db: str
) -> None:
    with PostgresServer() as pg:  # its own server: this test kills it
        # FULL: scored rows survive a crash of the database itself (NORMAL: a crash of the replica).
        settings = shared_settings(
            trained.models_dir, tmp_path / "state", pg.url(), redis_db, risk_state_synchronous="FULL"
        )
        base = now_ms() - 10 * MINUTE_MS
        async with running(settings) as (_, stub):
            await score(
                stub, good_transaction(transaction_id="p0", card_fingerprint="pg", occurred_time=ts(base))
            )
            pg.kill9()
            await assert_unavailable(report(stub, "p0"))
            # The scored log cannot be written, so the score is not acknowledged (and not counted).
            during = good_transaction(
                transaction_id="p1", card_fingerprint="pg", occurred_time=ts(base + 1000)
            )
            await assert_unavailable(score(stub, during))
            pg.start()

            async def reports() -> bool:
                return await report(stub, "p0")

            await eventually(reports, "outcomes did not recover after PostgreSQL came back")
        assert sql(pg.url(), "SELECT tx_id, outcome FROM risk_outcomes") == [
            ("p0", risk_pb2.OUTCOME_CHARGEBACK)
        ]
        assert sql(pg.url(), "SELECT tx_id FROM risk_scored") == [("p0",)]
        store = StateStore(PostgresDatabase(pg.url(), PG_PASSWORD, name="risk"), redis_of(redis_db))
        probe = Tx("probe", "user-1", "pg", 1.0, "EUR", base + 2000)
        assert len(store.history(probe, HOUR_MS, HOUR_MS, HOUR_MS).card) == 1  # p0 only
        store.db.close()
