"""The chat service's state, as a domain repository over the runtime's state layer.

System of record (the ``Database``: an SQLite file embedded, the shared PostgreSQL otherwise):
knowledge articles with their embeddings, every conversation turn (``chat_transcripts``, written before
the answer is acknowledged), the order store the order actions read, and returns (one per order, by a
unique constraint, so two replicas cannot open two).

Sessions are hot state with a time-to-live and a bounded history for context. Embedded they are SQLite
rows as before; shared they live in Redis (a hash and a capped list per session, both expiring together),
so a session started on one replica continues on any other and an idle one disappears without a sweeper.

Every order query carries the caller's user id in its WHERE clause, so no message text can widen it to
another customer's orders. Article upserts bump a revision and notify ``chat_articles``, so every replica
rebuilds its retrieval index from the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.runtime.state import (
    Database,
    Migration,
    StateConfig,
    StoreUnavailable,
    open_database,
    redis_client,
    redis_errors,
)

ARTICLES_CHANNEL = "chat_articles"
SESSION_ID_LEN = 32

MIGRATIONS = [
    Migration(
        """
CREATE TABLE chat_articles (
    article_id TEXT NOT NULL, language TEXT NOT NULL, topic TEXT NOT NULL, title TEXT NOT NULL,
    body TEXT NOT NULL, tags TEXT NOT NULL, origin TEXT NOT NULL, content_hash TEXT NOT NULL,
    embedding BLOB, updated REAL NOT NULL, rev INTEGER NOT NULL, PRIMARY KEY (article_id, language));
CREATE INDEX chat_articles_rev ON chat_articles (rev);
CREATE TABLE chat_transcripts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL, user_id TEXT NOT NULL,
    role INTEGER NOT NULL, text TEXT NOT NULL, intent TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX chat_transcripts_session ON chat_transcripts (session_id, seq);
CREATE TABLE chat_orders (
    order_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, status TEXT NOT NULL, carrier TEXT NOT NULL,
    tracking_number TEXT NOT NULL, destination TEXT NOT NULL, eta TEXT NOT NULL,
    delivered_date TEXT NOT NULL, items TEXT NOT NULL, total REAL NOT NULL, currency TEXT NOT NULL,
    created TEXT NOT NULL);
CREATE INDEX chat_orders_user ON chat_orders (user_id);
CREATE TABLE chat_returns (
    return_id TEXT PRIMARY KEY, order_id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
    created REAL NOT NULL);
-- Sessions of the embedded backend (the shared backend keeps them in Redis, with a TTL).
CREATE TABLE chat_sessions (
    session_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL);
CREATE INDEX chat_sessions_expires ON chat_sessions (expires);
CREATE TABLE chat_turns (
    session_id TEXT NOT NULL, seq INTEGER NOT NULL, role INTEGER NOT NULL, text TEXT NOT NULL,
    intent TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (session_id, seq));
"""
    )
]

# Append turns to a live session only: an ended or expired session must not be resurrected by a turn
# that finishes on another replica. KEYS: session hash, turns list. ARGV: ttl ms, max turns, expires,
# then the turns (JSON).
_APPEND_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 4, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
redis.call('HSET', KEYS[1], 'expires', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""


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


def session_hash(session_id: str) -> str:
    """What logs show of a session: the id is its only key, so it never goes into a log."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:12]


def session_keys(session_id: str) -> tuple[str, str]:
    """Redis keys of a session: its hash and its turns list (one hash tag: same cluster slot)."""
    return f"cbec:chat:{{{session_id}}}:session", f"cbec:chat:{{{session_id}}}:turns"


@contextlib.contextmanager
def _redis_call() -> Iterator[None]:
    """Redis unreachable is UNAVAILABLE with a retry delay, never INTERNAL."""
    try:
        yield
    except redis_errors() as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise StoreUnavailable("redis", reason) from exc


