"""Durable, append-only store of interactions and upserted items (SQLite in WAL mode).

``append`` commits its events in one transaction before it returns. With ``synchronous=FULL``
(the default) SQLite fsyncs the write-ahead log at every commit, so a committed event survives a
killed process and a power cut; ``NORMAL`` survives a killed process (kill -9) but may lose the last
commits on power loss. Readers are never blocked by the writer (WAL).

Erasure (``forget``) deletes the user's events and remembers only a salted hash of the id, so the
next training run drops that user from any input file too. Events the same id records after the
erasure are kept: from then on it is a new user.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import user_hash

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    type INTEGER NOT NULL,
    rating REAL,
    occurred REAL NOT NULL,
    market TEXT NOT NULL DEFAULT '',
    received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_user ON events (user_id);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    embedding BLOB,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS forgotten (
    user_hash TEXT PRIMARY KEY,
    forgotten REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    type: int  # InteractionType number: 1 view, 2 cart, 3 purchase, 4 rating
    rating: float | None
    occurred: float  # unix seconds
    market: str = ""
    seq: int = 0


@dataclass(frozen=True)
class StoredItem:
    item_id: str
    body: dict[str, object]
    embedding: np.ndarray | None
    seq: int


class EventStore:
    def __init__(self, path: Path | str, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be FULL, NORMAL or EXTRA")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._conn.executescript(SCHEMA)
        # AUTOINCREMENT never reuses a seq, even after erasure deleted the newest events
        self.last_seq = self._next_seq("events")
        self.items_seq = self._next_seq("items")
        self.forgotten_version = self._scalar("SELECT COUNT(*) FROM forgotten")
        self._forgotten = {row[0] for row in self._conn.execute("SELECT user_hash FROM forgotten")}

    def _next_seq(self, table: str) -> int:
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        return max(int(row[0]) if row else 0, self._scalar(f"SELECT COALESCE(MAX(seq), 0) FROM {table}"))

    def _scalar(self, sql: str, args: Sequence[object] = ()) -> int:
        return int(self._conn.execute(sql, args).fetchone()[0])

    # --- interactions ---
    def append(self, events: Sequence[Event]) -> list[int]:
        """Store events durably (one transaction, committed before returning); returns their seqs."""
        if not events:
            return []
        now = time.time()
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                seqs = []
                for e in events:
                    cur.execute(
                        "INSERT INTO events (user_id, item_id, type, rating, occurred, market, received)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (e.user_id, e.item_id, int(e.type), e.rating, float(e.occurred), e.market, now),
                    )
                    seqs.append(int(cur.lastrowid or 0))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            self.last_seq = max(self.last_seq, seqs[-1])
        return seqs

    def _rows_to_events(self, rows: Iterable[tuple]) -> Iterator[Event]:  # type: ignore[type-arg]
        for seq, user_id, item_id, type_, rating, occurred, market in rows:
            yield Event(user_id, item_id, int(type_), rating, float(occurred), market or "", int(seq))

    _COLS = "seq, user_id, item_id, type, rating, occurred, market"

    def events_since(self, seq: int = 0) -> list[Event]:
        with self._lock:
            rows = self._conn.execute(f"SELECT {self._COLS} FROM events WHERE seq > ? ORDER BY seq", (seq,))
            return list(self._rows_to_events(rows.fetchall()))

    def events_for_user(self, user_id: str) -> list[Event]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {self._COLS} FROM events WHERE user_id = ? ORDER BY seq", (user_id,)
            )
            return list(self._rows_to_events(rows.fetchall()))

    def count(self) -> int:
        with self._lock:
            return self._scalar("SELECT COUNT(*) FROM events")

    # --- erasure ---
    def forget(self, user_id: str) -> int:
        """Delete the user's events and remember the erasure; returns how many events were deleted."""
        hashed = user_hash(user_id)
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                deleted = cur.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount
                cur.execute(
                    "INSERT OR REPLACE INTO forgotten (user_hash, forgotten) VALUES (?, ?)",
                    (hashed, time.time()),
                )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            self._forgotten.add(hashed)
            self.forgotten_version += 1
        return int(deleted)

    def forgotten_hashes(self) -> frozenset[str]:
        return frozenset(self._forgotten)

    def is_forgotten(self, user_id: str) -> bool:
        return bool(self._forgotten) and user_hash(user_id) in self._forgotten

    # --- items ---
    def upsert_items(self, items: Sequence[tuple[str, dict[str, object], np.ndarray | None]]) -> None:
        now = time.time()
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for item_id, body, embedding in items:
                    blob = None if embedding is None else np.asarray(embedding, np.float32).tobytes()
                    cur.execute("DELETE FROM items WHERE item_id = ?", (item_id,))
                    cur.execute(
                        "INSERT INTO items (item_id, body, embedding, updated) VALUES (?, ?, ?, ?)",
                        (item_id, json.dumps(body, sort_keys=True), blob, now),
                    )
                self.items_seq = int(cur.lastrowid or self.items_seq)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def items(self, since: int = 0) -> list[StoredItem]:
        """Upserted items, oldest first; ``since``: only those written after that seq."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, item_id, body, embedding FROM items WHERE seq > ? ORDER BY seq", (since,)
            ).fetchall()
        out = []
        for seq, item_id, body, blob in rows:
            emb = None if blob is None else np.frombuffer(blob, dtype=np.float32).copy()
            out.append(StoredItem(item_id, json.loads(body), emb, int(seq)))
        return out

    def close(self) -> None:
        with self._lock:
            self._conn.close()
