"""The global rate limit (CBEC_STATE_BACKEND=shared) on a real Redis: replicas share one bucket per
principal, Redis down falls back to each replica's share of the rate without failing a request, and
limits are global again once Redis answers."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from cbec.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from prometheus_client import CollectorRegistry

from gateway.auth import RATE_KEY_PREFIX, Principal, SharedRateLimiter
from gateway.metrics import GatewayMetrics
from services.runtime.state import StateConfig, redis_client
from tests import stores
from tests.gateway.conftest import SLOW_KEY
from tests.gateway.test_auth import post
from tests.stores import REDIS_PASSWORD, RedisServer

redis_server = stores.redis_server  # by assignment: importing the names would trip ruff's F811
redis_db = stores.redis_db

# Not used by the gateway: the runtime's shared-backend validation asks for a database URL.
UNUSED_DATABASE_URL = "postgresql://unused@127.0.0.1:9/unused"


def principal(rate: float, burst: float, id_: str = "shop") -> Principal:
    return Principal(id_, frozenset({"*"}), rate, burst, "api_key")


def client(url: str) -> Any:
    """An asyncio client opened as the gateway opens it (the runtime's settings)."""
    return redis_client(
        StateConfig(backend="shared", redis_url=url, redis_password=REDIS_PASSWORD, timeout_s=2), asyncio=True
    )


def metric(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    return 0.0 if value is None else value


@pytest.fixture
async def limiters() -> AsyncIterator[Callable[..., SharedRateLimiter]]:
    made: list[SharedRateLimiter] = []

    def make(url: str, **kw: Any) -> SharedRateLimiter:
        limiter = SharedRateLimiter(client(url), **kw)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


async def test_two_replicas_share_one_bucket_under_a_concurrent_burst(
    redis_db: str, limiters: Callable[..., SharedRateLimiter]
) -> None:
    rate, burst = 40.0, 20.0
    shop = principal(rate, burst)
    replicas = [limiters(redis_db, replicas=2, timeout_s=2), limiters(redis_db, replicas=2, timeout_s=2)]
    admitted = [0, 0]
    checks = [0, 0]

    async def hammer(k: int, until: float) -> None:
        while time.monotonic() < until:
            checks[k] += 1
            if await replicas[k].check(shop) is None:
                admitted[k] += 1

    started = time.monotonic()
    until = started + 1.0
    await asyncio.gather(*[hammer(k % 2, until) for k in range(16)])
    elapsed = time.monotonic() - started

    assert all(r.shared for r in replicas)  # every decision was Redis's
    assert min(checks) > 0 and min(admitted) > 0  # both replicas took part
    assert sum(admitted) <= burst + rate * elapsed + 1, (admitted, elapsed)
    assert sum(admitted) >= burst  # the burst itself is admitted
    assert sum(checks) > sum(admitted)  # and the rest refused

    async with client(redis_db) as r:
        ttl_ms = await r.pttl(RATE_KEY_PREFIX + "shop")
        assert 0 < ttl_ms <= math.ceil(burst / rate * 1000) + 1000
        deadline = time.monotonic() + 15
        while await r.exists(RATE_KEY_PREFIX + "shop"):  # an idle bucket goes away on its own
            assert time.monotonic() < deadline, "idle bucket never expired"
            await asyncio.sleep(0.1)


async def test_redis_down_falls_back_to_the_local_share_then_global_again(
    limiters: Callable[..., SharedRateLimiter],
) -> None:
    shop = principal(rate=0.001, burst=10)  # (practically) no refill during the test
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    with RedisServer() as rd:
        a = limiters(rd.url, replicas=2, probe_s=0.05, metrics=metrics)
        b = limiters(rd.url, replicas=2, probe_s=0.05)
        assert await a.check(shop) is None and a.shared
        assert metric(registry, "gateway_rate_limit_shared") == 1

        rd.kill9()
        # every request is still decided, by the replica's own bucket with half the burst (2 replicas)
        local = [await a.check(shop) for _ in range(7)]
        assert local[:5] == [None] * 5 and all(w is not None and w > 0 for w in local[5:])
        assert not a.shared
        assert metric(registry, "gateway_rate_limit_shared") == 0
        assert metric(registry, "gateway_rate_limit_fallback_total") == 7

        rd.start()  # same port and data (the AOF): 9 tokens left in the global bucket
        deadline = time.monotonic() + 30
        while not a.shared:
            assert time.monotonic() < deadline, "never went back to the global limit"
            await asyncio.sleep(0.05)
        assert metric(registry, "gateway_rate_limit_shared") == 1
        admitted_by_b = 0
        while await b.check(shop) is None:  # the other replica drains the global bucket...
            admitted_by_b += 1
            assert admitted_by_b <= 10
        assert admitted_by_b == 9  # the global bucket kept its state: 10 less a's one check before the outage
        wait = await a.check(shop)  # ...and this replica sees it: the limit is global again
        assert wait is not None and wait > 1
        assert a.shared and metric(registry, "gateway_rate_limit_fallback_total") == 7


async def test_two_gateways_enforce_one_limit(make_gateway: Any, redis_db: str) -> None:
    shared = dict(
        state_backend="shared",
        redis_url=redis_db,
        redis_password=REDIS_PASSWORD,
        database_url=UNUSED_DATABASE_URL,
        rate_limit_replicas=2,
        rate_limit_timeout_s=2,  # a busy test machine must not turn a slow answer into the local fallback
    )
    gw1 = await make_gateway(**shared)
    gw2 = await make_gateway(**shared)
    statuses = [(await post(gw1, {"x-api-key": SLOW_KEY}))[0] for _ in range(3)]  # burst 3, 1 per second
    assert statuses == [200, 200, 200]
    status, _, headers = await post(gw2, {"x-api-key": SLOW_KEY})
    assert status == 429 and int(headers["Retry-After"]) >= 1
    async with grpc.aio.insecure_channel(gw2.grpc_address) as channel:  # the gRPC port shares it too
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gateway_pb2_grpc.GatewayServiceStub(channel).GetHomeFeed(
                gateway_pb2.GetHomeFeedRequest(), metadata=(("x-api-key", SLOW_KEY),), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
