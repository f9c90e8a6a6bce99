"""Chat replicas on one shared PostgreSQL + Redis (real servers from tests/stores.py): a conversation moves
between replicas with its history, ends and expires for both; an article upserted on one is retrieved on
the other; concurrent returns for one order through both make one return; a store that is down is
UNAVAILABLE with RetryInfo, never INTERNAL; ``kill -9`` loses no acknowledged turn."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import redis
from cbec.chat.v1 import chat_pb2, chat_pb2_grpc
from google.rpc import error_details_pb2

from services.chat.config import ChatSettings
from services.chat.store import ChatStore, TurnRecord, session_keys
from services.runtime import probe
from services.runtime.config import load_settings
from services.runtime.errors import status_from_error
from services.runtime.state import StateConfig
from tests.chat.conftest import Prepared, chat_settings, converse, running, seed
from tests.stores import (
    PG_PASSWORD,
    REDIS_PASSWORD,
    PostgresServer,
    RedisServer,
    free_port,
    shared_fields,
    store_env,
)
from tests.support import as_user

ROOT = Path(__file__).resolve().parents[2]
GIFT_CARDS = chat_pb2.Article(
    article_id="gift-cards",
    topic="gift_cards",
    language="en",
    title="Gift cards",
    body="Gift cards are valid for three years and can be used for any product. "
    "They cannot be exchanged for cash. Lost gift cards can be blocked and reissued.",
    tags=["gift card", "voucher", "balance"],
)


def shared_state(pg: str, rd: str) -> StateConfig:
    return StateConfig(
        backend="shared",
        database_url=pg,
        database_password=PG_PASSWORD,
        redis_url=rd,
        redis_password=REDIS_PASSWORD,
        timeout_s=1.0,
    )


def seeded(prepared: Prepared, pg: str, rd: str) -> None:
    store = ChatStore.open(shared_state(pg, rd))
    try:
        seed(store, prepared)
    finally:
        store.close()


def shared_settings(prepared: Prepared, state_dir: Path, pg: str, rd: str, **over: Any) -> ChatSettings:
    return chat_settings(
        prepared,
        state_dir,
        **shared_fields(pg, rd),
        state_timeout_s=1.0,
        **over,
    )


def redis_of(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, password=REDIS_PASSWORD)


def sql(pg: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg, password=PG_PASSWORD) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


async def eventually(check: Callable[[], Awaitable[bool]], what: str, deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code()


async def assert_unavailable(call: Awaitable[Any]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (err.value.code(), err.value.details())
    status = status_from_error(err.value)
    assert status is not None
    assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)


async def test_a_conversation_knowledge_and_returns_span_two_replicas(
    prepared: Prepared, tmp_path: Path, pg_url: str, redis_db: str
) -> None:
    seeded(prepared, pg_url, redis_db)
    ttl_s = 600
    rd = redis_of(redis_db)
    async with (
        running(shared_settings(prepared, tmp_path / "a", pg_url, redis_db, session_ttl_s=ttl_s)) as (_, a),
        running(shared_settings(prepared, tmp_path / "b", pg_url, redis_db, session_ttl_s=ttl_s)) as (_, b),
    ):
        # Started on A, continued on B: B answers from the history A wrote (the order id was said on A).
        _, first = await converse(a, "Where is my order CB-100231?", user_id="u-1001")
        sid = first.session_id
        assert first.intent == "order_status" and "JD014600006281" in first.answer
        _, follow = await converse(b, "What is the status of my order?", session_id=sid, user_id="u-1001")
        assert follow.session_id == sid
        assert follow.intent == "order_status" and "JD014600006281" in follow.answer
        got = (await b.GetSession(chat_pb2.GetSessionRequest(session_id=sid))).session
        assert [t.text for t in got.turns][::2] == [
            "Where is my order CB-100231?",
            "What is the status of my order?",
        ]
        assert got.turns[1].text == first.answer and got.user_id == "u-1001"
        same = (await a.GetSession(chat_pb2.GetSessionRequest(session_id=sid))).session
        assert same == got
        # Another user cannot continue it on either replica.
        for stub in (a, b):
            assert await code_of(converse(stub, "hi", session_id=sid, user_id="u-1002")) == (
                grpc.StatusCode.NOT_FOUND
            )

        # Hot state in Redis with the configured TTL, refreshed by every turn on any replica.
        keys = session_keys(sid)
        assert all(0 < rd.pttl(k) <= ttl_s * 1000 for k in keys)
        for k in keys:
            rd.pexpire(k, 100_000)
        await converse(b, "How long does shipping take?", session_id=sid, user_id="u-1001")
        assert all(rd.pttl(k) > 100_000 for k in keys)
        # Every turn is also in PostgreSQL, the durable transcript.
        texts = [r[0] for r in sql(pg_url, "SELECT text FROM chat_transcripts WHERE session_id = %s", (sid,))]
        assert len(texts) == 6 and texts[0] == "Where is my order CB-100231?"

        # Ended on B: gone for A.
        assert (await b.EndSession(chat_pb2.EndSessionRequest(session_id=sid))).ended
        assert await code_of(a.GetSession(chat_pb2.GetSessionRequest(session_id=sid))) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert await code_of(converse(a, "and now?", session_id=sid, user_id="u-1001")) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert not (await a.EndSession(chat_pb2.EndSessionRequest(session_id=sid))).ended

        # Expired in Redis (its TTL run out): NOT_FOUND on both.
        _, other = await converse(a, "How do returns work?", user_id="u-1003")
        for k in session_keys(other.session_id):
            rd.pexpire(k, 1)

        async def expired() -> bool:
            request = chat_pb2.GetSessionRequest(session_id=other.session_id)
            try:
                await b.GetSession(request)
            except grpc.aio.AioRpcError as err:
                return err.code() == grpc.StatusCode.NOT_FOUND
            return False

        await eventually(expired, "the session outlived its TTL")
        assert await code_of(converse(a, "hello?", session_id=other.session_id, user_id="u-1003")) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert not any(rd.exists(k) for k in session_keys(other.session_id))  # no turn resurrected it

        # An article upserted on A is retrieved on B (B rebuilt its index on the notification).
        question = "Wie lange ist mein Geschenkgutschein gültig?"
        _, before = await converse(b, question)
        assert "gift-cards" not in [s.article_id for s in before.sources]
        # (Through a third replica with the internal token: UpsertKnowledge is an admin RPC.)
        admin_settings = shared_settings(prepared, tmp_path / "c", pg_url, redis_db, session_ttl_s=ttl_s)
        async with running(admin_settings, admin=True) as (_, c):
            upserted = await c.UpsertKnowledge(chat_pb2.UpsertKnowledgeRequest(articles=[GIFT_CARDS]))
        assert upserted.upserted_count == 1

        async def retrieved_on_b() -> bool:
            _, result = await converse(b, question)
            return bool(result.sources) and result.sources[0].article_id == "gift-cards"

        # The notification makes this milliseconds; the 30-s safety re-check alone would miss the deadline.
        await eventually(retrieved_on_b, "replica B never served the article upserted on A", deadline_s=15)

        # Concurrent returns for one delivered order through both replicas: one return.
        calls = [converse(s, "I want to return order CB-100245", user_id="u-1001") for s in (a, b) * 3]
        answers = [r.answer for _, r in await asyncio.gather(*calls)]
        rows = sql(pg_url, "SELECT return_id FROM chat_returns WHERE order_id = 'CB-100245'")
        assert len(rows) == 1
        assert all(rows[0][0] in answer for answer in answers)
        status = sql(pg_url, "SELECT status FROM chat_orders WHERE order_id = 'CB-100245'")
        assert status == [("return_started",)]
    rd.close()


def test_start_return_races_across_stores_create_one_return(
    prepared: Prepared, pg_url: str, redis_db: str
) -> None:
    seeded(prepared, pg_url, redis_db)
    stores = [ChatStore.open(shared_state(pg_url, redis_db)) for _ in range(2)]
    barrier = threading.Barrier(8)

    def start(i: int) -> tuple[str, bool]:
        barrier.wait()
        return stores[i % 2].start_return("CB-100262", "u-1002")

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(start, range(8)))
        assert len({rid for rid, _ in results}) == 1
        assert sum(created for _, created in results) == 1
        assert stores[0].order_for_user("CB-100262", "u-1002").status == "return_started"  # type: ignore[union-attr]
        assert stores[1].order_for_user("CB-100262", "u-1001") is None  # never another user's order
        with pytest.raises(LookupError):
            stores[1].start_return("CB-100262", "u-1001")
    finally:
        for store in stores:
            store.close()


def test_sessions_in_redis_keep_the_store_semantics(prepared: Prepared, pg_url: str, redis_db: str) -> None:
    store = ChatStore.open(shared_state(pg_url, redis_db))
    try:
        s = store.create_session("u-1", ttl_s=60, now=1000.0)
        turns = [TurnRecord(1, f"q{i}", "shipping", 1000.0 + i) for i in range(5)]
        store.append_turns(s.session_id, turns, max_turns=3, ttl_s=60, now=1001.0, user_id="u-1")
        got = store.get_session(s.session_id)
        assert got is not None and [t.text for t in got.turns] == ["q2", "q3", "q4"]  # bounded
        assert got.expires == 1061.0 and got.created == 1000.0
        assert len(store.transcript(s.session_id)) == 5  # the durable record keeps every turn
        assert store.get_session(s.session_id, now=1062.0) is None  # a moved clock expires it
        assert store.get_session(s.session_id) is None  # ...and it was deleted
        store.append_turns(s.session_id, turns[:1], max_turns=3, ttl_s=60, user_id="u-1")
        assert store.get_session(s.session_id) is None  # a late turn does not resurrect it
        assert len(store.transcript(s.session_id)) == 6
        assert not store.end_session(s.session_id)
    finally:
        store.close()


def test_seeding_follows_the_shared_settings(
    prepared: Prepared, pg_url: str, redis_db: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What defaults.py and train.py do in a cluster Job: CBEC_* settings pick the shared store."""
    for key, value in store_env(pg_url, redis_db).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CBEC_MODELS_DIR", str(tmp_path / "models"))
    state = StateConfig.from_settings(load_settings(ChatSettings, "chat"))
    assert state.shared
    store = ChatStore.open(state)
    try:
        seed(store, prepared)
        assert store.db.dialect == "postgres" and store.count_orders() == 7
    finally:
        store.close()
    assert sql(pg_url, "SELECT COUNT(*) FROM chat_articles") == [(len(prepared.articles),)]


