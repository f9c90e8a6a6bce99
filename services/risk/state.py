"""Risk state as a domain repository over the runtime's state layer (``services/runtime/state.py``).

Two kinds of state with different needs:

- the **system of record**: scored transactions and outcome labels (``risk_scored``, ``risk_outcomes``),
  which training reads and which must never be lost. They live in the service's ``Database``: the
  embedded SQLite file ``<CBEC_STATE_DIR>/risk.sqlite3``, or the shared PostgreSQL.
- **velocity windows**: each card's, account's and device's recent transactions and when each card was
  first seen. They are hot (read and written by every score) and age out. Embedded, they are two more
  tables in the same SQLite file, written in the same transaction as the scored log; training replays
  history through the same tables on ``:memory:``, so a feature sees one code path in both. Shared, they
  are in Redis, so every replica sees every earlier transaction of a card whichever replica scored it:
  a sorted set per card / account / device scored by event time, a hash per card for first-seen, trimmed
  by event time (ZREMRANGEBYSCORE) and aged out by TTL (PEXPIRE), idempotent per transaction id. The
  reads of one scoring call are one pipelined round trip and its writes one script call.

Both backends answer ``history`` identically (tests replay the same sequences through both): windows
``(t - w, t]``, the transaction itself excluded, newest first (ties by transaction id, descending), at
most ``history_limit`` rows per key, and no first-seen time for a card whose first transaction is this
one. Events expire by event time: anything older than the retention behind the newest event, so
replaying old data ages out the same way live traffic does.

One scoring call is one unit (``batch()``). Embedded: one SQLite transaction committed before the answer
leaves. Shared: the reads happen at once; the writes are buffered (later transactions of the same call
see earlier ones through them) and written when the unit ends: first the scored log in one PostgreSQL
transaction, then the velocity events in one Redis call. A store that is down raises ``StoreUnavailable``
(UNAVAILABLE with RetryInfo) and the caller answers nothing, so nothing it acknowledged is missing.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.runtime.state import Database, Migration, SqliteDatabase, StoreUnavailable, redis_errors
from services.runtime.state import Tx as SqlTx

from .features import CARD_WINDOW_MS, DAY_MS, DEVICE_WINDOW_MS, MAX_WINDOW_MS, USER_WINDOW_MS, Tx

log = logging.getLogger("cbec.risk.state")

#: The store's name in the runtime: ``<state dir>/risk.sqlite3`` embedded.
STORE = "risk"
#: Where the service kept its state before the runtime's state layer (relative to the state dir).
LEGACY_FILE = Path("risk") / "state.sqlite3"

LEDGER_MIGRATIONS: list[Migration | str] = [
    """
    CREATE TABLE IF NOT EXISTS risk_scored (
        tx_id TEXT PRIMARY KEY,
        ts INTEGER NOT NULL,
        tx TEXT NOT NULL,
        fraud_probability REAL NOT NULL,
        anomaly_score REAL NOT NULL,
        decision INTEGER NOT NULL,
        model_version TEXT NOT NULL,
        scored_ms INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS risk_scored_ts ON risk_scored (ts);
    CREATE TABLE IF NOT EXISTS risk_outcomes (
        tx_id TEXT PRIMARY KEY,
        outcome INTEGER NOT NULL,
        reported_ms INTEGER NOT NULL,
        received_ms INTEGER NOT NULL,
        note TEXT NOT NULL
    )
    """
]
# Embedded backend only. The indexes end in tx_id so "newest first, ties by id" needs no sort.
VELOCITY_MIGRATIONS: list[Migration | str] = [
    """
    CREATE TABLE IF NOT EXISTS risk_events (
        tx_id TEXT NOT NULL UNIQUE,
        ts INTEGER NOT NULL,
        card TEXT NOT NULL,
        user_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        amount_ref REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS risk_events_card ON risk_events (card, ts, tx_id);
    CREATE INDEX IF NOT EXISTS risk_events_user ON risk_events (user_id, ts, tx_id);
    CREATE INDEX IF NOT EXISTS risk_events_device ON risk_events (device_id, ts, tx_id) WHERE device_id <> '';
    CREATE INDEX IF NOT EXISTS risk_events_ts ON risk_events (ts);
    CREATE TABLE IF NOT EXISTS risk_cards (
        card TEXT PRIMARY KEY, first_ms INTEGER NOT NULL, first_tx_id TEXT NOT NULL, last_ms INTEGER NOT NULL
    ) WITHOUT ROWID
    """
]

# Outcome enum values of cbec.risk.v1.Outcome (kept as ints so this module needs no protos).
OUTCOME_LEGITIMATE = 1
OUTCOME_CHARGEBACK = 2
OUTCOME_CONFIRMED_FRAUD = 3
FRAUD_OUTCOMES = frozenset({OUTCOME_CHARGEBACK, OUTCOME_CONFIRMED_FRAUD})
WINDOWS = (CARD_WINDOW_MS, USER_WINDOW_MS, DEVICE_WINDOW_MS)

_INSERT_SCORED = (
    "INSERT INTO risk_scored (tx_id, ts, tx, fraud_probability, anomaly_score, decision, model_version, "
    "scored_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tx_id) DO "
)
_UPSERT_SCORED = _INSERT_SCORED + (
    "UPDATE SET ts = excluded.ts, tx = excluded.tx, fraud_probability = excluded.fraud_probability, "
    "anomaly_score = excluded.anomaly_score, decision = excluded.decision, "
    "model_version = excluded.model_version, scored_ms = excluded.scored_ms"
)
_INSERT_OUTCOME = (
    "INSERT INTO risk_outcomes (tx_id, outcome, reported_ms, received_ms, note) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (tx_id) DO "
)
_UPSERT_OUTCOME = _INSERT_OUTCOME + (
    "UPDATE SET outcome = excluded.outcome, reported_ms = excluded.reported_ms, "
    "received_ms = excluded.received_ms, note = excluded.note "
    # The newest report wins, not the last write: a retried ReportOutcome (IDEMPOTENT in the contract)
    # whose first attempt lands late cannot undo a newer report.
    "WHERE excluded.reported_ms >= risk_outcomes.reported_ms"
)
_EXPIRE_SCORED = (
    "DELETE FROM risk_scored WHERE ts <= ? "
    "AND NOT EXISTS (SELECT 1 FROM risk_outcomes o WHERE o.tx_id = risk_scored.tx_id)"
)


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


def _scored_params(rows: Sequence[ScoredRow], now_ms: int) -> list[tuple[Any, ...]]:
    return [
        (
            r.tx.transaction_id,
            int(r.tx.occurred_ms),
            r.tx.to_json(),
            float(r.fraud_probability),
            float(r.anomaly_score),
            int(r.decision),
            r.model_version,
            now_ms,
        )
        for r in rows
    ]


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- embedded velocity: SQL tables next to the ledger -------------------------------------------------------
class SqlVelocity:
    """Velocity windows in ``risk_events`` / ``risk_cards`` of the embedded database."""

    def __init__(self, history_limit: int) -> None:
        self.limit = history_limit

    def history(self, sql: SqlTx, tx: Tx, card_ms: int, user_ms: int, device_ms: int) -> History:
        t, limit, tx_id = tx.occurred_ms, self.limit, tx.transaction_id
        cur = sql.cursor  # the hot path of training replays: plain SQLite calls, no dialect rewriting
        card = cur.execute(
            "SELECT ts, amount_ref, user_id, device_id FROM risk_events WHERE card = ? AND ts > ? "
            "AND ts <= ? AND tx_id <> ? ORDER BY ts DESC, tx_id DESC LIMIT ?",
            (tx.card, t - card_ms, t, tx_id, limit),
        ).fetchall()
        user = [
            row[0]
            for row in cur.execute(
                "SELECT ts FROM risk_events WHERE user_id = ? AND ts > ? AND ts <= ? AND tx_id <> ? "
                "ORDER BY ts DESC, tx_id DESC LIMIT ?",
                (tx.user_id, t - user_ms, t, tx_id, limit),
            ).fetchall()
        ]
        device: list[tuple[int, str]] = []
        if tx.device:
            device = cur.execute(
                "SELECT ts, card FROM risk_events WHERE device_id = ? AND device_id <> '' AND ts > ? "
                "AND ts <= ? AND tx_id <> ? ORDER BY ts DESC, tx_id DESC LIMIT ?",
                (tx.device, t - device_ms, t, tx_id, limit),
            ).fetchall()
        first = cur.execute(
            "SELECT first_ms, first_tx_id FROM risk_cards WHERE card = ?", (tx.card,)
        ).fetchone()
        # A card whose first transaction is this one (being re-scored) is still new.
        first_ms = None if first is None or first[1] == tx_id else int(first[0])
        return History(card, user, device, first_ms)

    def record(self, sql: SqlTx, tx: Tx, amount_ref: float) -> None:
        cur = sql.cursor
        cur.execute(
            "INSERT INTO risk_events (tx_id, ts, card, user_id, device_id, amount_ref) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tx_id) DO NOTHING",
            (tx.transaction_id, tx.occurred_ms, tx.card, tx.user_id, tx.device, float(amount_ref)),
        )
        cur.execute(
            "INSERT INTO risk_cards (card, first_ms, first_tx_id, last_ms) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (card) DO UPDATE SET "
            "first_tx_id = CASE WHEN excluded.first_ms < first_ms "
            "THEN excluded.first_tx_id ELSE first_tx_id END, "
            "first_ms = CASE WHEN excluded.first_ms < first_ms THEN excluded.first_ms ELSE first_ms END, "
            "last_ms = CASE WHEN excluded.last_ms > last_ms THEN excluded.last_ms ELSE last_ms END",
            (tx.card, tx.occurred_ms, tx.transaction_id, tx.occurred_ms),
        )

    def expire(
        self, sql: SqlTx, event_retention_ms: int, card_retention_ms: int
    ) -> tuple[int | None, int, int]:
        """(newest event time, events deleted, cards deleted)."""
        newest = sql.scalar("SELECT max(ts) FROM risk_events")
        if newest is None:
            return None, 0, 0
        events = sql.execute("DELETE FROM risk_events WHERE ts <= ?", (newest - event_retention_ms,))
        cards = sql.execute("DELETE FROM risk_cards WHERE last_ms <= ?", (newest - card_retention_ms,))
        return int(newest), events, cards

    def counts(self, sql: SqlTx) -> dict[str, int]:
        return {
            "events": int(sql.scalar("SELECT count(*) FROM risk_events")),
            "cards": int(sql.scalar("SELECT count(*) FROM risk_cards")),
        }


# --- shared velocity: Redis ---------------------------------------------------------------------------------
# Per event: KEYS = seen marker, card zset, user zset, device zset, card first-seen hash;
# ARGV = (event retention ms, card retention ms) then per event tx id, ts, card / user / device members.
# The seen marker (SET NX with the event retention) makes a repeated transaction id a no-op, as the
# embedded UNIQUE(tx_id) does; first-seen is updated either way, as the embedded upsert is.
_WRITE_LUA = """
local er = tonumber(ARGV[1])
local cr = tonumber(ARGV[2])
local added = 0
for i = 0, #KEYS / 5 - 1 do
  local k = i * 5
  local a = 2 + i * 5
  local txid, ts_s = ARGV[a + 1], ARGV[a + 2]
  local ts = tonumber(ts_s)
  if redis.call('SET', KEYS[k + 1], ts_s, 'NX', 'PX', er) then
    added = added + 1
    for j = 2, 4 do
      local member = ARGV[a + j + 1]
      if member ~= '' then
        local key = KEYS[k + j]
        redis.call('ZADD', key, ts_s, member)
        local newest = tonumber(redis.call('ZREVRANGE', key, 0, 0, 'WITHSCORES')[2])
        redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', newest - er))
        redis.call('PEXPIRE', key, er)
      end
    end
  end
  local f = KEYS[k + 5]
  local cur = redis.call('HMGET', f, 'first_ms', 'last_ms')
  if not cur[1] then
    redis.call('HSET', f, 'first_ms', ts_s, 'first_tx', txid, 'last_ms', ts_s)
  else
    if ts < tonumber(cur[1]) then redis.call('HSET', f, 'first_ms', ts_s, 'first_tx', txid) end
    if ts > tonumber(cur[2]) then redis.call('HSET', f, 'last_ms', ts_s) end
  end
  redis.call('PEXPIRE', f, cr)
end
return added
"""
_WRITE_CHUNK = 256  # events per script call: keeps Redis responsive during a 10k-transaction batch
_SEP = b"\x00"  # tx id first, so members of one timestamp sort by tx id; the rest is JSON (no raw NUL)


@dataclass
class _Fetched:
    """One transaction's raw velocity reads from Redis."""

    windows: tuple[int, int, int]
    card: list[tuple[int, str, float, str, str]]  # (ts, tx_id, amount_ref, user, device)
    user: list[tuple[int, str]]  # (ts, tx_id)
    device: list[tuple[int, str, str]]  # (ts, tx_id, card)
    first: tuple[int, str] | None  # (first_ms, first_tx_id)
    seen: bool  # the transaction id is already recorded


@dataclass
class _Event:
    tx: Tx
    amount_ref: float
    #: False when the id was recorded before (Redis will ignore it; only first-seen is updated).
    new: bool


def _split(member: bytes) -> tuple[str, Any]:
    cut = member.rindex(_SEP)
    return member[:cut].decode(), json.loads(member[cut + 1 :])


class RedisVelocity:
    """Velocity windows in Redis, shared by every replica."""

    def __init__(
        self, client: Any, history_limit: int, event_retention_ms: int, card_retention_ms: int, prefix: str
    ) -> None:
        import redis

        self.client = client
        self.limit = history_limit
        self.event_retention_ms = event_retention_ms
        self.card_retention_ms = card_retention_ms
        self.prefix = prefix.encode()
        self._script = client.register_script(_WRITE_LUA)
        self._errors = (*redis_errors(), redis.exceptions.ReadOnlyError, redis.exceptions.BusyLoadingError)

    def key(self, kind: bytes, value: str) -> bytes:
        return self.prefix + kind + b":" + value.encode()

    @contextmanager
    def _calls(self) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise StoreUnavailable("redis", reason) from exc

    def fetch(self, txs: Sequence[Tx], windows: tuple[int, int, int]) -> list[_Fetched]:
        """Every transaction's windows, first-seen and seen marker, in one pipelined round trip."""
        card_ms, user_ms, device_ms = windows
        n = self.limit + 1  # one more: the transaction itself may be among them
        pipe = self.client.pipeline(transaction=False)
        for tx in txs:
            t = tx.occurred_ms
            pipe.zrevrangebyscore(self.key(b"c", tx.card), t, f"({t - card_ms}", 0, n, withscores=True)
            pipe.zrevrangebyscore(self.key(b"u", tx.user_id), t, f"({t - user_ms}", 0, n, withscores=True)
            if tx.device:
                pipe.zrevrangebyscore(
                    self.key(b"d", tx.device), t, f"({t - device_ms}", 0, n, withscores=True
                )
            pipe.hmget(self.key(b"f", tx.card), "first_ms", "first_tx")
            pipe.exists(self.key(b"t", tx.transaction_id))
        with self._calls():
            replies = iter(pipe.execute())
        out = []
        for tx in txs:
            card = [(int(s), *self._card_member(m)) for m, s in next(replies)]
            user = [(int(s), m.decode()) for m, s in next(replies)]
            device: list[tuple[int, str, str]] = []
            if tx.device:
                device = [(int(s), *self._device_member(m)) for m, s in next(replies)]
            first_ms, first_tx = next(replies)
            first = None if first_ms is None else (int(first_ms), first_tx.decode())
            out.append(_Fetched(windows, card, user, device, first, bool(next(replies))))
        return out

    @staticmethod
    def _card_member(member: bytes) -> tuple[str, float, str, str]:
        tx_id, (amount, user, device) = _split(member)
        return tx_id, float(amount), user, device

    @staticmethod
    def _device_member(member: bytes) -> tuple[str, str]:
        tx_id, card = _split(member)
        return tx_id, card

    def history(self, tx: Tx, got: _Fetched, pending: Sequence[_Event]) -> History:
        """The transaction's history from what Redis held plus the unit's unwritten events before it."""
        t, tx_id, limit = tx.occurred_ms, tx.transaction_id, self.limit
        card_ms, user_ms, device_ms = got.windows
        card = {row[1]: row for row in got.card if row[1] != tx_id}
        user = {row[1]: row for row in got.user if row[1] != tx_id}
        device = {row[1]: row for row in got.device if row[1] != tx_id}
        first = got.first
        for e in pending:
            p, pid = e.tx, e.tx.transaction_id
            ts = p.occurred_ms
            if p.card == tx.card and (first is None or ts < first[0]):
                first = (ts, pid)
            if not e.new or pid == tx_id:
                continue
            if p.card == tx.card and t - card_ms < ts <= t:
                card.setdefault(pid, (ts, pid, e.amount_ref, p.user_id, p.device))
            if p.user_id == tx.user_id and t - user_ms < ts <= t:
                user.setdefault(pid, (ts, pid))
            if tx.device and p.device == tx.device and t - device_ms < ts <= t:
                device.setdefault(pid, (ts, pid, p.card))

        def newest(rows: Any) -> list[Any]:
            return sorted(rows, key=lambda r: (r[0], r[1]), reverse=True)[:limit]

        return History(
            [(ts, amount, u, d) for ts, _, amount, u, d in newest(card.values())],
            [ts for ts, _ in newest(user.values())],
            [(ts, c) for ts, _, c in newest(device.values())] if tx.device else [],
            None if first is None or first[1] == tx_id else first[0],
        )

    def write(self, events: Sequence[_Event]) -> None:
        """Record events (idempotent per transaction id): one script call per chunk, pipelined."""
        calls = []
        for start in range(0, len(events), _WRITE_CHUNK):
            keys: list[bytes] = []
            args: list[Any] = [self.event_retention_ms, self.card_retention_ms]
            for e in events[start : start + _WRITE_CHUNK]:
                tx = e.tx
                keys += [
                    self.key(b"t", tx.transaction_id),
                    self.key(b"c", tx.card),
                    self.key(b"u", tx.user_id),
                    self.key(b"d", tx.device),
                    self.key(b"f", tx.card),
                ]
                head = tx.transaction_id.encode() + _SEP
                args += [
                    tx.transaction_id,
                    str(int(tx.occurred_ms)),
                    head + json.dumps([float(e.amount_ref), tx.user_id, tx.device]).encode(),
                    tx.transaction_id,
                    head + json.dumps(tx.card).encode() if tx.device else b"",
                ]
            calls.append((keys, args))
        with self._calls():
            if len(calls) == 1:
                self._script(keys=calls[0][0], args=calls[0][1])
            elif calls:
                pipe = self.client.pipeline(transaction=False)
                for keys, args in calls:
                    self._script(keys=keys, args=args, client=pipe)
                pipe.execute()

    def counts(self) -> dict[str, int]:
        """Recorded events and known cards (SCAN: for tests and operators, not the hot path)."""
        with self._calls():
            return {
                name: sum(1 for _ in self.client.scan_iter(match=self.prefix + kind + b":*", count=1000))
                for name, kind in (("events", b"t"), ("cards", b"f"))
            }


# --- the repository -----------------------------------------------------------------------------------------
@dataclass
class _Unit:
    """One ``batch()``: the SQL transaction (embedded), or what the shared backend writes at the end."""

    sql: SqlTx | None
    fetched: dict[tuple[Any, ...], _Fetched] = field(default_factory=dict)
    events: list[_Event] = field(default_factory=list)
    event_ids: set[str] = field(default_factory=set)
    scored: list[ScoredRow] = field(default_factory=list)


def _fetch_key(tx: Tx) -> tuple[Any, ...]:
    return (tx.transaction_id, tx.occurred_ms, tx.card, tx.user_id, tx.device)


class StateStore:
    """The risk service's state: velocity history, the scored log and outcome labels.

    ``StateStore(path)`` opens an embedded SQLite file (``":memory:"`` for training replays);
    ``StateStore(database)`` uses a runtime ``Database``, with ``redis`` (a redis-py client) for the
    velocity windows of the shared backend.
    """

    def __init__(
        self,
        db: Database | Path | str,
        redis: Any | None = None,
        *,
        event_retention_ms: int = 35 * DAY_MS,
        card_retention_ms: int = 400 * DAY_MS,
        scored_retention_ms: int = 180 * DAY_MS,
        history_limit: int = 2000,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        expire_every: int = 2000,
        read_only: bool = False,
        redis_prefix: str = "risk:",
    ) -> None:
        if event_retention_ms < MAX_WINDOW_MS:
            raise ValueError(
                f"event retention ({event_retention_ms} ms) is shorter than the longest feature "
                f"window ({MAX_WINDOW_MS} ms); features would change when events expire"
            )
        self._owns_db = not isinstance(db, Database)
        if not isinstance(db, Database):
            db = SqliteDatabase(db, name=STORE, synchronous=synchronous, read_only=read_only)
        self.db = db
        self.event_retention_ms = event_retention_ms
        self.card_retention_ms = card_retention_ms
        self.scored_retention_ms = scored_retention_ms
        self.history_limit = history_limit
        self.synchronous = synchronous
        self.expire_every = expire_every
        self._since_expiry = 0
        self._lock = threading.RLock()
        self._unit: _Unit | None = None
        self._unit_thread: int | None = None
        self.sql_velocity: SqlVelocity | None = None
        self.redis_velocity: RedisVelocity | None = None
        if redis is not None:
            self.redis_velocity = RedisVelocity(
                redis, history_limit, event_retention_ms, card_retention_ms, redis_prefix
            )
        else:
            self.sql_velocity = SqlVelocity(history_limit)
        self._schema_ready = read_only
        try:  # at start the state layer waits a while for a database that is coming up
            self._ensure_schema(wait_s=None)
        except StoreUnavailable as exc:  # still down: retried on first use, failing fast meanwhile
            log.warning("risk schema not migrated yet: %s", exc)

    def _ensure_schema(self, wait_s: float | None = 0.0) -> None:
        """Apply the migrations once (idempotent and locked across replicas by the state layer);
        ``wait_s`` None waits as long as the state layer does at start, 0 fails at once (a call)."""
        if self._schema_ready:
            return
        wait = {} if wait_s is None else {"wait_s": wait_s}
        with self._lock:
            if self._schema_ready:
                return
            self.db.migrate("risk", LEDGER_MIGRATIONS, **wait)
            if self.sql_velocity is not None:
                self.db.migrate("risk_velocity", VELOCITY_MIGRATIONS, **wait)
            self._schema_ready = True

    @property
    def shared(self) -> bool:
        return self.redis_velocity is not None

    def close(self) -> None:
        """Close the database when this store opened it (the runtime closes the ones it opened)."""
        if self._owns_db:
            self.db.close()

    # --- units of work ---------------------------------------------------------------------------
    def _current(self) -> _Unit | None:
        """The open unit of this thread (another thread's unit is not ours to join)."""
        return self._unit if self._unit_thread == threading.get_ident() else None

    @contextmanager
    def batch(self) -> Iterator[StateStore]:
        """One unit of work, serialised with every other on this store (so a replica sees its own
        transactions in order); committed on success, discarded on an exception."""
        with self._lock:
            if self._unit is not None:  # nested: join the outer unit
                yield self
                return
            self._ensure_schema()
            try:
                if self.sql_velocity is not None:
                    with self.db.transaction() as sql:
                        self._unit, self._unit_thread = _Unit(sql), threading.get_ident()
                        yield self
                        if self._since_expiry >= self.expire_every:
                            self._expire_sql(sql)
                else:
                    unit = self._unit = _Unit(None)
                    self._unit_thread = threading.get_ident()
                    yield self
                    self._flush(unit)
            finally:
                self._unit = self._unit_thread = None
        if self.shared and self._since_expiry >= self.expire_every:
            self._expire_shared_quietly()

    @contextmanager
    def _sql(self, write: bool = True) -> Iterator[SqlTx]:
        """The open unit's SQL transaction, else a transaction (or a read) of its own."""
        unit = self._current()
        if unit is not None and unit.sql is not None:
            yield unit.sql
        else:
            self._ensure_schema()
            with self.db.transaction() if write else self.db.read() as sql:
                yield sql

    def _flush(self, unit: _Unit) -> None:
        """Shared backend: the scored log (PostgreSQL), then the velocity events (Redis)."""
        if unit.scored:
            self._write_scored(unit.scored)
        if unit.events:
            assert self.redis_velocity is not None
            self.redis_velocity.write(unit.events)
            self._since_expiry += len(unit.events)

    def _write_scored(self, rows: Sequence[ScoredRow]) -> None:
        self._ensure_schema()
        with self.db.transaction() as sql:
            if sql.dialect == "postgres" and self.synchronous != "FULL":
                # The commit reaches the server before the answer leaves (a killed replica loses
                # nothing); like SQLite's NORMAL, only a crash of the database host itself can lose
                # the last moment of scored rows. Outcomes always commit synchronously.
                sql.execute("SET LOCAL synchronous_commit = off")
            sql.executemany(_UPSERT_SCORED, _scored_params(rows, _now_ms()))

    # --- velocity ------------------------------------------------------------------------------------
    def prefetch(self, txs: Sequence[Tx], windows: tuple[int, int, int] = WINDOWS) -> None:
        """Shared backend: read the histories of a unit's transactions in one round trip (``history``
        then needs none). Embedded: nothing to do."""
        unit = self._current()
        if self.redis_velocity is None or unit is None or not txs:
            return
        for tx, got in zip(txs, self.redis_velocity.fetch(txs, windows), strict=True):
            unit.fetched[_fetch_key(tx)] = got

    def history(self, tx: Tx, card_window_ms: int, user_window_ms: int, device_window_ms: int) -> History:
        """The card's, account's and device's transactions in ``(t - window, t]``, newest first,
        excluding ``tx`` itself (so re-scoring a transaction does not count it twice)."""
        unit = self._current()
        if self.sql_velocity is not None:
            if unit is not None and unit.sql is not None:  # the hot path of training replays
                return self.sql_velocity.history(
                    unit.sql, tx, card_window_ms, user_window_ms, device_window_ms
                )
            with self._sql(write=False) as sql:
                return self.sql_velocity.history(sql, tx, card_window_ms, user_window_ms, device_window_ms)
        assert self.redis_velocity is not None
        windows = (card_window_ms, user_window_ms, device_window_ms)
        got = unit.fetched.get(_fetch_key(tx)) if unit is not None else None
        if got is None or got.windows != windows:
            (got,) = self.redis_velocity.fetch([tx], windows)
            if unit is not None:
                unit.fetched[_fetch_key(tx)] = got
        return self.redis_velocity.history(tx, got, unit.events if unit is not None else ())

    def record_event(self, tx: Tx, amount_ref: float) -> None:
        """Remember a transaction for later velocity features (idempotent per transaction id)."""
        unit = self._current()
        if self.sql_velocity is not None:
            if unit is not None and unit.sql is not None:
                self.sql_velocity.record(unit.sql, tx, amount_ref)
            else:
                with self._sql() as sql:
                    self.sql_velocity.record(sql, tx, amount_ref)
            self._since_expiry += 1
            return
        assert self.redis_velocity is not None
        if unit is None:
            self.redis_velocity.write([_Event(tx, float(amount_ref), True)])
            return
        got = unit.fetched.get(_fetch_key(tx))
        new = tx.transaction_id not in unit.event_ids and not (got is not None and got.seen)
        unit.events.append(_Event(tx, float(amount_ref), new))
        unit.event_ids.add(tx.transaction_id)

    # --- expiry --------------------------------------------------------------------------------------
    def _expire_sql(self, sql: SqlTx) -> dict[str, int]:
        assert self.sql_velocity is not None
        self._since_expiry = 0
        newest, events, cards = self.sql_velocity.expire(sql, self.event_retention_ms, self.card_retention_ms)
        if newest is None:
            return {"events": 0, "cards": 0, "scored": 0}
        scored = sql.execute(_EXPIRE_SCORED, (newest - self.scored_retention_ms,))
        if events or cards or scored:
            log.debug("expired risk state", extra={"events": events, "cards": cards, "scored": scored})
        return {"events": events, "cards": cards, "scored": scored}

    def _expire_shared(self) -> dict[str, int]:
        """Scored rows without a label, older than their retention behind the newest scored one.
        (Redis trims velocity windows on every write and ages idle keys out by TTL.)"""
        self._since_expiry = 0
        self._ensure_schema()
        with self.db.transaction() as sql:
            newest = sql.scalar("SELECT max(ts) FROM risk_scored")
            scored = (
                0 if newest is None else sql.execute(_EXPIRE_SCORED, (newest - self.scored_retention_ms,))
            )
        return {"events": 0, "cards": 0, "scored": scored}

    def _expire_shared_quietly(self) -> None:
        try:
            self._expire_shared()
        except StoreUnavailable as exc:  # the answer is already committed; retried after the next N
            log.warning("risk state expiry skipped: %s", exc)

    def expire(self) -> dict[str, int]:
        """Expire now (also done every ``expire_every`` recorded events)."""
        if self.sql_velocity is not None:
            with self.batch():
                unit = self._current()
                assert unit is not None and unit.sql is not None
                return self._expire_sql(unit.sql)
        return self._expire_shared()

    # --- scored transactions and outcomes ----------------------------------------------------------------
    def record_scored(self, rows: list[ScoredRow], now_ms: int | None = None) -> None:
        """Log scored transactions (a re-scored id replaces its row); part of the unit when in one."""
        unit = self._current()
        if unit is not None and unit.sql is None:
            unit.scored.extend(rows)
            return
        if unit is None and self.shared:
            self._write_scored(rows)
            return
        now_ms = _now_ms() if now_ms is None else now_ms
        with self._sql() as sql:
            sql.executemany(_UPSERT_SCORED, _scored_params(rows, now_ms))

    def record_outcome(self, tx_id: str, outcome: int, reported_ms: int, note: str = "") -> bool:
        """Store (or replace) a label; returns once it is committed (synchronously, on every backend).
        True when the transaction was scored here."""
        with self._sql() as sql:
            sql.execute(_UPSERT_OUTCOME, (tx_id, int(outcome), int(reported_ms), _now_ms(), note))
            known = sql.one("SELECT 1 FROM risk_scored WHERE tx_id = ?", (tx_id,)) is not None
        unit = self._current()
        return known or (unit is not None and any(r.tx.transaction_id == tx_id for r in unit.scored))

    def outcome(self, tx_id: str) -> int | None:
        self._ensure_schema()
        value = self.db.scalar("SELECT outcome FROM risk_outcomes WHERE tx_id = ?", (tx_id,))
        return None if value is None else int(value)

    def labelled_transactions(self) -> list[LabelledTx]:
        """Every stored scored transaction with its label (None without an outcome), in time order.

        The training command replays all of them (labelled or not) so velocity features see the same
        history they had at scoring time; only labelled ones become training rows.
        """
        self._ensure_schema()
        rows = self.db.all(
            "SELECT s.tx, o.outcome FROM risk_scored s LEFT JOIN risk_outcomes o ON o.tx_id = s.tx_id "
            "ORDER BY s.ts, s.tx_id"
        )
        out = []
        for tx_json, outcome in rows:
            label = None if outcome is None else int(int(outcome) in FRAUD_OUTCOMES)
            out.append(LabelledTx(Tx.from_json(tx_json), label))
        return out

    def counts(self) -> dict[str, int]:
        self._ensure_schema()
        with self.db.read() as sql:
            out = {
                "scored": int(sql.scalar("SELECT count(*) FROM risk_scored")),
                "outcomes": int(sql.scalar("SELECT count(*) FROM risk_outcomes")),
            }
            if self.sql_velocity is not None:
                out.update(self.sql_velocity.counts(sql))
        if self.redis_velocity is not None:
            out.update(self.redis_velocity.counts())
        return out

    # --- upgrade -----------------------------------------------------------------------------------------
    def import_legacy(self, path: Path) -> dict[str, int] | None:
        """Bring in the state file an earlier version kept (``var/risk/state.sqlite3``): its scored log
        and labels, and (embedded) its velocity events, then rename it ``*.imported`` so it is read once.
        None when there is no such file."""
        path = Path(path)
        if not path.is_file():
            return None
        self._ensure_schema()
        old = sqlite3.connect(path)  # read-write: closing it checkpoints a WAL left by a killed process
        try:
            tables = {row[0] for row in old.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            scored = old.execute(
                "SELECT tx_id, ts, tx, fraud_probability, anomaly_score, decision, model_version, scored_ms "
                "FROM scored"
            ).fetchall() if "scored" in tables else []  # fmt: skip
            outcomes = old.execute(
                "SELECT tx_id, outcome, reported_ms, received_ms, note FROM outcomes"
            ).fetchall() if "outcomes" in tables else []  # fmt: skip
            events = old.execute(
                "SELECT tx_id, ts, card, user_id, device_id, amount_ref FROM events ORDER BY ts, tx_id"
            ).fetchall() if "events" in tables and self.sql_velocity is not None else []  # fmt: skip
            cards = old.execute(
                "SELECT card, first_ms, first_tx_id, last_ms FROM cards"
            ).fetchall() if "cards" in tables and self.sql_velocity is not None else []  # fmt: skip
        finally:
            old.close()
        with self.db.transaction() as sql:
            sql.executemany(_INSERT_SCORED + "NOTHING", scored)
            sql.executemany(_INSERT_OUTCOME + "NOTHING", outcomes)
            if events:
                sql.executemany(
                    "INSERT INTO risk_events (tx_id, ts, card, user_id, device_id, amount_ref) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tx_id) DO NOTHING",
                    events,
                )
                sql.executemany(
                    "INSERT INTO risk_cards (card, first_ms, first_tx_id, last_ms) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (card) DO NOTHING",
                    cards,
                )
        for suffix in ("", "-wal", "-shm"):
            legacy = Path(str(path) + suffix)
            if legacy.exists():
                legacy.rename(Path(str(path) + ".imported" + suffix))
        counts = {"scored": len(scored), "outcomes": len(outcomes), "events": len(events)}
        log.info("imported legacy risk state from %s: %s", path, counts)
        return counts
