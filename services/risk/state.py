"""Durable risk state in one SQLite file: velocity events, scored transactions and outcome labels.

Why SQLite in WAL mode: velocity features and outcome labels must survive a killed process, and a
checkout must not wait on a network hop. WAL with ``synchronous=NORMAL`` makes every committed batch
survive a process crash (``FULL`` also survives power loss, at an fsync per batch); readers (the
training command) never block the writer. Events expire by event time: anything older than the
retention (at least the longest feature window) behind the newest event is deleted, so replaying old
data ages out the same way live traffic does.

Training uses the same class on ``:memory:``, so the history a feature sees is computed by one code
path in both training and serving.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .features import DAY_MS, MAX_WINDOW_MS, Tx

log = logging.getLogger("cbec.risk.state")

SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    tx_id TEXT NOT NULL UNIQUE,
    ts INTEGER NOT NULL,
    card TEXT NOT NULL,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    amount_ref REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_card ON events (card, ts);
CREATE INDEX IF NOT EXISTS events_user ON events (user_id, ts);
CREATE INDEX IF NOT EXISTS events_device ON events (device_id, ts) WHERE device_id <> '';
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE TABLE IF NOT EXISTS cards (
    card TEXT PRIMARY KEY, first_ms INTEGER NOT NULL, first_tx_id TEXT NOT NULL, last_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scored (
    tx_id TEXT PRIMARY KEY,
    ts INTEGER NOT NULL,
    tx TEXT NOT NULL,
    fraud_probability REAL NOT NULL,
    anomaly_score REAL NOT NULL,
    decision INTEGER NOT NULL,
    model_version TEXT NOT NULL,
    scored_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS scored_ts ON scored (ts);
CREATE TABLE IF NOT EXISTS outcomes (
    tx_id TEXT PRIMARY KEY,
    outcome INTEGER NOT NULL,
    reported_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    note TEXT NOT NULL
);
"""

# Outcome enum values of cbec.risk.v1.Outcome (kept as ints so this module needs no protos).
OUTCOME_LEGITIMATE = 1
OUTCOME_CHARGEBACK = 2
OUTCOME_CONFIRMED_FRAUD = 3
FRAUD_OUTCOMES = frozenset({OUTCOME_CHARGEBACK, OUTCOME_CONFIRMED_FRAUD})


@dataclass(frozen=True, slots=True)
class History:
    """What happened before one transaction, within the look-back window (newest first)."""

    #: (ts_ms, amount_ref, user_id, device_id) of the card's earlier transactions.
    card: list[tuple[int, float, str, str]]
    #: ts_ms of the account's earlier transactions.
    user: list[int]
    #: (ts_ms, card) of the device's earlier transactions (empty without a device id).
    device: list[tuple[int, str]]
    #: When the card was first seen (kept longer than events), None for a new card.
    card_first_ms: int | None


@dataclass(frozen=True)
class ScoredRow:
    tx: Tx
    fraud_probability: float
    anomaly_score: float
    decision: int
    model_version: str


@dataclass(frozen=True)
class LabelledTx:
    tx: Tx
    #: 1 fraud, 0 legitimate, None when no outcome was reported (history only).
    label: int | None


