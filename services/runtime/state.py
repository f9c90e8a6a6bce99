"""The state layer: one way to open, migrate, write transactionally, listen to and health-check a store.

Two backends, chosen by ``CBEC_STATE_BACKEND``:

- ``embedded`` (the default, what ``make run`` uses): one SQLite file per store under ``CBEC_STATE_DIR``
  in WAL mode. One process owns it, so it is for one replica.
- ``shared``: PostgreSQL (``CBEC_DATABASE_URL``) through a psycopg 3 connection pool, for any number of
  replicas. Change notifications ride on ``LISTEN/NOTIFY``: they are sent at commit, in commit order,
  and never for a rolled-back write, which is why they are not on Redis pub/sub.

Domain repositories write SQL once, in the common subset of both (``?`` placeholders, ``ON CONFLICT``,
``RETURNING``); DDL is written in SQLite's words and widened for PostgreSQL (INTEGER -> BIGINT,
REAL -> DOUBLE PRECISION, BLOB -> BYTEA; types in upper case, names in lower case). Migrations are
numbered per component and applied at start-up under a lock, so replicas starting together apply each
one exactly once.

Every driver error that means "the store is not reachable now" becomes ``StoreUnavailable``
(UNAVAILABLE with RetryInfo to the client, never INTERNAL). Hot shared state (sessions with a TTL,
velocity windows, rate limits) lives in Redis: ``redis_client`` opens it with the same settings.

Under a sampled request (``tracing.py``) every statement and every Redis command or pipeline is a
CLIENT span (the statement text with its placeholders, never the values).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import tracing
from .errors import ServiceError

log = logging.getLogger("cbec.state")

Dialect = Literal["sqlite", "postgres"]
#: OpenTelemetry's ``db.system.name`` of each dialect.
_SYSTEMS: dict[str, str] = {"sqlite": "sqlite", "postgres": "postgresql"}
Params = Sequence[Any]
_MIGRATIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "component TEXT NOT NULL, version INTEGER NOT NULL, applied REAL NOT NULL, "
    "PRIMARY KEY (component, version))"
)


class StoreUnavailable(ServiceError):
    """The store cannot be reached now; clients get UNAVAILABLE with a retry delay."""

    def __init__(self, store: str, reason: str, retry_after_s: float = 1.0) -> None:
        import grpc

        super().__init__(
            grpc.StatusCode.UNAVAILABLE, f"{store} store unavailable: {reason}", (), retry_after_s
        )
        self.store = store


class StateConfigError(ValueError):
    """A store the service needs is not configured (start-up exits with status 2 and this message)."""


# --- SQL dialects ---------------------------------------------------------------------------------------
# Type names are matched in upper case only, so a column called ``blob`` or ``real`` keeps its name.
_DDL_WORDS = [
    (re.compile(r"\bINTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT\b"), "BIGSERIAL PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\)\s*WITHOUT\s+ROWID"), ")"),
]


def ddl_for(dialect: Dialect, ddl: str) -> str:
    """SQLite DDL as written, or widened for PostgreSQL (64-bit integers, double precision, bytea)."""
    if dialect == "sqlite":
        return ddl
    for pattern, replacement in _DDL_WORDS:
        ddl = pattern.sub(replacement, ddl)
    return ddl


def sql_for(dialect: Dialect, sql: str) -> str:
    """``?`` placeholders as each driver wants them (psycopg uses ``%s``, so a literal % is doubled)."""
    if dialect == "sqlite":
        return sql
    return sql.replace("%", "%%").replace("?", "%s")


def split_statements(script: str) -> list[str]:
    """A migration script as single statements (no ``;`` inside literals in our DDL)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


@dataclass(frozen=True)
class Migration:
    """One schema step of a component; ``postgres`` replaces ``sql`` where the dialects differ."""

    sql: str
    postgres: str | None = None

    def statements(self, dialect: Dialect) -> list[str]:
        if dialect == "postgres":
            return split_statements(
                self.postgres if self.postgres is not None else ddl_for(dialect, self.sql)
            )
        return split_statements(self.sql)


