"""The embedded state store: WAL, transactions, expiry, durable outcomes, concurrent readers, the upgrade
from the previous version's file. (The shared backend: test_shared.py.)"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from services.risk.config import RiskSettings
from services.risk.features import DAY_MS, MAX_WINDOW_MS, Tx
from services.risk.server import build
from services.risk.state import (
    OUTCOME_CHARGEBACK,
    OUTCOME_CONFIRMED_FRAUD,
    OUTCOME_LEGITIMATE,
    ScoredRow,
    StateStore,
)
from services.runtime.config import ConfigError, load_settings
from services.runtime.server import Server
from tests.risk.conftest import risk_settings

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
    # A retried report's first attempt landing late (an older report) does not undo the newer one.
    store.record_outcome("t1", OUTCOME_LEGITIMATE, T)
    assert store.outcome("t1") == OUTCOME_CHARGEBACK
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


LEGACY_SCHEMA = """
CREATE TABLE events (tx_id TEXT NOT NULL UNIQUE, ts INTEGER NOT NULL, card TEXT NOT NULL,
    user_id TEXT NOT NULL, device_id TEXT NOT NULL, amount_ref REAL NOT NULL);
CREATE TABLE cards (card TEXT PRIMARY KEY, first_ms INTEGER NOT NULL, first_tx_id TEXT NOT NULL,
    last_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE scored (tx_id TEXT PRIMARY KEY, ts INTEGER NOT NULL, tx TEXT NOT NULL,
    fraud_probability REAL NOT NULL, anomaly_score REAL NOT NULL, decision INTEGER NOT NULL,
    model_version TEXT NOT NULL, scored_ms INTEGER NOT NULL);
CREATE TABLE outcomes (tx_id TEXT PRIMARY KEY, outcome INTEGER NOT NULL, reported_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL, note TEXT NOT NULL);
"""


def test_state_left_by_the_previous_version_is_imported_once(tmp_path: Path) -> None:
    """An upgrade keeps the labels and velocity of ``var/risk/state.sqlite3`` (the old default)."""
    legacy = tmp_path / "risk" / "state.sqlite3"
    legacy.parent.mkdir()
    old = sqlite3.connect(legacy)
    old.executescript(LEGACY_SCHEMA)
    old.execute("INSERT INTO events VALUES ('t1', ?, 'C', 'U', 'D', 10.0)", (T,))
    old.execute("INSERT INTO cards VALUES ('C', ?, 't1', ?)", (T, T))
    old.execute("INSERT INTO scored VALUES ('t1', ?, ?, 0.2, 0.1, 1, 'v0', ?)", (T, tx(1, T).to_json(), T))
    old.execute("INSERT INTO outcomes VALUES ('t1', 3, ?, ?, 'bank')", (T, T))
    old.commit()
    old.close()
    store = StateStore(tmp_path / "risk.sqlite3")
    assert store.import_legacy(legacy) == {"scored": 1, "outcomes": 1, "events": 1}
    assert not legacy.exists() and legacy.with_name("state.sqlite3.imported").exists()
    assert store.import_legacy(legacy) is None
    assert [(r.tx, r.label) for r in store.labelled_transactions()] == [(tx(1, T), 1)]
    history = store.history(tx(2, T + 1000), DAY_MS, DAY_MS, DAY_MS)
    assert history.card == [(T, 10.0, "U", "D")] and history.card_first_ms == T


def test_the_state_path_setting_is_gone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A deployment that still sets it must not start on an empty store somewhere else."""
    assert load_settings(RiskSettings, "risk").risk_state_path == ""
    monkeypatch.setenv("CBEC_RISK_STATE_PATH", str(tmp_path / "old.sqlite3"))
    with pytest.raises(ConfigError):
        load_settings(RiskSettings, "risk")


def test_the_service_imports_the_old_file_from_its_state_dir(tmp_path: Path) -> None:
    legacy = tmp_path / "state" / "risk" / "state.sqlite3"
    legacy.parent.mkdir(parents=True)
    old = sqlite3.connect(legacy)
    old.executescript(LEGACY_SCHEMA)
    old.execute("INSERT INTO outcomes VALUES ('t1', 2, ?, ?, '')", (T, T))
    old.commit()
    old.close()
    srv = Server(risk_settings(tmp_path / "no-models", tmp_path / "state"), build)
    try:
        assert srv.service.state.outcome("t1") == OUTCOME_CHARGEBACK
        assert (tmp_path / "state" / "risk.sqlite3").exists()
    finally:
        srv.service.state.db.close()
