"""The SQLite state store: WAL, transactions, expiry, durable outcomes, concurrent readers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from services.risk.features import DAY_MS, MAX_WINDOW_MS, Tx
from services.risk.state import (
    OUTCOME_CHARGEBACK,
    OUTCOME_CONFIRMED_FRAUD,
    OUTCOME_LEGITIMATE,
    ScoredRow,
    StateStore,
)

T = 1_780_000_000_000


def tx(i: int, ts: int, card: str = "C") -> Tx:
    return Tx(f"t{i}", "U", card, 10.0, "USD", ts, device="D")


def test_file_store_uses_wal(tmp_path: Path) -> None:
    StateStore(tmp_path / "s.sqlite3").close()
    db = sqlite3.connect(tmp_path / "s.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_retention_must_cover_the_feature_windows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="window"):
        StateStore(tmp_path / "s.sqlite3", event_retention_ms=MAX_WINDOW_MS - 1)


def test_failed_batch_rolls_back(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.sqlite3")
    with pytest.raises(RuntimeError), store.batch():
        store.record_event(tx(1, T), 10.0)
        raise RuntimeError("crash mid-batch")
    assert store.counts()["events"] == 0


def test_expiry_by_event_time(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.sqlite3", event_retention_ms=35 * DAY_MS, card_retention_ms=40 * DAY_MS)
    with store.batch():
        store.record_event(tx(1, T - 100 * DAY_MS, card="old"), 1.0)
        store.record_event(tx(2, T - 36 * DAY_MS), 1.0)
        store.record_event(tx(3, T - 34 * DAY_MS), 1.0)
        store.record_event(tx(4, T), 1.0)
        store.record_scored([ScoredRow(tx(1, T - 100 * DAY_MS, card="old"), 0.1, 0.1, 1, "v")])
        store.record_scored([ScoredRow(tx(2, T - 200 * DAY_MS), 0.1, 0.1, 1, "v")])
        store.record_scored([ScoredRow(tx(5, T - 300 * DAY_MS), 0.1, 0.1, 1, "v")])
    store.record_outcome("t5", OUTCOME_CHARGEBACK, T)
    deleted = store.expire()
    assert deleted["events"] == 2  # t1 and t2 are more than 35 days behind the newest event
    assert deleted["cards"] == 1  # "old", last seen 100 days before the newest event
    assert deleted["scored"] == 1  # t2 expires; t1 is recent enough; t5 has a label and is kept
    ids = [r.tx.transaction_id for r in store.labelled_transactions()]
    assert sorted(ids) == ["t1", "t5"]


def test_expiry_runs_on_its_own_every_n_events(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.sqlite3", expire_every=3)
    with store.batch():
        store.record_event(tx(1, T - 100 * DAY_MS), 1.0)
        store.record_event(tx(2, T), 1.0)
        store.record_event(tx(3, T), 1.0)
    assert store.counts()["events"] == 2


def test_outcomes_are_durable_and_labelled(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = StateStore(path)
    with store.batch():
        store.record_scored([ScoredRow(tx(i, T + i), 0.5, 0.5, 2, "v1") for i in range(4)])
    assert store.record_outcome("t0", OUTCOME_CONFIRMED_FRAUD, T) is True
    assert store.record_outcome("t1", OUTCOME_LEGITIMATE, T) is True
    assert store.record_outcome("t2", OUTCOME_CHARGEBACK, T, "bank notice") is True
    assert store.record_outcome("never-scored", OUTCOME_CHARGEBACK, T) is False
    store.record_outcome("t1", OUTCOME_CHARGEBACK, T + 1)  # a later report replaces the earlier one
    store.close()

    reopened = StateStore(path, read_only=True)
    assert reopened.outcome("never-scored") == OUTCOME_CHARGEBACK
    labels = {r.tx.transaction_id: r.label for r in reopened.labelled_transactions()}
    assert labels == {"t0": 1, "t1": 1, "t2": 1, "t3": None}
    assert reopened.labelled_transactions()[0].tx == tx(0, T)


def test_reader_sees_commits_while_writer_is_open(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    writer = StateStore(path)
    reader = StateStore(path, read_only=True)
    with writer.batch():
        writer.record_scored([ScoredRow(tx(1, T), 0.2, 0.3, 1, "v")])
    assert reader.counts()["scored"] == 1
    with pytest.raises(sqlite3.OperationalError):
        reader.record_outcome("t1", OUTCOME_LEGITIMATE, T)