# --- transactions -------------------------------------------------------------------------------------------
class Tx:
    """One unit of work on one connection: ``execute``/``all``/``one``/``scalar`` and ``notify``."""

    def __init__(self, db: Database, cursor: Any) -> None:
        self.db = db
        self.cursor = cursor
        self.notifications: list[tuple[str, str]] = []

    @property
    def dialect(self) -> Dialect:
        return self.db.dialect

    def _span(self, sql: str) -> contextlib.AbstractContextManager[Any]:
        operation = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else "SQL"
        return tracing.store_span(_SYSTEMS[self.dialect], operation, self.db.name, sql)

    def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; returns the affected row count."""
        with self._span(sql):
            self.cursor.execute(sql_for(self.dialect, sql), tuple(params))
        return int(self.cursor.rowcount or 0)

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        if rows:
            with self._span(sql):
                self.cursor.executemany(sql_for(self.dialect, sql), [tuple(r) for r in rows])

    def all(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        with self._span(sql):
            self.cursor.execute(sql_for(self.dialect, sql), tuple(params))
            return [tuple(row) for row in self.cursor.fetchall()]

    def one(self, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
        with self._span(sql):
            self.cursor.execute(sql_for(self.dialect, sql), tuple(params))
            row = self.cursor.fetchone()
        return None if row is None else tuple(row)

    def scalar(self, sql: str, params: Params = ()) -> Any:
        row = self.one(sql, params)
        return None if row is None else row[0]

    def notify(self, channel: str, payload: str = "") -> None:
        """Tell every replica's listeners after this transaction commits (never if it rolls back)."""
        self.notifications.append((channel, payload))

    def lock(self, name: str) -> None:
        """Serialize this transaction with every other that takes the same lock, until commit.

        Appenders to an ordered log take it so sequence order equals commit order, and a reader that
        tails ``seq > last`` never skips a row that commits late. SQLite writers are serial already.
        """
        if self.dialect == "postgres":
            self.cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (name,))


Listener = Callable[[str | None], None]