async def test_store_outages_are_unavailable_and_recover(prepared: Prepared, tmp_path: Path) -> None:
    """Servers of their own: killing the session's shared ones would disturb other tests."""
    with PostgresServer() as pg, RedisServer() as rd:
        url = pg.create_database("chat_outage")
        seeded(prepared, url, rd.url)
        settings = shared_settings(prepared, tmp_path / "state", url, rd.url, state_check_s=0.2)
        async with running(settings, admin=True) as (_, stub):  # admin: UpsertKnowledge below
            _, r = await converse(stub, "How long does shipping take?", user_id="u-1001")
            sid = r.session_id
            acknowledged = 1

            rd.kill9()  # sessions are unavailable; never INTERNAL
            await assert_unavailable(converse(stub, "and returns?", session_id=sid, user_id="u-1001"))
            await assert_unavailable(converse(stub, "a new conversation", user_id="u-1001"))
            await assert_unavailable(stub.GetSession(chat_pb2.GetSessionRequest(session_id=sid)))
            await assert_unavailable(stub.EndSession(chat_pb2.EndSessionRequest(session_id=sid)))
            rd.start()  # append-only file: the session is still there

            async def continues() -> bool:
                nonlocal acknowledged
                try:
                    await converse(stub, "How do returns work?", session_id=sid, user_id="u-1001")
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                    return False
                acknowledged += 1
                return True

            await eventually(continues, "the session did not continue after Redis came back")

            pg.kill9()  # writes are unavailable: a turn is not acknowledged unless it is in the transcript
            for _ in range(2):
                turn = converse(stub, "How long is shipping?", session_id=sid, user_id="u-1001")
                await assert_unavailable(turn)
            await assert_unavailable(
                stub.UpsertKnowledge(chat_pb2.UpsertKnowledgeRequest(articles=[GIFT_CARDS]))
            )
            mine = as_user("u-1001")
            got = (await stub.GetSession(chat_pb2.GetSessionRequest(session_id=sid), metadata=mine)).session
            assert len(got.turns) == 2 * acknowledged  # hot state still serves reads
            pg.start()
            await eventually(continues, "turns were not accepted after PostgreSQL came back")
        rows = sql(url, "SELECT role FROM chat_transcripts WHERE session_id = %s ORDER BY seq", (sid,))
        assert len(rows) >= 2 * acknowledged


