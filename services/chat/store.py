"""SQLite state of the chat service: knowledge articles (with their embeddings), sessions with a
time-to-live and bounded history, and the order store the order actions read.

One file, WAL journal, ``synchronous=FULL``: an accepted upsert or turn survives a crash. Every order
query carries the caller's user id in its WHERE clause, so no message text can widen it to another
customer's orders.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS articles (
    article_id TEXT NOT NULL, language TEXT NOT NULL, topic TEXT NOT NULL, title TEXT NOT NULL,
    body TEXT NOT NULL, tags TEXT NOT NULL, origin TEXT NOT NULL, content_hash TEXT NOT NULL,
    embedding BLOB, updated REAL NOT NULL, PRIMARY KEY (article_id, language));
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires);
CREATE TABLE IF NOT EXISTS turns (
    session_id TEXT NOT NULL, seq INTEGER NOT NULL, role INTEGER NOT NULL, text TEXT NOT NULL,
    intent TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (session_id, seq));
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, status TEXT NOT NULL, carrier TEXT NOT NULL,
    tracking_number TEXT NOT NULL, destination TEXT NOT NULL, eta TEXT NOT NULL,
    delivered_date TEXT NOT NULL, items TEXT NOT NULL, total REAL NOT NULL, currency TEXT NOT NULL,
    created TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS orders_user ON orders (user_id);
CREATE TABLE IF NOT EXISTS returns (
    return_id TEXT PRIMARY KEY, order_id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL, created REAL NOT NULL);
"""

SESSION_ID_LEN = 32


@dataclass
class ArticleRecord:
    article_id: str
    language: str
    topic: str
    title: str
    body: str
    tags: list[str] = field(default_factory=list)
    origin: str = "api"
    embedding: np.ndarray | None = None

    @property
    def content_hash(self) -> str:
        raw = json.dumps([self.topic, self.title, self.body, self.tags], ensure_ascii=False)
        return hashlib.sha256(raw.encode()).hexdigest()

    @property
    def passage(self) -> str:
        """What is embedded and indexed: title, tags and body."""
        tags = ", ".join(self.tags)
        return f"{self.title}. {tags}. {self.body}" if tags else f"{self.title}. {self.body}"


@dataclass
class TurnRecord:
    role: int
    text: str
    intent: str
    created: float


@dataclass
class SessionRecord:
    session_id: str
    user_id: str
    created: float
    expires: float
    turns: list[TurnRecord] = field(default_factory=list)


@dataclass
class OrderRecord:
    order_id: str
    user_id: str
    status: str
    carrier: str
    tracking_number: str
    destination: str
    eta: str
    delivered_date: str
    items: list[str]
    total: float
    currency: str
    created: str


def new_session_id() -> str:
    return uuid.uuid4().hex


def valid_session_id(session_id: str) -> bool:
    return len(session_id) == SESSION_ID_LEN and all(c in "0123456789abcdef" for c in session_id)


class ChatStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- knowledge ------------------------------------------------------------------------------
    def articles(self) -> list[ArticleRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT article_id, language, topic, title, body, tags, origin, embedding FROM articles "
                "ORDER BY article_id, language"
            ).fetchall()
        out = []
        for aid, lang, topic, title, body, tags, origin, emb in rows:
            vec = np.frombuffer(emb, dtype=np.float32).copy() if emb else None
            out.append(ArticleRecord(aid, lang, topic, title, body, json.loads(tags), origin, vec))
        return out

    def stored_hashes(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(article_id, language) -> (content hash, origin)."""
        with self._lock:
            rows = self._db.execute("SELECT article_id, language, content_hash, origin FROM articles")
            return {(a, lang): (h, o) for a, lang, h, o in rows.fetchall()}

    def upsert_articles(self, records: Sequence[ArticleRecord]) -> None:
        """Insert or replace in one transaction (all or nothing); every record carries its embedding."""
        now = time.time()
        params = []
        for r in records:
            if r.embedding is None:
                raise ValueError(f"article {r.article_id}/{r.language} has no embedding")
            params.append(
                (
                    r.article_id,
                    r.language,
                    r.topic,
                    r.title,
                    r.body,
                    json.dumps(r.tags, ensure_ascii=False),
                    r.origin,
                    r.content_hash,
                    np.asarray(r.embedding, dtype=np.float32).tobytes(),
                    now,
                )
            )
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO articles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", params
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # --- sessions -------------------------------------------------------------------------------
    def create_session(self, user_id: str, ttl_s: float, now: float | None = None) -> SessionRecord:
        now = time.time() if now is None else now
        record = SessionRecord(new_session_id(), user_id, now, now + ttl_s)
        with self._lock:
            self._db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?)",
                (record.session_id, user_id, record.created, record.expires),
            )
        return record

    def get_session(self, session_id: str, now: float | None = None) -> SessionRecord | None:
        """The live session with its turns; an expired one is deleted and reads as missing."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute(
                "SELECT session_id, user_id, created, expires FROM sessions WHERE session_id = ?",
                (session_id,),
            ).fetchone()
            if row is None:
                return None
            if row[3] <= now:
                self._delete_session(session_id)
                return None
            turns = self._db.execute(
                "SELECT role, text, intent, created FROM turns WHERE session_id = ? ORDER BY seq",
                (session_id,),
            ).fetchall()
        return SessionRecord(*row, turns=[TurnRecord(*t) for t in turns])

    def append_turns(
        self,
        session_id: str,
        turns: Iterable[TurnRecord],
        max_turns: int,
        ttl_s: float,
        now: float | None = None,
    ) -> float:
        """Add turns (already masked), keep the newest ``max_turns``, extend the expiry; returns it."""
        now = time.time() if now is None else now
        expires = now + ttl_s
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (last,) = self._db.execute(
                    "SELECT COALESCE(MAX(seq), -1) FROM turns WHERE session_id = ?", (session_id,)
                ).fetchone()
                for i, t in enumerate(turns, start=last + 1):
                    self._db.execute(
                        "INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?)",
                        (session_id, i, t.role, t.text, t.intent, t.created),
                    )
                self._db.execute(
                    "DELETE FROM turns WHERE session_id = ? AND seq <= "
                    "(SELECT MAX(seq) FROM turns WHERE session_id = ?) - ?",
                    (session_id, session_id, max_turns),
                )
                self._db.execute(
                    "UPDATE sessions SET expires = ? WHERE session_id = ?", (expires, session_id)
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return expires

    def end_session(self, session_id: str) -> bool:
        with self._lock:
            return self._delete_session(session_id)

    def _delete_session(self, session_id: str) -> bool:
        self._db.execute("DELETE FROM turns WHERE session_id = ?", (session_id,))
        return self._db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount > 0

    def purge_expired(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._lock:
            ids = [
                r[0] for r in self._db.execute("SELECT session_id FROM sessions WHERE expires <= ?", (now,))
            ]
            for sid in ids:
                self._delete_session(sid)
        return len(ids)

    # --- orders ---------------------------------------------------------------------------------
    def put_orders(self, orders: Iterable[OrderRecord]) -> int:
        rows = [
            (
                o.order_id,
                o.user_id,
                o.status,
                o.carrier,
                o.tracking_number,
                o.destination,
                o.eta,
                o.delivered_date,
                json.dumps(o.items, ensure_ascii=False),
                o.total,
                o.currency,
                o.created,
            )
            for o in orders
        ]
        with self._lock:
            self._db.executemany("INSERT OR IGNORE INTO orders VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            return len(rows)

    def order_for_user(self, order_id: str, user_id: str) -> OrderRecord | None:
        """The order if it belongs to ``user_id``; None otherwise (never says whose it is)."""
        if not user_id:
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM orders WHERE order_id = ? AND user_id = ?", (order_id, user_id)
            ).fetchone()
        if row is None:
            return None
        values = list(row)
        values[8] = json.loads(values[8])
        return OrderRecord(*values)

    def start_return(self, order_id: str, user_id: str) -> tuple[str, bool]:
        """Record a return for the caller's delivered order; returns (return id, created now)."""
        with self._lock:
            row = self._db.execute(
                "SELECT return_id FROM returns WHERE order_id = ? AND user_id = ?", (order_id, user_id)
            ).fetchone()
            if row is not None:
                return str(row[0]), False
            return_id = "RT-" + uuid.uuid4().hex[:8].upper()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO returns VALUES (?, ?, ?, ?)", (return_id, order_id, user_id, time.time())
                )
                self._db.execute(
                    "UPDATE orders SET status = 'return_started' WHERE order_id = ? AND user_id = ?",
                    (order_id, user_id),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return return_id, True

    def count_orders(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM orders").fetchone()[0])
