"""Interactions, upserted items and erasures: the recommender's repository over the runtime ``Database``.

The store is the system of record: the embedded SQLite file ``<CBEC_STATE_DIR>/recommender.sqlite3``
(one replica, the default) or the shared PostgreSQL (any number of replicas). Every write commits
before its method returns, so an acknowledged ``RecordInteractions`` survives ``kill -9`` of the
process (SQLite ``synchronous=FULL`` also survives a power cut; ``NORMAL`` only a killed process).

Three ordered logs (``recommender_events``, ``recommender_items``, ``recommender_forgotten``), each
tailed by ``seq > last`` through its primary key. Writers take the log's ``tx.lock`` so seq order equals
commit order (a reader never skips a row that commits late) and ``tx.notify`` the log's channel at
commit, with the newest seq as payload: ``follow`` hands those notifications, from every replica, to
the serving side, which folds in what it has not seen (``Engine.catch_up``).

Erasure (``forget``) deletes the user's events and remembers only a salted hash of the id, so the
next training run drops that user from any input file too. Events the same id records after the
erasure are kept: from then on it is a new user.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from services.runtime.state import (
    Database,
    Migration,
    SqliteDatabase,
    StateConfig,
    StoreUnavailable,
    open_database,
)

from .data import TYPE_NAMES, user_hash

COMPONENT = "recommender"
STORE_NAME = "recommender"  # <state dir>/recommender.sqlite3 when embedded
EVENTS, ITEMS, FORGOTTEN = "recommender_events", "recommender_items", "recommender_forgotten"
CHANNELS = (EVENTS, ITEMS, FORGOTTEN)  # one LISTEN/NOTIFY channel per log, named after its table
_INSERT_CHUNK = 200  # rows per multi-row INSERT (7 parameters each)
log = logging.getLogger("cbec.recommender.events")

MIGRATIONS = [
    Migration(
        f"""
        CREATE TABLE IF NOT EXISTS {EVENTS} (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id TEXT NOT NULL,
            item_id TEXT NOT NULL,
            type INTEGER NOT NULL,
            rating REAL,
            occurred REAL NOT NULL,
            market TEXT NOT NULL DEFAULT '',
            received REAL NOT NULL
        );
        CREATE INDEX IF NOT EXISTS {EVENTS}_user ON {EVENTS} (user_id, seq);
        CREATE TABLE IF NOT EXISTS {ITEMS} (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            item_id TEXT NOT NULL UNIQUE,
            body TEXT NOT NULL,
            embedding BLOB,
            updated REAL NOT NULL
        );
        CREATE TABLE IF NOT EXISTS {FORGOTTEN} (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            user_hash TEXT NOT NULL UNIQUE,
            forgotten REAL NOT NULL
        );
        """
    ),
]


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


#: ``(channel, payload)``: payload is the newest seq written, or None after a listener reconnect.
ChangeListener = Callable[[str, "str | None"], None]


class EventStore:
    """The recommender's repository. ``source``: a runtime ``Database`` or the path of a SQLite file.

    ``tolerate_outage``: a store that is down at start does not stop the caller (a serving replica
    starts on its model and reports the store NOT_SERVING); schema and positions are read on first
    use instead, and every call until then raises StoreUnavailable.
    """

    def __init__(
        self, source: Database | Path | str, synchronous: str = "FULL", tolerate_outage: bool = False
    ) -> None:
        if isinstance(source, Database):
            self.db = source
            self._owns_db = False
        else:
            if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
                raise ValueError("synchronous must be FULL, NORMAL or EXTRA")
            self.db = SqliteDatabase(source, name=STORE_NAME, synchronous=synchronous)
            self._owns_db = True
        self._lock = threading.Lock()
        self._ready = False
        # Highest seq known to exist (own writes and other replicas' notifications): a hint for
        # readers, never a read position (those live with the reader, e.g. Engine.applied_seq).
        self.last_seq = 0
        self.items_seq = 0
        # Erasures are kept in memory: the serving path asks ``is_forgotten`` on every request.
        self._forgotten: set[str] = set()
        self._forgotten_log: list[tuple[int, str]] = []  # (seq, hash) read from the store, by seq
        self.forgotten_seq = 0  # read position in the erasure log
        self.forgotten_known = 0  # highest erasure seq known to be committed
        try:
            self._ensure()
        except StoreUnavailable as exc:
            if not tolerate_outage:
                raise
            log.warning("event store unavailable at start", extra={"error": str(exc)[:200]})

    def _ensure(self) -> None:
        """Migrate and read the positions once (at start, or on first use after an outage)."""
        if self._ready:
            return
        self.db.migrate(COMPONENT, MIGRATIONS)
        last, items = self._max_seq(EVENTS), self._max_seq(ITEMS)
        with self._lock:
            self.last_seq = max(self.last_seq, last)
            self.items_seq = max(self.items_seq, items)
        self._ready = True
        self.refresh_forgotten()

    @classmethod
    def open(cls, config: StateConfig, synchronous: str = "FULL") -> EventStore:
        """The store the ``CBEC_*`` settings name (what the server and a training job both open);
        ``close()`` closes its database too."""
        store = cls(open_database(config, STORE_NAME, synchronous))
        store._owns_db = True
        return store

    @property
    def path(self) -> Path | None:
        """The SQLite file (embedded backend), None on PostgreSQL."""
        return Path(self.db.path) if isinstance(self.db, SqliteDatabase) else None

    def _max_seq(self, table: str) -> int:
        return int(self.db.scalar(f"SELECT COALESCE(MAX(seq), 0) FROM {table}") or 0)

    # --- change feed ---------------------------------------------------------------------------------
    def follow(self, listener: ChangeListener) -> None:
        """Call ``listener(channel, payload)`` on every committed write to any of the three logs, from
        any replica (in-process for the embedded backend). It runs on the notifying thread: keep it
        cheap and fold in elsewhere."""
        for channel in CHANNELS:
            self.db.listen(channel, functools.partial(self._notified, channel, listener=listener))

    def _notified(self, channel: str, payload: str | None, listener: ChangeListener) -> None:
        if payload:
            try:
                seq = int(payload)
            except ValueError:
                seq = 0
            with self._lock:
                if channel == EVENTS:
                    self.last_seq = max(self.last_seq, seq)
                elif channel == ITEMS:
                    self.items_seq = max(self.items_seq, seq)
                else:
                    self.forgotten_known = max(self.forgotten_known, seq)
        listener(channel, payload)

    # --- interactions --------------------------------------------------------------------------------
    def append(self, events: Sequence[Event]) -> list[int]:
        """Store events durably (one transaction, committed before returning); returns their seqs."""
        if not events:
            return []
        self._ensure()
        now = time.time()
        seqs: list[int] = []
        with self.db.transaction() as tx:
            tx.lock(EVENTS)  # seq order = commit order for readers tailing seq > last
            for start in range(0, len(events), _INSERT_CHUNK):
                chunk = events[start : start + _INSERT_CHUNK]
                values = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
                params: list[Any] = []
                for e in chunk:
                    rating = None if e.rating is None else float(e.rating)
                    params += [e.user_id, e.item_id, int(e.type), rating, float(e.occurred), e.market, now]
                rows = tx.all(
                    f"INSERT INTO {EVENTS} (user_id, item_id, type, rating, occurred, market, received)"
                    f" VALUES {values} RETURNING seq",
                    params,
                )
                # both engines number the VALUES rows in order; RETURNING's row order is not promised
                seqs += sorted(int(r[0]) for r in rows)
            tx.notify(EVENTS, str(seqs[-1]))
        with self._lock:
            self.last_seq = max(self.last_seq, seqs[-1])
        return seqs

    _COLS = "seq, user_id, item_id, type, rating, occurred, market"

    @staticmethod
    def _rows_to_events(rows: Iterable[tuple[Any, ...]]) -> Iterator[Event]:
        for seq, user_id, item_id, type_, rating, occurred, market in rows:
            rating = None if rating is None else float(rating)
            yield Event(user_id, item_id, int(type_), rating, float(occurred), market or "", int(seq))

    def events_since(self, seq: int = 0, limit: int | None = None) -> list[Event]:
        """Events with a seq above ``seq``, oldest first (at most ``limit``), read through the seq index."""
        self._ensure()
        sql = f"SELECT {self._COLS} FROM {EVENTS} WHERE seq > ? ORDER BY seq"
        params: list[Any] = [int(seq)]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        events = list(self._rows_to_events(self.db.all(sql, params)))
        if events:
            with self._lock:
                self.last_seq = max(self.last_seq, events[-1].seq)
        return events

    def events_for_user(self, user_id: str) -> list[Event]:
        self._ensure()
        rows = self.db.all(f"SELECT {self._COLS} FROM {EVENTS} WHERE user_id = ? ORDER BY seq", (user_id,))
        return list(self._rows_to_events(rows))

    def interactions_frame(self, batch: int = 200_000) -> tuple[pd.DataFrame, int]:
        """Every stored event as a training input (``user_id, item_id, type, rating, timestamp,
        market``; type as a name) and the highest seq read: what a model trained on it covers."""
        self._ensure()
        frames: list[pd.DataFrame] = []
        last = 0
        while True:
            rows = self.db.all(
                f"SELECT {self._COLS} FROM {EVENTS} WHERE seq > ? ORDER BY seq LIMIT ?", (last, batch)
            )
            if not rows:
                break
            frame = pd.DataFrame(
                rows, columns=["seq", "user_id", "item_id", "type", "rating", "timestamp", "market"]
            )
            last = int(frame["seq"].iloc[-1])
            frames.append(frame.drop(columns="seq"))
            if len(rows) < batch:
                break
        columns = ["user_id", "item_id", "type", "rating", "timestamp", "market"]
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        df["type"] = df["type"].map(lambda t: TYPE_NAMES.get(int(t), "view")).astype(object)
        df["rating"] = pd.to_numeric(df["rating"], errors="coerce").astype(float)
        df["timestamp"] = pd.to_numeric(df["timestamp"]).astype(float)
        df["market"] = df["market"].fillna("").astype(str)
        return df, last

    def count(self) -> int:
        self._ensure()
        return int(self.db.scalar(f"SELECT COUNT(*) FROM {EVENTS}") or 0)

    # --- erasure -------------------------------------------------------------------------------------
    def forget(self, user_id: str) -> int:
        """Delete the user's events and remember the erasure; returns how many events were deleted."""
        self._ensure()
        hashed = user_hash(user_id)
        with self.db.transaction() as tx:
            tx.lock(FORGOTTEN)
            deleted = tx.execute(f"DELETE FROM {EVENTS} WHERE user_id = ?", (user_id,))
            # a fresh seq even for a repeated erasure, so every replica drops what came since
            tx.execute(f"DELETE FROM {FORGOTTEN} WHERE user_hash = ?", (hashed,))
            seq = int(
                tx.scalar(
                    f"INSERT INTO {FORGOTTEN} (user_hash, forgotten) VALUES (?, ?) RETURNING seq",
                    (hashed, time.time()),
                )
            )
            tx.notify(FORGOTTEN, str(seq))
        with self._lock:
            # effective here at once; the log position advances only by reading (refresh_forgotten),
            # so another replica's erasure with a lower seq is never skipped
            self._forgotten.add(hashed)
            self.forgotten_known = max(self.forgotten_known, seq)
        return int(deleted)

    def refresh_forgotten(self) -> None:
        """Read the erasures recorded since the last read (any replica's), through the seq index."""
        self._ensure()
        known = self.forgotten_known  # committed before this read: the read sees every row up to it
        rows = self.db.all(
            f"SELECT seq, user_hash FROM {FORGOTTEN} WHERE seq > ? ORDER BY seq", (self.forgotten_seq,)
        )
        with self._lock:
            for seq, hashed in rows:
                if int(seq) > self.forgotten_seq:
                    self._forgotten_log.append((int(seq), str(hashed)))
                    self._forgotten.add(str(hashed))
                    self.forgotten_seq = int(seq)
            # rows up to ``known`` that were not read were replaced by a repeated erasure since
            self.forgotten_seq = max(self.forgotten_seq, known)
            self.forgotten_known = max(self.forgotten_known, self.forgotten_seq)

    def forgotten_after(self, seq: int) -> tuple[list[str], int]:
        """Hashes erased after log position ``seq`` (as read so far) and the position they reach."""
        with self._lock:
            start = bisect.bisect_right(self._forgotten_log, (seq, "\uffff"))
            return [h for _, h in self._forgotten_log[start:]], max(seq, self.forgotten_seq)

    @property
    def forgotten_version(self) -> int:
        return len(self._forgotten)

    def forgotten_hashes(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._forgotten)

    def is_forgotten(self, user_id: str) -> bool:
        return bool(self._forgotten) and user_hash(user_id) in self._forgotten

    # --- items ---------------------------------------------------------------------------------------
    def upsert_items(self, items: Sequence[tuple[str, dict[str, object], np.ndarray | None]]) -> None:
        """Insert or replace items; a replaced item gets a new seq so every reader sees the change."""
        if not items:
            return
        self._ensure()
        now = time.time()
        last = 0
        with self.db.transaction() as tx:
            tx.lock(ITEMS)
            for item_id, body, embedding in items:
                blob = None if embedding is None else np.asarray(embedding, np.float32).tobytes()
                tx.execute(f"DELETE FROM {ITEMS} WHERE item_id = ?", (item_id,))
                last = int(
                    tx.scalar(
                        f"INSERT INTO {ITEMS} (item_id, body, embedding, updated) VALUES (?, ?, ?, ?)"
                        " RETURNING seq",
                        (item_id, json.dumps(body, sort_keys=True), blob, now),
                    )
                )
            tx.notify(ITEMS, str(last))
        with self._lock:
            self.items_seq = max(self.items_seq, last)

    def items(self, since: int = 0) -> list[StoredItem]:
        """Upserted items, oldest first; ``since``: only those written after that seq."""
        self._ensure()
        rows = self.db.all(
            f"SELECT seq, item_id, body, embedding FROM {ITEMS} WHERE seq > ? ORDER BY seq", (int(since),)
        )
        out = []
        for seq, item_id, body, blob in rows:
            emb = None if blob is None else np.frombuffer(bytes(blob), dtype=np.float32).copy()
            out.append(StoredItem(item_id, json.loads(body), emb, int(seq)))
        if out:
            with self._lock:
                self.items_seq = max(self.items_seq, out[-1].seq)
        return out

    # --- upgrade -------------------------------------------------------------------------------------
    def import_legacy(self, path: Path | str) -> int:
        """Move a pre-state-layer event file (tables ``events``, ``items``, ``forgotten``) into this
        store when it holds no events yet, in one transaction, then rename the file ``*.imported``.
        Returns how many events were imported."""
        import sqlite3

        path = Path(path)
        if not path.is_file():
            return 0
        self._ensure()
        if self.db.scalar(f"SELECT seq FROM {EVENTS} ORDER BY seq LIMIT 1") is not None:
            return 0
        old = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
        try:
            events = old.execute(
                "SELECT user_id, item_id, type, rating, occurred, market, received FROM events ORDER BY seq"
            ).fetchall()
            items = old.execute("SELECT item_id, body, embedding, updated FROM items ORDER BY seq").fetchall()
            erased = old.execute("SELECT user_hash, forgotten FROM forgotten").fetchall()
        except sqlite3.Error as exc:
            log.warning("not a legacy event file", extra={"path": str(path), "error": str(exc)[:200]})
            return 0
        finally:
            old.close()
        with self.db.transaction() as tx:  # one unit: a failed import leaves the store as it was
            for table in (EVENTS, ITEMS, FORGOTTEN):
                tx.lock(table)
            tx.executemany(
                f"INSERT INTO {ITEMS} (item_id, body, embedding, updated) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (item_id) DO NOTHING",
                [(i, b, None if e is None else bytes(e), float(t)) for i, b, e, t in items],
            )
            tx.executemany(
                f"INSERT INTO {FORGOTTEN} (user_hash, forgotten) VALUES (?, ?)"
                " ON CONFLICT (user_hash) DO NOTHING",
                [(str(h), float(t)) for h, t in erased],
            )
            tx.executemany(
                f"INSERT INTO {EVENTS} (user_id, item_id, type, rating, occurred, market, received)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (u, i, int(t), None if r is None else float(r), float(o), m or "", float(rc))
                    for u, i, t, r, o, m, rc in events
                ],
            )
            for table in (EVENTS, ITEMS, FORGOTTEN):
                tx.notify(table, "")
        path.rename(path.with_name(path.name + ".imported"))
        last, items_last = self._max_seq(EVENTS), self._max_seq(ITEMS)
        with self._lock:
            self.last_seq = max(self.last_seq, last)
            self.items_seq = max(self.items_seq, items_last)
        self.refresh_forgotten()
        return len(events)

    def close(self) -> None:
        """Close the database when this store opened it (the runtime closes the ones it opened)."""
        if self._owns_db:
            self.db.close()
