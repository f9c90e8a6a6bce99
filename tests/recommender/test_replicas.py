"""Replicas on one shared PostgreSQL (real servers from tests/stores.py): an interaction, an item or an
erasure written through any replica changes what every replica serves (the change feed, not polling);
a store outage refuses writes with UNAVAILABLE and a retry delay while recommendations keep serving
from memory; a kill -9 after an acknowledged RecordInteractions loses nothing; a training job reads
the shared store through the same CBEC_* settings."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psycopg
import pytest
from cbec.recommender.v1 import recommender_pb2 as pb
from cbec.recommender.v1 import recommender_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.recommender import train
from services.recommender.events import Event, EventStore
from services.runtime.errors import status_from_error
from services.runtime.server import Server
from services.runtime.state import PostgresDatabase
from tests.recommender.conftest import Shop, settings_for
from tests.recommender.test_process import start, wait_serving
from tests.stores import PG_PASSWORD, PostgresServer, shared_fields, store_env
from tests.support import trusted_channel, with_token

DEADLINE_S = 30.0  # generous: the feed normally takes milliseconds; the goal is 1 s
Stub = recommender_pb2_grpc.RecommenderServiceStub


@pytest.fixture
def shared(pg_url: str, redis_db: str) -> dict[str, Any]:
    """Settings every replica of a test shares: the same database (the recommender needs no Redis, but
    the shared backend is configured as the chart configures it)."""
    return dict(
        **shared_fields(pg_url, redis_db),
    )


@asynccontextmanager
async def replica(
    shop: Shop, tmp_path: Path, name: str, shared: dict[str, Any], **overrides: Any
) -> AsyncIterator[tuple[Server, Stub]]:
    """One recommender replica (its own state dir) on the shared store."""
    from services.recommender.server import RecommenderService

    # No safety re-read within a test: only the change feed can carry a write to the other replica.
    overrides = {"fold_in_check_s": 3600.0, **overrides}
    settings = settings_for(shop.models_dir, tmp_path / name, shop.cache_path, **shared, **overrides)
    server = Server(with_token(settings), RecommenderService)  # the stub may call ForgetUser
    await server.start()
    try:
        async with trusted_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            yield server, Stub(channel)
    finally:
        await server.stop(grace=1)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> float:
    """Seconds until ``check`` holds (polled); fails after DEADLINE_S."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > DEADLINE_S:
            raise AssertionError(f"not within {DEADLINE_S:.0f} s: {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def recommend(stub: Stub, user: str, k: int = 5, **kwargs: Any) -> pb.RecommendResponse:
    return await stub.Recommend(pb.RecommendRequest(user_id=user, k=k, **kwargs), timeout=30)


async def record(stub: Stub, user: str, items: list[str], type_: int = pb.INTERACTION_TYPE_PURCHASE) -> int:
    reply = await stub.RecordInteractions(
        pb.RecordInteractionsRequest(
            interactions=[pb.Interaction(user_id=user, item_id=i, type=type_) for i in items]
        ),
        timeout=30,
    )
    return int(reply.accepted_count)


def engine_of(server: Server) -> Any:
    return server.service.slot.current.model


def busiest_user(shop: Shop) -> str:
    return str(shop.prepared.interactions.user_id.value_counts().index[0])


async def test_an_interaction_through_any_replica_changes_every_replicas_recommendations(
    shop: Shop, tmp_path: Path, shared: dict[str, Any], record_property: Callable[[str, object], None]
) -> None:
    async with (
        replica(shop, tmp_path, "a", shared) as (_a, stub_a),
        replica(shop, tmp_path, "b", shared) as (_b, stub_b),
    ):
        # a new user: cold start on both, then one purchase through A moves B to content similarity
        user = "wanderer"
        assert (await recommend(stub_b, user)).strategy == pb.STRATEGY_COLD_START
        touched = (await recommend(stub_a, user)).items[0].item_id
        assert await record(stub_a, user, [touched]) == 1
        mine = await recommend(stub_a, user)  # read-your-writes on the replica that recorded it
        assert mine.strategy == pb.STRATEGY_CONTENT and touched not in {i.item_id for i in mine.items}

        async def b_follows() -> bool:
            r = await recommend(stub_b, user)
            return r.strategy == pb.STRATEGY_CONTENT and touched not in {i.item_id for i in r.items}

        a_to_b = await eventually(b_follows, "B reflects the purchase recorded through A")
        assert [i.item_id for i in (await recommend(stub_b, user)).items] == [i.item_id for i in mine.items]

        # a trained user, the other way round: what they bought through B leaves A's list
        known = busiest_user(shop)
        before = [i.item_id for i in (await recommend(stub_a, known)).items]
        assert await record(stub_b, known, [before[0]]) == 1

        async def a_follows() -> bool:
            after = [i.item_id for i in (await recommend(stub_a, known)).items]
            return before[0] not in after and after != before

        b_to_a = await eventually(a_follows, "A reflects the purchase recorded through B")
        print(f"cross-replica delay: interaction A->B {a_to_b * 1000:.0f} ms, B->A {b_to_a * 1000:.0f} ms")
        record_property("cross_replica_interaction_ms", round(max(a_to_b, b_to_a) * 1000, 1))


async def test_items_upserted_through_one_replica_are_recommendable_on_every_replica(
    shop: Shop, tmp_path: Path, shared: dict[str, Any], record_property: Callable[[str, object], None]
) -> None:
    source = shop.prepared.items.iloc[0]
    new = pb.Item(
        item_id="NEW-1",
        title=str(source.title) + " neu",
        description=str(source.description),
        category=str(source.category),
        markets=["DE", "FR"],
    )
    async with (
        replica(shop, tmp_path, "a", shared) as (_a, stub_a),
        replica(shop, tmp_path, "b", shared) as (_b, stub_b),
    ):
        assert (await stub_b.UpsertItems(pb.UpsertItemsRequest(items=[new]), timeout=60)).upserted_count == 1
        # at once: A folds in before it judges an item it does not know yet
        assert await record(stub_a, "fan", ["NEW-1"], pb.INTERACTION_TYPE_VIEW) == 1

        async def similar_on_a() -> bool:
            r = await stub_a.SimilarItems(
                pb.SimilarItemsRequest(item_id=str(source.item_id), k=3, source=pb.SIMILARITY_SOURCE_CONTENT),
                timeout=30,
            )
            return "NEW-1" in {i.item_id for i in r.items}

        delay = await eventually(similar_on_a, "the item upserted through B is similar on A")
        # a new user who touched the source item through A is shown the new item, on A and on B:
        # by similarity plus the popularity prior, or else in the content path's fresh places
        assert await record(stub_a, "fan-2", [str(source.item_id)], pb.INTERACTION_TYPE_VIEW) == 1
        r = await recommend(stub_a, "fan-2", k=20, market="DE")
        assert r.strategy == pb.STRATEGY_CONTENT and "NEW-1" in {i.item_id for i in r.items}

        async def on_b() -> bool:
            r = await recommend(stub_b, "fan-2", k=20, market="DE")
            return r.strategy == pb.STRATEGY_CONTENT and "NEW-1" in {i.item_id for i in r.items}

        await eventually(on_b, "B recommends the new item to the user A saw")
        # re-upserting through A changes the item in place on B
        renamed = pb.Item(item_id="NEW-1", title="Nordwind Laufschuhe", category="running", markets=["DE"])
        await stub_a.UpsertItems(pb.UpsertItemsRequest(items=[renamed]), timeout=60)

        async def renamed_on_b() -> bool:
            try:
                r = await stub_b.SimilarItems(
                    pb.SimilarItemsRequest(item_id=str(source.item_id), k=50, categories=["running"]),
                    timeout=30,
                )
            except grpc.aio.AioRpcError as exc:  # "running" is not a category on B yet
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
                return False
            return [(i.item_id, i.title) for i in r.items] == [("NEW-1", "Nordwind Laufschuhe")]

        await eventually(renamed_on_b, "B sees the item renamed through A")
        print(f"cross-replica delay: item B->A {delay * 1000:.0f} ms")
        record_property("cross_replica_item_ms", round(delay * 1000, 1))


async def test_a_user_forgotten_through_one_replica_is_forgotten_on_every_replica(
    shop: Shop, tmp_path: Path, shared: dict[str, Any], record_property: Callable[[str, object], None]
) -> None:
    items = [str(i) for i in shop.prepared.items.item_id[:3]]
    known = busiest_user(shop)
    async with (
        replica(shop, tmp_path, "a", shared) as (_a, stub_a),
        replica(shop, tmp_path, "b", shared) as (b, stub_b),
    ):
        assert await record(stub_a, "leaver", items) == 3

        async def b_knows() -> bool:
            return (await recommend(stub_b, "leaver")).strategy != pb.STRATEGY_COLD_START

        await eventually(b_knows, "B sees the user's events")
        assert (await recommend(stub_b, known)).strategy == pb.STRATEGY_HYBRID
        erased = await stub_a.ForgetUser(pb.ForgetUserRequest(user_id="leaver"), timeout=30)
        assert erased.events_deleted == 3
        await stub_a.ForgetUser(pb.ForgetUserRequest(user_id=known), timeout=30)

        async def b_forgot() -> bool:
            return (await recommend(stub_b, "leaver")).strategy == pb.STRATEGY_COLD_START

        delay = await eventually(b_forgot, "B forgets the user erased through A")
        engine = engine_of(b)

        async def trained_forgotten() -> bool:
            return (await recommend(stub_b, known)).strategy == pb.STRATEGY_COLD_START

        await eventually(trained_forgotten, "B forgets the trained user erased through A")
        # B dropped its in-memory state: live events, and the trained user's vector
        assert "leaver" not in engine.extra and "leaver" not in engine.user_market
        row = int(engine.b.user_pos.get_indexer([known])[0])

        async def vector_zeroed() -> bool:  # the fold-in marks the erasure, then clears the vector
            return not np.any(engine.b.model.components["als"].user_factors[row])

        await eventually(vector_zeroed, "B zeroes the trained user's vector")
        # what the same id records after the erasure belongs to a new user, on every replica
        assert await record(stub_b, "leaver", items[:1]) == 1

        async def a_sees_new_user() -> bool:
            r = await recommend(stub_a, "leaver")
            return r.strategy == pb.STRATEGY_CONTENT and items[0] not in {i.item_id for i in r.items}

        await eventually(a_sees_new_user, "A sees events recorded after the erasure")
        print(f"cross-replica delay: erasure A->B {delay * 1000:.0f} ms")
        record_property("cross_replica_forget_ms", round(delay * 1000, 1))


def assert_unavailable_with_retry(err: grpc.aio.AioRpcError) -> None:
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    status = status_from_error(err)
    assert status is not None
    assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)