class StateStore:
    """One SQLite connection guarded by a lock; ``batch()`` wraps a unit of work in one transaction."""

    def __init__(
        self,
        path: Path | str,
        event_retention_ms: int = 35 * DAY_MS,
        card_retention_ms: int = 400 * DAY_MS,
        scored_retention_ms: int = 180 * DAY_MS,
        history_limit: int = 2000,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        expire_every: int = 2000,
        read_only: bool = False,
    ) -> None:
        if event_retention_ms < MAX_WINDOW_MS:
            raise ValueError(
                f"event retention ({event_retention_ms} ms) is shorter than the longest feature "
                f"window ({MAX_WINDOW_MS} ms); features would change when events expire"
            )
        self.path = str(path)
        self.event_retention_ms = event_retention_ms
        self.card_retention_ms = card_retention_ms
        self.scored_retention_ms = scored_retention_ms
        self.history_limit = history_limit
        self.expire_every = expire_every
        self._since_expiry = 0
        self._lock = threading.RLock()
        if read_only:
            uri = f"file:{Path(self.path).resolve()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            if self.path != ":memory:":
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise RuntimeError(f"SQLite refused WAL mode for {self.path} (got {mode})")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.executescript(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
            )
        self._db.execute("PRAGMA busy_timeout=5000")
        self._in_batch = False

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- units of work ---------------------------------------------------------------------------
    @contextmanager
    def batch(self) -> Iterator[StateStore]:
        """Hold the lock and one write transaction; commit on success (the durability point)."""
        with self._lock:
            if self._in_batch:  # nested: join the outer transaction
                yield self
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._in_batch = True
            try:
                yield self
                if self._since_expiry >= self.expire_every:
                    self._expire()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._in_batch = False

    # --- velocity ------------------------------------------------------------------------------------
    def history(self, tx: Tx, card_window_ms: int, user_window_ms: int, device_window_ms: int) -> History:
        """The card's, account's and device's transactions in ``(t - window, t]``, newest first,
        excluding ``tx`` itself (so re-scoring a transaction does not count it twice)."""
        t, limit, db, tx_id = tx.occurred_ms, self.history_limit, self._db, tx.transaction_id
        card = db.execute(
            "SELECT ts, amount_ref, user_id, device_id FROM events WHERE card = ? AND ts > ? AND ts <= ? "
            "AND tx_id <> ? ORDER BY ts DESC LIMIT ?",
            (tx.card, t - card_window_ms, t, tx_id, limit),
        ).fetchall()
        user = [
            row[0]
            for row in db.execute(
                "SELECT ts FROM events WHERE user_id = ? AND ts > ? AND ts <= ? AND tx_id <> ? "
                "ORDER BY ts DESC LIMIT ?",
                (tx.user_id, t - user_window_ms, t, tx_id, limit),
            )
        ]
        device: list[tuple[int, str]] = []
        if tx.device:
            device = db.execute(
                "SELECT ts, card FROM events WHERE device_id = ? AND ts > ? AND ts <= ? AND tx_id <> ? "
                "ORDER BY ts DESC LIMIT ?",
                (tx.device, t - device_window_ms, t, tx_id, limit),
            ).fetchall()
        first = db.execute("SELECT first_ms, first_tx_id FROM cards WHERE card = ?", (tx.card,)).fetchone()
        # A card whose first transaction is this one (being re-scored) is still new.
        first_ms = None if first is None or first[1] == tx_id else int(first[0])
        return History(card, user, device, first_ms)

    def record_event(self, tx: Tx, amount_ref: float) -> None:
        """Remember a transaction for later velocity features (idempotent per transaction id)."""
        db = self._db
        db.execute(
            "INSERT OR IGNORE INTO events (tx_id, ts, card, user_id, device_id, amount_ref) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (tx.transaction_id, tx.occurred_ms, tx.card, tx.user_id, tx.device, amount_ref),
        )
        db.execute(
            "INSERT INTO cards (card, first_ms, first_tx_id, last_ms) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (card) DO UPDATE SET "
            "first_tx_id = CASE WHEN excluded.first_ms < first_ms "
            "THEN excluded.first_tx_id ELSE first_tx_id END, "
            "first_ms = min(first_ms, excluded.first_ms), last_ms = max(last_ms, excluded.last_ms)",
            (tx.card, tx.occurred_ms, tx.transaction_id, tx.occurred_ms),
        )
        self._since_expiry += 1

    def _expire(self) -> dict[str, int]:
        """Delete what is older than its retention behind the newest event (event time)."""
        self._since_expiry = 0
        newest = self._db.execute("SELECT max(ts) FROM events").fetchone()[0]
        if newest is None:
            return {"events": 0, "cards": 0, "scored": 0}
        db = self._db
        events = db.execute("DELETE FROM events WHERE ts <= ?", (newest - self.event_retention_ms,)).rowcount
        cards = db.execute(
            "DELETE FROM cards WHERE last_ms <= ?", (newest - self.card_retention_ms,)
        ).rowcount
        scored = db.execute(
            "DELETE FROM scored WHERE ts <= ? AND tx_id NOT IN (SELECT tx_id FROM outcomes)",
            (newest - self.scored_retention_ms,),
        ).rowcount
        if events or cards or scored:
            log.debug("expired risk state", extra={"events": events, "cards": cards, "scored": scored})
        return {"events": events, "cards": cards, "scored": scored}

    def expire(self) -> dict[str, int]:
        """Expire now (also done every ``expire_every`` recorded events)."""
        with self.batch():
            return self._expire()

    # --- scored transactions and outcomes ----------------------------------------------------------------
    def record_scored(self, rows: list[ScoredRow], now_ms: int | None = None) -> None:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        self._db.executemany(
            "INSERT OR REPLACE INTO scored (tx_id, ts, tx, fraud_probability, anomaly_score, decision, "
            "model_version, scored_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.tx.transaction_id,
                    r.tx.occurred_ms,
                    r.tx.to_json(),
                    r.fraud_probability,
                    r.anomaly_score,
                    r.decision,
                    r.model_version,
                    now_ms,
                )
                for r in rows
            ],
        )

    def record_outcome(self, tx_id: str, outcome: int, reported_ms: int, note: str = "") -> bool:
        """Store (or replace) a label durably; True when the transaction was scored here."""
        with self.batch():
            self._db.execute(
                "INSERT OR REPLACE INTO outcomes (tx_id, outcome, reported_ms, received_ms, note) "
                "VALUES (?, ?, ?, ?, ?)",
                (tx_id, outcome, reported_ms, int(time.time() * 1000), note),
            )
            known = self._db.execute("SELECT 1 FROM scored WHERE tx_id = ?", (tx_id,)).fetchone()
        return known is not None

    def outcome(self, tx_id: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT outcome FROM outcomes WHERE tx_id = ?", (tx_id,)).fetchone()
        return None if row is None else int(row[0])

    def labelled_transactions(self) -> list[LabelledTx]:
        """Every stored scored transaction with its label (None without an outcome), in time order.

        The training command replays all of them (labelled or not) so velocity features see the same
        history they had at scoring time; only labelled ones become training rows.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT s.tx, o.outcome FROM scored s LEFT JOIN outcomes o ON o.tx_id = s.tx_id "
                "ORDER BY s.ts, s.tx_id"
            ).fetchall()
        out = []
        for tx_json, outcome in rows:
            label = None if outcome is None else int(int(outcome) in FRAUD_OUTCOMES)
            out.append(LabelledTx(Tx.from_json(tx_json), label))
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                table: int(self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                for table in ("events", "cards", "scored", "outcomes")
            }