def start_process(prepared: Prepared, state_dir: Path, env_extra: dict[str, str]) -> tuple[Any, int]:
    port = free_port()
    env = {
        **os.environ,
        "CBEC_HOST": "127.0.0.1",
        "CBEC_GRPC_PORT": str(port),
        "CBEC_METRICS_ENABLED": "false",
        "CBEC_MODELS_DIR": str(prepared.models_dir),
        "CBEC_STATE_DIR": str(state_dir),
        "CBEC_DEVICE": "cpu",
        "CBEC_CHAT_LLM_BACKEND": "none",
        "CBEC_CHAT_SENTIMENT_ADDR": "127.0.0.1:9",
        **env_extra,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.chat"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, port


async def test_kill_9_under_load_loses_no_acknowledged_turn(
    prepared: Prepared, tmp_path: Path, pg_url: str, redis_db: str
) -> None:
    seeded(prepared, pg_url, redis_db)
    proc, port = start_process(prepared, tmp_path / "state", store_env(pg_url, redis_db))
    acknowledged: list[tuple[str, str, str]] = []
    try:
        address = f"127.0.0.1:{port}"
        if not await probe.wait_serving(address, 120):
            proc.kill()
            pytest.fail(f"chat never served:\n{proc.communicate(timeout=10)[1][-3000:]}")
        async with grpc.aio.insecure_channel(address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            messages = ["How long does shipping take?", "How do returns work?", "Where is CB-100231?"]

            async def client(n: int) -> None:
                session = ""
                for i in range(1000):
                    message = f"{messages[i % 3]} ({n}.{i})"
                    try:
                        _, r = await converse(stub, message, session_id=session, user_id="u-1001")
                    except grpc.aio.AioRpcError:
                        return  # the server died under this call: not acknowledged
                    session = r.session_id
                    acknowledged.append((r.session_id, message, r.answer))

            clients = [asyncio.ensure_future(client(n)) for n in range(4)]
            deadline = time.monotonic() + 120
            while len(acknowledged) < 12:
                assert time.monotonic() < deadline and not any(c.done() for c in clients)
                await asyncio.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.gather(*clients)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    rows = set(sql(pg_url, "SELECT session_id, role, text FROM chat_transcripts"))
    for session_id, message, answer in acknowledged:
        assert (session_id, chat_pb2.ROLE_CUSTOMER, message) in rows
        assert (session_id, chat_pb2.ROLE_ASSISTANT, answer) in rows