_ORDER_COLUMNS = (
    "order_id, user_id, status, carrier, tracking_number, destination, eta, delivered_date, items, "
    "total, currency, created"
)


class ChatStore:
    """Articles, transcripts, orders and returns in ``db``; sessions in ``redis`` when given (shared
    backend), else in ``db``. ``ChatStore.open`` opens both from the state settings and owns them."""

    def __init__(self, db: Database, redis: Any | None = None, owned: bool = False) -> None:
        self.db = db
        self.redis = redis
        self._owned = owned
        db.migrate("chat", MIGRATIONS)
        self._append = redis.register_script(_APPEND_LUA) if redis is not None else None

    @classmethod
    def open(cls, state: StateConfig) -> ChatStore:
        """The configured store (embedded file or shared PostgreSQL + Redis), for tools such as the
        seeding and training jobs; ``close()`` closes it."""
        db = open_database(state, "chat")
        try:
            return cls(db, redis_client(state) if state.shared else None, owned=True)
        except BaseException:
            db.close()
            raise

    def close(self) -> None:
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.close()
        if self._owned:
            self.db.close()

    # --- knowledge ------------------------------------------------------------------------------
    def articles(self) -> list[ArticleRecord]:
        rows = self.db.all(
            "SELECT article_id, language, topic, title, body, tags, origin, embedding FROM chat_articles "
            "ORDER BY article_id, language"
        )
        out = []
        for aid, lang, topic, title, body, tags, origin, emb in rows:
            vec = np.frombuffer(bytes(emb), dtype=np.float32).copy() if emb else None
            out.append(ArticleRecord(aid, lang, topic, title, body, json.loads(tags), origin, vec))
        return out

    def articles_revision(self) -> int:
        """Grows with every upsert anywhere: an index built at this revision is current."""
        return int(self.db.scalar("SELECT COALESCE(MAX(rev), 0) FROM chat_articles") or 0)

    def stored_hashes(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(article_id, language) -> (content hash, origin)."""
        rows = self.db.all("SELECT article_id, language, content_hash, origin FROM chat_articles")
        return {(a, lang): (h, o) for a, lang, h, o in rows}

    def upsert_articles(self, records: Sequence[ArticleRecord]) -> int:
        """Insert or replace in one transaction (all or nothing); every record carries its embedding.
        Returns the new revision; every replica hears of it on ``chat_articles``."""
        now = time.time()
        for r in records:
            if r.embedding is None:
                raise ValueError(f"article {r.article_id}/{r.language} has no embedding")
        with self.db.transaction() as tx:
            tx.lock("chat_articles")  # revisions in commit order
            rev = int(tx.scalar("SELECT COALESCE(MAX(rev), 0) + 1 FROM chat_articles"))
            tx.executemany(
                "INSERT INTO chat_articles (article_id, language, topic, title, body, tags, origin, "
                "content_hash, embedding, updated, rev) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (article_id, language) DO UPDATE SET topic = excluded.topic, "
                "title = excluded.title, body = excluded.body, tags = excluded.tags, "
                "origin = excluded.origin, content_hash = excluded.content_hash, "
                "embedding = excluded.embedding, updated = excluded.updated, rev = excluded.rev",
                [
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
                        rev,
                    )
                    for r in records
                ],
            )
            tx.notify(ARTICLES_CHANNEL, str(rev))
        return rev

    # --- sessions -------------------------------------------------------------------------------
    def create_session(self, user_id: str, ttl_s: float, now: float | None = None) -> SessionRecord:
        now = time.time() if now is None else now
        record = SessionRecord(new_session_id(), user_id, now, now + ttl_s)
        if self.redis is None:
            self.db.execute(
                "INSERT INTO chat_sessions (session_id, user_id, created, expires) VALUES (?, ?, ?, ?)",
                (record.session_id, user_id, record.created, record.expires),
            )
            return record
        key, _ = session_keys(record.session_id)
        with _redis_call(), self.redis.pipeline(transaction=True) as pipe:
            fields = {"user_id": user_id, "created": repr(now), "expires": repr(record.expires)}
            pipe.hset(key, mapping=fields)
            pipe.pexpire(key, _ms(ttl_s))
            pipe.execute()
        return record

    def get_session(self, session_id: str, now: float | None = None) -> SessionRecord | None:
        """The live session with its recent turns; an expired one reads as missing (and is deleted).

        In Redis the TTL is the authority (no replica's clock is compared); ``now`` is honoured when
        given, so a test can move the clock."""
        if self.redis is None:
            return self._get_sqlite_session(session_id, time.time() if now is None else now)
        key, turns_key = session_keys(session_id)
        with _redis_call(), self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(key)
            pipe.lrange(turns_key, 0, -1)
            fields, raw_turns = pipe.execute()
        if not fields:
            return None
        record = SessionRecord(
            session_id,
            fields[b"user_id"].decode(),
            float(fields[b"created"]),
            float(fields[b"expires"]),
            [_turn_from_json(t) for t in raw_turns],
        )
        if now is not None and record.expires <= now:
            self.end_session(session_id)
            return None
        return record

    def _get_sqlite_session(self, session_id: str, now: float) -> SessionRecord | None:
        with self.db.transaction() as tx:
            row = tx.one(
                "SELECT session_id, user_id, created, expires FROM chat_sessions WHERE session_id = ?",
                (session_id,),
            )
            if row is None:
                return None
            if row[3] <= now:
                _delete_sqlite_session(tx, session_id)
                return None
            turns = tx.all(
                "SELECT role, text, intent, created FROM chat_turns WHERE session_id = ? ORDER BY seq",
                (session_id,),
            )
        return SessionRecord(*row, turns=[TurnRecord(*t) for t in turns])  # type: ignore[misc]

    def append_turns(
        self,
        session_id: str,
        turns: Iterable[TurnRecord],
        max_turns: int,
        ttl_s: float,
        now: float | None = None,
        user_id: str = "",
    ) -> float:
        """Add turns (already masked): durably to the transcript first, then to the session's recent
        turns (the newest ``max_turns`` kept), extending its expiry; returns the new expiry.

        Raises StoreUnavailable before anything is acknowledged if either store is down."""
        now = time.time() if now is None else now
        expires = now + ttl_s
        turns = list(turns)
        rows = [(session_id, user_id, t.role, t.text, t.intent, t.created) for t in turns]
        insert = (
            "INSERT INTO chat_transcripts (session_id, user_id, role, text, intent, created) "
            "VALUES (?, ?, ?, ?, ?, ?)"
        )
        if self.redis is None:
            with self.db.transaction() as tx:
                tx.executemany(insert, rows)
                live = tx.execute(
                    "UPDATE chat_sessions SET expires = ? WHERE session_id = ?", (expires, session_id)
                )
                if live:
                    last = tx.scalar(
                        "SELECT COALESCE(MAX(seq), -1) FROM chat_turns WHERE session_id = ?", (session_id,)
                    )
                    tx.executemany(
                        "INSERT INTO chat_turns (session_id, seq, role, text, intent, created) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        [
                            (session_id, i, t.role, t.text, t.intent, t.created)
                            for i, t in enumerate(turns, start=int(last) + 1)
                        ],
                    )
                    tx.execute(
                        "DELETE FROM chat_turns WHERE session_id = ? AND seq <= "
                        "(SELECT MAX(seq) FROM chat_turns WHERE session_id = ?) - ?",
                        (session_id, session_id, max_turns),
                    )
            return expires
        with self.db.transaction() as tx:
            tx.executemany(insert, rows)
        assert self._append is not None
        with _redis_call():
            self._append(
                keys=list(session_keys(session_id)),
                args=[_ms(ttl_s), max_turns, repr(expires), *(_turn_to_json(t) for t in turns)],
            )
        return expires

    def transcript(self, session_id: str) -> list[TurnRecord]:
        """Every turn of a session ever recorded, oldest first (the durable record)."""
        rows = self.db.all(
            "SELECT role, text, intent, created FROM chat_transcripts WHERE session_id = ? ORDER BY seq",
            (session_id,),
        )
        return [TurnRecord(*r) for r in rows]  # type: ignore[misc]

    def end_session(self, session_id: str) -> bool:
        if self.redis is None:
            with self.db.transaction() as tx:
                return _delete_sqlite_session(tx, session_id)
        key, turns_key = session_keys(session_id)
        with _redis_call(), self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.delete(turns_key)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def purge_expired(self, now: float | None = None) -> int:
        """Delete expired embedded sessions (Redis expires its own); returns how many."""
        if self.redis is not None:
            return 0
        now = time.time() if now is None else now
        with self.db.transaction() as tx:
            ids = [r[0] for r in tx.all("SELECT session_id FROM chat_sessions WHERE expires <= ?", (now,))]
            for sid in ids:
                _delete_sqlite_session(tx, sid)
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
                float(o.total),
                o.currency,
                o.created,
            )
            for o in orders
        ]
        with self.db.transaction() as tx:
            tx.executemany(
                f"INSERT INTO chat_orders ({_ORDER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (order_id) DO NOTHING",
                rows,
            )
        return len(rows)

    def order_for_user(self, order_id: str, user_id: str) -> OrderRecord | None:
        """The order if it belongs to ``user_id``; None otherwise (never says whose it is)."""
        if not user_id:
            return None
        row = self.db.one(
            f"SELECT {_ORDER_COLUMNS} FROM chat_orders WHERE order_id = ? AND user_id = ?",
            (order_id, user_id),
        )
        if row is None:
            return None
        values = list(row)
        values[8] = json.loads(values[8])
        values[9] = float(values[9])
        return OrderRecord(*values)

    def start_return(self, order_id: str, user_id: str) -> tuple[str, bool]:
        """Record a return for the caller's order; returns (return id, created now).

        Idempotent per order across replicas: the unique order_id makes a concurrent second insert a
        no-op (PostgreSQL waits for the first to commit), which then reads the first one's id."""
        return_id = "RT-" + uuid.uuid4().hex[:8].upper()
        with self.db.transaction() as tx:
            created = tx.scalar(
                "INSERT INTO chat_returns (return_id, order_id, user_id, created) "
                "SELECT ?, order_id, user_id, ? FROM chat_orders WHERE order_id = ? AND user_id = ? "
                "ON CONFLICT (order_id) DO NOTHING RETURNING return_id",
                (return_id, time.time(), order_id, user_id),
            )
            if created is not None:
                tx.execute(
                    "UPDATE chat_orders SET status = 'return_started' WHERE order_id = ? AND user_id = ?",
                    (order_id, user_id),
                )
                return str(created), True
            existing = tx.scalar(
                "SELECT return_id FROM chat_returns WHERE order_id = ? AND user_id = ?", (order_id, user_id)
            )
        if existing is None:
            raise LookupError(f"order {order_id} is not the caller's")
        return str(existing), False

    def count_orders(self) -> int:
        return int(self.db.scalar("SELECT COUNT(*) FROM chat_orders") or 0)


def _delete_sqlite_session(tx: Any, session_id: str) -> bool:
    tx.execute("DELETE FROM chat_turns WHERE session_id = ?", (session_id,))
    return tx.execute("DELETE FROM chat_sessions WHERE session_id = ?", (session_id,)) > 0


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _turn_to_json(t: TurnRecord) -> str:
    return json.dumps({"r": t.role, "t": t.text, "i": t.intent, "c": t.created}, ensure_ascii=False)


def _turn_from_json(raw: bytes) -> TurnRecord:
    d = json.loads(raw)
    return TurnRecord(int(d["r"]), d["t"], d["i"], float(d["c"]))
