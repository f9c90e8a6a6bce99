"""The real PostgreSQL/Redis servers of tests/stores.py: password auth, and durability across kill -9."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest
import redis

from tests import stores
from tests.stores import PG_PASSWORD, REDIS_PASSWORD, PostgresServer, RedisServer, store_env

# The fixtures, by assignment: importing them by name would trip ruff's F811 on the test parameters.
postgres_server = stores.postgres_server
redis_server = stores.redis_server
pg_url = stores.pg_url
redis_db = stores.redis_db


def test_postgres_password_auth(
    pg_url: str, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)  # libpq would use these instead of failing
    monkeypatch.setenv("PGPASSFILE", os.devnull)
    with psycopg.connect(pg_url, password=PG_PASSWORD, connect_timeout=5) as conn:
        user, db, fsync = conn.execute(
            "SELECT current_user, current_database(), current_setting('fsync')"
        ).fetchone()  # type: ignore[misc]
        assert (user, fsync) == ("cbec", "on")
        assert pg_url.endswith(f"/{db}") and db != "cbec"  # a database of its own
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")  # cbec owns it
    assert "cbec-test-pw" not in pg_url and "cbec-test-pw" not in postgres_server.dsn
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(pg_url, connect_timeout=5).close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg_url, password="wrong", connect_timeout=5).close()
    with psycopg.connect(postgres_server.dsn, password=postgres_server.password) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("cbec",)


def test_pg_url_is_fresh_per_test(pg_url: str) -> None:
    with psycopg.connect(pg_url, password=PG_PASSWORD) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        assert tables == (0,)


def test_redis_password_auth(redis_db: str, redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_db, password=REDIS_PASSWORD, socket_timeout=5)
    try:
        assert client.dbsize() == 0  # flushed for this test
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
    finally:
        client.close()
    anonymous = redis.Redis.from_url(redis_db, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        anonymous.get("k")
    anonymous.close()
    env = store_env("postgresql://x/y", redis_db)
    assert env["CBEC_STATE_BACKEND"] == "shared" and env["CBEC_REDIS_PASSWORD"] == redis_server.password


def test_postgres_committed_row_survives_kill9() -> None:
    with PostgresServer() as pg:
        if os.geteuid() == 0:  # PostgreSQL refuses root: it runs unprivileged
            assert os.stat(pg.data_dir).st_uid == 10001
        conn = psycopg.connect(pg.dsn, password=pg.password)
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO orders VALUES (1, 'committed')")
        conn.commit()
        conn.execute("INSERT INTO orders VALUES (2, 'never committed')")
        pg.kill9()  # mid-transaction, no checkpoint, no shutdown
        conn.close()
        assert not pg.running
        port = pg.port
        pg.start()  # same data dir and port: crash recovery replays the WAL
        assert pg.port == port
        with psycopg.connect(pg.dsn, password=pg.password) as conn:
            assert conn.execute("SELECT id, note FROM orders").fetchall() == [(1, "committed")]


def test_redis_appendfsync_always_write_survives_kill9() -> None:
    with RedisServer() as rd:
        client = redis.Redis.from_url(rd.url, password=rd.password, socket_timeout=5)
        client.set("order:1", "paid")
        client.incrby("stock:42", 3)
        client.close()
        rd.kill9()
        assert not rd.running
        rd.start()
        client = redis.Redis.from_url(rd.url, password=rd.password, socket_timeout=5)
        try:
            assert client.get("order:1") == b"paid"
            assert client.get("stock:42") == b"3"
        finally:
            client.close()


def test_missing_install_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CBEC_STORES_ROOT", str(tmp_path))
    with pytest.raises(stores.StoresMissing, match="make deploy-tools"):
        PostgresServer()