class Database(abc.ABC):
    """A store's connection(s). Subclasses: ``SqliteDatabase`` and ``PostgresDatabase``."""

    dialect: Dialect
    name: str

    def __init__(self, name: str) -> None:
        self.name = name
        self._listeners: dict[str, list[Listener]] = {}
        self._listen_lock = threading.Lock()

    # public API ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[Tx]:
        """One unit of work: committed when the block ends, rolled back when it raises."""

    def read(self) -> contextlib.AbstractContextManager[Tx]:
        """A read-only unit (the same as a transaction; PostgreSQL reads see committed data)."""
        return self.transaction()

    def execute(self, sql: str, params: Params = ()) -> int:
        with self.transaction() as tx:
            return tx.execute(sql, params)

    def all(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        with self.read() as tx:
            return tx.all(sql, params)

    def one(self, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
        with self.read() as tx:
            return tx.one(sql, params)

    def scalar(self, sql: str, params: Params = ()) -> Any:
        with self.read() as tx:
            return tx.scalar(sql, params)

    def migrate(self, component: str, migrations: Sequence[Migration | str], wait_s: float = 60.0) -> int:
        """Apply the migrations not yet applied (numbered from 1), each in its own transaction, under a
        lock so replicas starting together apply each once. Returns how many were applied.

        A store that is not reachable yet (a database starting beside the service) is waited for up to
        ``wait_s``, so a pod does not crash-loop while its database comes up."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._migrate(component, migrations)
            except StoreUnavailable as exc:
                if time.monotonic() >= deadline:
                    raise
                log.warning(
                    "store not reachable yet, retrying", extra={"store": self.name, "error": exc.message}
                )
                time.sleep(1.0)

    def _migrate(self, component: str, migrations: Sequence[Migration | str]) -> int:
        steps = [m if isinstance(m, Migration) else Migration(m) for m in migrations]
        applied = 0
        with self.transaction() as tx:
            tx.lock("schema_migrations")
            tx.execute(ddl_for(self.dialect, _MIGRATIONS_DDL))
        for version, step in enumerate(steps, start=1):
            with self.transaction() as tx:
                tx.lock("schema_migrations")
                done = tx.one(
                    "SELECT 1 FROM schema_migrations WHERE component = ? AND version = ?",
                    (component, version),
                )
                if done is not None:
                    continue
                for statement in step.statements(self.dialect):
                    tx.execute(statement)
                tx.execute(
                    "INSERT INTO schema_migrations (component, version, applied) VALUES (?, ?, ?)",
                    (component, version, time.time()),
                )
                applied += 1
        if applied:
            log.info("migrated", extra={"store": self.name, "component": component, "applied": applied})
        return applied

    def schema_version(self, component: str) -> int:
        return int(
            self.scalar(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations WHERE component = ?", (component,)
            )
            or 0
        )

    def listen(self, channel: str, callback: Listener) -> None:
        """Call ``callback(payload)`` for every notification on ``channel`` from any replica (in this
        process for the embedded backend). ``callback(None)`` means notifications may have been missed
        (a reconnect): the listener should catch up from its own position."""
        with self._listen_lock:
            self._listeners.setdefault(channel, []).append(callback)
            self._start_listening(channel)

    def check(self) -> None:
        """Raise StoreUnavailable unless a trivial query answers."""
        self.scalar("SELECT 1")

    @abc.abstractmethod
    def close(self) -> None: ...

    # internals -------------------------------------------------------------------------------------------
    def _start_listening(self, channel: str) -> None:
        return None

    def _dispatch(self, channel: str, payload: str | None) -> None:
        with self._listen_lock:
            callbacks = list(self._listeners.get(channel, ()))
        for callback in callbacks:
            try:
                callback(payload)
            except Exception:
                log.exception("listener failed", extra={"store": self.name, "channel": channel})


class SqliteDatabase(Database):
    """One SQLite file (WAL) and one connection guarded by a lock; notifications stay in-process."""

    dialect: Dialect = "sqlite"

    def __init__(
        self, path: Path | str, name: str = "", synchronous: str = "FULL", read_only: bool = False
    ) -> None:
        super().__init__(name or Path(str(path)).stem)
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError("synchronous must be NORMAL, FULL or EXTRA")
        self.path = str(path)
        self._lock = threading.RLock()
        self._depth = 0
        if read_only:
            uri = f"file:{Path(self.path).resolve()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            if self.path != ":memory:":
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise RuntimeError(f"SQLite refused WAL mode for {self.path} (got {mode})")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute("PRAGMA busy_timeout=10000")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._lock:
            if self._depth:  # nested: join the outer transaction
                self._depth += 1
                try:
                    yield self._tx
                finally:
                    self._depth -= 1
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(self.name, str(exc)) from exc
            tx = Tx(self, self._db.cursor())
            self._tx, self._depth = tx, 1
            try:
                yield tx
                tx.cursor.close()  # an open statement would keep the WAL from being checkpointed
                self._db.execute("COMMIT")
            except BaseException as exc:
                tx.cursor.close()
                if self._db.in_transaction:  # a failed COMMIT has rolled back already
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and _sqlite_unavailable(exc):
                    raise StoreUnavailable(self.name, str(exc)) from exc
                raise
            finally:
                self._depth = 0
        for channel, payload in tx.notifications:
            self._dispatch(channel, payload)

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        with self._lock:
            if self._depth:
                yield self._tx
                return
            cursor = self._db.cursor()
            try:
                yield Tx(self, cursor)
            finally:
                cursor.close()

    def close(self) -> None:
        """Checkpoint the WAL into the file (so a copy of the file alone is complete), then close."""
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()


def _sqlite_unavailable(exc: sqlite3.OperationalError) -> bool:
    """Errors of the file, not of the statement: busy/locked, disk full, I/O (not "no such table")."""
    text = str(exc).lower()
    return any(word in text for word in ("locked", "busy", "disk", "i/o", "full"))


def _pg_errors() -> tuple[type[BaseException], ...]:
    import psycopg
    import psycopg_pool

    return (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout)


class PostgresDatabase(Database):
    """A psycopg 3 pool; notifications through LISTEN/NOTIFY on a dedicated connection per channel."""

    dialect: Dialect = "postgres"

    def __init__(
        self,
        url: str,
        password: str = "",
        name: str = "postgres",
        min_size: int = 1,
        max_size: int = 8,
        timeout_s: float = 2.0,
        statement_timeout_s: float = 10.0,
        application_name: str = "cbec",
    ) -> None:
        import psycopg_pool

        super().__init__(name)
        self.url = url
        self.timeout_s = timeout_s
        self._kwargs: dict[str, Any] = {
            "connect_timeout": max(1, round(timeout_s)),
            "application_name": application_name,
            "options": f"-c statement_timeout={int(statement_timeout_s * 1000)}",
            # A peer that vanished without a reset (node loss, failover) must fail calls within seconds,
            # not after the kernel's ~15 minutes: TCP keepalives and a user timeout on every connection.
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": int(max(timeout_s, 1.0) * 5000),
        }
        if password:
            self._kwargs["password"] = password
        self._errors = _pg_errors()
        self._closed = threading.Event()
        self._listen_threads: dict[str, threading.Thread] = {}
        # open=True, wait=False: a database that is down at start does not stop the process; calls
        # fail as StoreUnavailable until it answers, and health reports it.
        self.pool = psycopg_pool.ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs=self._kwargs,
            timeout=timeout_s,
            open=True,
            name=f"cbec-{name}",
            check=psycopg_pool.ConnectionPool.check_connection,
            reconnect_timeout=0,
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        tx: Tx | None = None
        try:
            with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                tx = Tx(self, cur)
                yield tx
                for channel, payload in tx.notifications:
                    cur.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        except self._errors as exc:
            raise StoreUnavailable(self.name, _short(exc)) from exc

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        try:
            with self.pool.connection() as conn, conn.cursor() as cur:
                yield Tx(self, cur)
        except self._errors as exc:
            raise StoreUnavailable(self.name, _short(exc)) from exc

    def _start_listening(self, channel: str) -> None:
        if channel in self._listen_threads:
            return
        thread = threading.Thread(
            target=self._listen_loop, args=(channel,), daemon=True, name=f"listen-{channel}"
        )
        self._listen_threads[channel] = thread
        thread.start()

    def _listen_loop(self, channel: str) -> None:
        import psycopg

        backoff = 0.2
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, **self._kwargs) as conn:
                    conn.execute(f"LISTEN {psycopg.sql.Identifier(channel).as_string(conn)}")
                    backoff = 0.2
                    self._dispatch(channel, None)  # (re)connected: catch up on anything missed
                    last_ping = time.monotonic()
                    while not self._closed.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self._dispatch(channel, note.payload)
                        if time.monotonic() - last_ping > 5.0:  # a dead connection raises: reconnect
                            conn.execute("SELECT 1")
                            last_ping = time.monotonic()
            except Exception as exc:  # reconnect on any failure; the listener must not die
                if self._closed.is_set():
                    return
                log.warning("listen connection lost", extra={"channel": channel, "error": _short(exc)})
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def close(self) -> None:
        self._closed.set()
        self.pool.close(timeout=2)
        for thread in self._listen_threads.values():
            thread.join(timeout=3)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


# --- opening stores from settings ---------------------------------------------------------------------------
@dataclass
class StateConfig:
    """What the runtime settings say about state (see ``RuntimeSettings``)."""

    backend: Literal["embedded", "shared"] = "embedded"
    state_dir: Path = Path("var")
    database_url: str = ""
    database_password: str = ""
    redis_url: str = ""
    redis_password: str = ""
    timeout_s: float = 2.0
    pool_max: int = 8
    service: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Any) -> StateConfig:
        return cls(
            backend=settings.state_backend,
            state_dir=Path(settings.state_dir),
            database_url=settings.database_url,
            database_password=settings.database_password.get_secret_value(),
            redis_url=settings.redis_url,
            redis_password=settings.redis_password.get_secret_value(),
            timeout_s=settings.state_timeout_s,
            pool_max=settings.state_pool_max,
            service=settings.service,
        )

    @property
    def shared(self) -> bool:
        return self.backend == "shared"


def open_database(config: StateConfig, name: str, synchronous: str = "FULL") -> Database:
    """The store ``name``: ``<state dir>/<name>.sqlite3`` embedded, or the shared PostgreSQL database
    (every store of every service in one database, tables prefixed by their component)."""
    if config.shared:
        if not config.database_url:
            raise StateConfigError(
                f"{config.service or name}: CBEC_STATE_BACKEND=shared needs CBEC_DATABASE_URL"
            )
        return PostgresDatabase(
            config.database_url,
            config.database_password,
            name=name,
            max_size=config.pool_max,
            timeout_s=config.timeout_s,
            application_name=f"cbec-{config.service or name}",
        )
    return SqliteDatabase(config.state_dir / f"{name}.sqlite3", name=name, synchronous=synchronous)


def redis_client(config: StateConfig, asyncio: bool = False) -> Any:
    """A redis-py client (asyncio or blocking) with timeouts and health checks from the settings."""
    import redis
    import redis.asyncio
    from redis.backoff import ExponentialBackoff

    retry_cls: Any = redis.asyncio.retry.Retry if asyncio else redis.retry.Retry
    if not config.redis_url:
        raise StateConfigError(f"{config.service or 'redis'}: CBEC_STATE_BACKEND=shared needs CBEC_REDIS_URL")
    return _traced_redis(asyncio).from_url(
        config.redis_url,
        password=config.redis_password or None,
        socket_timeout=config.timeout_s,
        socket_connect_timeout=config.timeout_s,
        health_check_interval=15,
        decode_responses=False,
        # One quick retry (a dropped connection), not redis-py's default of 10 with backoff up to 1 s:
        # a Redis that is down must become UNAVAILABLE within about the configured timeout.
        retry=retry_cls(ExponentialBackoff(cap=0.05, base=0.01), 1),
    )


def redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError, OSError)


def _redis_span(command: Any) -> contextlib.AbstractContextManager[Any]:
    name = command.decode() if isinstance(command, bytes) else str(command)
    return tracing.store_span("redis", name.split(" ", 1)[0].upper(), "redis")


_TRACED_REDIS: dict[bool, type] = {}


def _traced_redis(asyncio: bool) -> type:
    """redis-py's client class with a span per command and per pipeline round-trip (scripts are
    commands: EVALSHA). Subclasses, because redis-py has no per-command hook and the
    OpenTelemetry instrumentation patches every client of the process with one tracer provider."""
    cached = _TRACED_REDIS.get(asyncio)
    if cached is not None:
        return cached
    import redis
    import redis.asyncio

    if asyncio:

        class AsyncPipeline(redis.asyncio.client.Pipeline):
            async def execute(self, raise_on_error: bool = True) -> Any:
                with tracing.store_span("redis", "MULTI" if self.is_transaction else "PIPELINE", "redis"):
                    return await super().execute(raise_on_error)

        class AsyncRedis(redis.asyncio.Redis):
            async def execute_command(self, *args: Any, **options: Any) -> Any:
                with _redis_span(args[0] if args else "COMMAND"):
                    return await super().execute_command(*args, **options)

            def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Any:
                return AsyncPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)

        cached = AsyncRedis
    else:

        class Pipeline(redis.client.Pipeline):
            def execute(self, raise_on_error: bool = True) -> Any:
                with tracing.store_span("redis", "MULTI" if self.transaction else "PIPELINE", "redis"):
                    return super().execute(raise_on_error)

        class Redis(redis.Redis):
            def execute_command(self, *args: Any, **options: Any) -> Any:
                with _redis_span(args[0] if args else "COMMAND"):
                    return super().execute_command(*args, **options)

            def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Any:
                return Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)

        cached = Redis
    _TRACED_REDIS[asyncio] = cached
    return cached
