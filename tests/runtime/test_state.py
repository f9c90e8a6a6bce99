"""The state layer on both backends: migrations, transactions, notifications, outages, settings."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from services.runtime.config import ConfigError, RuntimeSettings, load_settings
from services.runtime.state import (
    Database,
    Migration,
    PostgresDatabase,
    SqliteDatabase,
    StateConfig,
    StoreUnavailable,
    ddl_for,
    open_database,
)
from tests.stores import PG_PASSWORD, PostgresServer

MIGRATIONS = [
    Migration(
        "CREATE TABLE t_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL, ts INTEGER NOT NULL, "
        "x REAL NOT NULL, blob BLOB);"
        "CREATE TABLE t_kv (k TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID"
    ),
    "CREATE INDEX t_log_ts ON t_log (ts)",
]


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        database: Database = SqliteDatabase(tmp_path / "state" / "t.sqlite3")
    else:
        url = request.getfixturevalue("pg_url")
        database = PostgresDatabase(url, PG_PASSWORD, name="t")
    yield database
    database.close()


def test_ddl_is_widened_for_postgres() -> None:
    ddl = ddl_for(
        "postgres", "CREATE TABLE a (id INTEGER PRIMARY KEY AUTOINCREMENT, t INTEGER, r REAL, b BLOB)"
    )
    assert "BIGSERIAL PRIMARY KEY" in ddl and "t BIGINT" in ddl
    assert "DOUBLE PRECISION" in ddl and "BYTEA" in ddl


def test_migrations_apply_once_and_in_order(db: Database) -> None:
    assert db.migrate("t", MIGRATIONS) == 2
    assert db.migrate("t", MIGRATIONS) == 0
    assert db.schema_version("t") == 2
    assert db.migrate("t", [*MIGRATIONS, "ALTER TABLE t_kv ADD COLUMN note TEXT"]) == 1
    assert db.schema_version("t") == 3


def test_concurrent_migrations_apply_each_step_once(db: Database) -> None:
    """Replicas starting together, each with its own connection(s): every step runs exactly once (a
    second run of a step would fail: the DDL has no IF NOT EXISTS)."""
    results: list[int | BaseException] = []

    def replica() -> Database:
        if isinstance(db, SqliteDatabase):
            return SqliteDatabase(db.path)
        assert isinstance(db, PostgresDatabase)
        return PostgresDatabase(db.url, PG_PASSWORD, name="t")

    def run() -> None:
        other = replica()
        try:
            results.append(other.migrate("t", MIGRATIONS))
        except BaseException as exc:
            results.append(exc)
        finally:
            other.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, int) for r in results), results
    assert sum(results) == 2 and db.schema_version("t") == 2  # type: ignore[arg-type]


def test_types_round_trip_and_transactions_roll_back(db: Database) -> None:
    db.migrate("t", MIGRATIONS)
    big = 1_800_000_000_000  # ms timestamps need 64 bits
    with db.transaction() as tx:
        seq = tx.scalar(
            "INSERT INTO t_log (body, ts, x, blob) VALUES (?, ?, ?, ?) RETURNING seq",
            ("50% off?", big, 0.1 + 0.2, b"\x00\xff"),
        )
    assert db.one("SELECT body, ts, x, blob FROM t_log WHERE seq = ?", (seq,)) == (
        "50% off?",
        big,
        0.1 + 0.2,
        b"\x00\xff",
    )
    with pytest.raises(RuntimeError), db.transaction() as tx:
        tx.execute("INSERT INTO t_kv (k, n) VALUES (?, ?)", ("a", 1))
        raise RuntimeError("boom")
    assert db.scalar("SELECT COUNT(*) FROM t_kv") == 0
    upsert = "INSERT INTO t_kv (k, n) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET n = t_kv.n + excluded.n"
    for _ in range(3):
        db.execute(upsert, ("a", 2))
    assert db.scalar("SELECT n FROM t_kv WHERE k = ?", ("a",)) == 6


def test_notifications_arrive_after_commit_only(db: Database) -> None:
    db.migrate("t", MIGRATIONS)
    got: list[str | None] = []
    arrived, listening = threading.Event(), threading.Event()

    def on_change(payload: str | None) -> None:
        got.append(payload)
        (listening if payload is None else arrived).set()

    db.listen("t_changes", on_change)
    if db.dialect == "postgres":
        assert listening.wait(10)  # LISTEN is in place (a NOTIFY before it would reach nobody)
    with pytest.raises(RuntimeError), db.transaction() as tx:
        tx.notify("t_changes", "rolled-back")
        raise RuntimeError
    with db.transaction() as tx:
        tx.lock("t_log")
        seq = tx.scalar("INSERT INTO t_log (body, ts, x) VALUES ('a', 1, 1.0) RETURNING seq")
        tx.notify("t_changes", str(seq))
    assert arrived.wait(10)
    assert [p for p in got if p is not None] == [str(seq)]


def test_postgres_down_is_unavailable_then_recovers() -> None:
    """A server of its own: killing the session's shared server would disturb other tests."""
    server = PostgresServer().start()
    url = server.create_database("t_outage")
    db = PostgresDatabase(url, PG_PASSWORD, name="t", timeout_s=1.0)
    try:
        db.migrate("t", MIGRATIONS)
        db.execute("INSERT INTO t_kv (k, n) VALUES ('acked', 1)")
        server.kill9()
        with pytest.raises(StoreUnavailable) as info:
            db.execute("INSERT INTO t_kv (k, n) VALUES ('lost', 1)")
        assert info.value.retry_after_s and "t store unavailable" in info.value.message
        with pytest.raises(StoreUnavailable):
            db.check()
        server.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                db.check()
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "pool did not reconnect"
                time.sleep(0.2)
        assert db.all("SELECT k FROM t_kv") == [("acked",)]
    finally:
        db.close()
        server.close()


def test_open_database_follows_the_settings(tmp_path: Path) -> None:
    config = StateConfig(state_dir=tmp_path / "st")
    db = open_database(config, "risk")
    try:
        assert isinstance(db, SqliteDatabase) and Path(db.path) == tmp_path / "st" / "risk.sqlite3"
    finally:
        db.close()


def test_settings_validate_the_state_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBEC_STATE_BACKEND", "shared")
    monkeypatch.delenv("CBEC_DATABASE_URL", raising=False)
    monkeypatch.delenv("CBEC_REDIS_URL", raising=False)
    with pytest.raises(ConfigError):
        load_settings(RuntimeSettings, "risk")
    monkeypatch.setenv("CBEC_STATE_BACKEND", "embedded")
    monkeypatch.setenv("CBEC_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CBEC_STATE_DIR", str(tmp_path / "models" / "state"))
    with pytest.raises(ConfigError):
        load_settings(RuntimeSettings, "risk")
    monkeypatch.setenv("CBEC_STATE_DIR", "relative/state")
    settings = load_settings(RuntimeSettings, "risk")
    assert settings.state_dir.is_absolute()
    assert "secret" not in repr(RuntimeSettings(service="risk", database_password="secret"))