async def test_store_down_refuses_interactions_and_keeps_recommending(
    shop: Shop, tmp_path: Path, shared: dict[str, Any], postgres: PostgresServer
) -> None:
    fast = dict(state_timeout_s=1.0, state_check_s=0.5)
    items = [str(i) for i in shop.prepared.items.item_id[:3]]
    known = busiest_user(shop)
    async with (
        replica(shop, tmp_path, "a", shared, **fast) as (a, stub_a),
        replica(shop, tmp_path, "b", shared, **fast) as (_b, stub_b),
    ):
        assert await record(stub_a, "steady", items) == 3
        steady = [i.item_id for i in (await recommend(stub_a, "steady")).items]
        trained = [i.item_id for i in (await recommend(stub_a, known)).items]

        async def b_has_steady() -> bool:
            return [i.item_id for i in (await recommend(stub_b, "steady")).items] == steady

        await eventually(b_has_steady, "B folds in the events recorded through A")
        postgres.kill9()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await record(stub_a, "steady", items[:1])
        assert_unavailable_with_retry(err.value)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub_a.ForgetUser(pb.ForgetUserRequest(user_id="steady"), timeout=30)
        assert_unavailable_with_retry(err.value)
        # recommendations are served from memory, the server stays SERVING; the store's health says down
        assert [i.item_id for i in (await recommend(stub_a, "steady")).items] == steady
        assert [i.item_id for i in (await recommend(stub_a, known)).items] == trained
        assert (await recommend(stub_a, "stranger", market="DE")).strategy == pb.STRATEGY_COLD_START
        similar = await stub_a.SimilarItems(pb.SimilarItemsRequest(item_id=items[0], k=3), timeout=30)
        assert len(similar.items) == 3
        async with grpc.aio.insecure_channel(f"127.0.0.1:{a.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            overall = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert overall.status == health_pb2.HealthCheckResponse.SERVING

            async def store_health(status: int) -> bool:
                name = "recommender.recommender"
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                return reply.status == status

            await eventually(lambda: store_health(health_pb2.HealthCheckResponse.NOT_SERVING), "store down")
            postgres.start()

            async def retried() -> bool:  # what a client does with UNAVAILABLE + RetryInfo
                try:
                    return await record(stub_a, "after-outage", items[:1]) == 1
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    return False

            await eventually(retried, "RecordInteractions accepted again after the store came back")
            await eventually(lambda: store_health(health_pb2.HealthCheckResponse.SERVING), "store up")

        # B's listeners reconnect and fold in what was written after the restart (nothing else would:
        # its safety re-read is off in these tests)
        async def b_follows() -> bool:
            return (await recommend(stub_b, "after-outage")).strategy == pb.STRATEGY_CONTENT

        await eventually(b_follows, "B folds in an interaction recorded after the outage")


def count_events(pg_url: str, user_prefix: str) -> dict[str, int]:
    with psycopg.connect(pg_url, password=PG_PASSWORD) as conn:
        rows = conn.execute(
            "SELECT user_id, COUNT(*) FROM recommender_events WHERE user_id LIKE %s GROUP BY user_id",
            (user_prefix + "%",),
        ).fetchall()
    return {str(u): int(n) for u, n in rows}


async def test_kill_9_after_acknowledged_interactions_loses_nothing(
    shop: Shop, tmp_path: Path, pg_url: str, redis_db: str, postgres: PostgresServer
) -> None:
    """Real processes: a replica is killed with SIGKILL while clients are recording; every interaction
    it acknowledged is in PostgreSQL (rows counted), and, after PostgreSQL itself is killed and
    restarted, a new replica serves them."""
    env = store_env(pg_url, redis_db)
    items = [str(i) for i in shop.prepared.items.item_id[:5]]  # personalise_min_events: served by the model
    proc, port = start(shop, tmp_path / "a", env)
    acknowledged: dict[str, int] = {}
    try:
        await wait_serving(port, timeout=120)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = Stub(channel)

            async def client(n: int) -> None:
                for call in range(1000):
                    user = f"durable-{n}-{call}"
                    try:
                        accepted = await record(stub, user, items)
                    except grpc.aio.AioRpcError:
                        return  # the replica died under us: this call was not acknowledged
                    acknowledged[user] = accepted

            clients = [asyncio.create_task(client(n)) for n in range(4)]
            await eventually(lambda: _at_least(acknowledged, 20), "some interactions acknowledged")
            proc.send_signal(signal.SIGKILL)  # mid-stream: no drain, no clean close
            await asyncio.wait_for(asyncio.gather(*clients), 60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    assert acknowledged and all(n == len(items) for n in acknowledged.values())
    stored = count_events(pg_url, "durable-")
    lost = {u: n for u, n in acknowledged.items() if stored.get(u, 0) != n}
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged calls lost or partial"
    assert all(n == len(items) for n in stored.values())  # a call is all or nothing

    postgres.kill9()
    postgres.start()
    assert count_events(pg_url, "durable-") == stored
    proc, port = start(shop, tmp_path / "b", env)
    try:
        await wait_serving(port, timeout=120)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            user = next(iter(acknowledged))
            r = await recommend(Stub(channel), user)
            assert r.strategy == pb.STRATEGY_HYBRID and not set(items) & {i.item_id for i in r.items}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


async def _at_least(acknowledged: dict[str, int], n: int) -> bool:
    return len(acknowledged) >= n


def test_a_training_job_reads_the_shared_store_through_the_cbec_settings(
    shop: Shop, pg_url: str, redis_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--interactions store`` / ``--events store`` with CBEC_STATE_BACKEND=shared: what any replica
    recorded, with erasures applied, and the position the serving engines fold in from."""
    db = PostgresDatabase(pg_url, PG_PASSWORD, name="recommender")
    store = EventStore(db)
    items = [str(i) for i in shop.prepared.items.item_id[:4]]
    store.append([Event("via-a", i, 3, None, 1e9) for i in items])
    store.append([Event("via-b", items[0], 1, None, 1e9), Event("gone", items[1], 1, None, 1e9)])
    store.forget("gone")
    store.upsert_items([("FRESH", {"title": "Fjord Kaffeebohnen", "category": "coffee"}, None)])
    # a large call: several multi-row INSERTs, seqs in the order of the events, one commit
    many = [Event(f"bulk-{n}", items[n % len(items)], 1, None, float(n)) for n in range(450)]
    seqs = store.append(many)
    assert seqs == list(range(7, 457))
    assert [e.user_id for e in store.events_since(6, limit=450)] == [e.user_id for e in many]
    db.close()
    for key, value in store_env(pg_url, redis_db).items():
        monkeypatch.setenv(key, value)
    prepared = train.prepare(shop.interactions_path, shop.items_path, train.STORE)
    assert {"via-a", "via-b"} <= set(prepared.interactions.user_id)
    assert "gone" not in set(prepared.interactions.user_id) and "FRESH" in set(prepared.items.item_id)
    assert prepared.events_seq == 456  # the newest event read
    alone = train.prepare(train.STORE)
    users = set(alone.interactions.user_id)
    assert {"via-a", "via-b"} <= users and "gone" not in users
