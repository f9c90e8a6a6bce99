"""The micro-batcher: batches form, the queue is bounded, deadlines and failures stay per request."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from services.runtime.batching import BatcherConfig, MicroBatcher
from services.runtime.errors import ServiceError
from services.runtime.metrics import RuntimeMetrics


def doubler(sizes: list[int], delay: float = 0.01):
    def fn(items: list[float]) -> list[float]:
        sizes.append(len(items))
        time.sleep(delay)
        return [x * 2 for x in items]

    return fn


async def test_concurrent_requests_are_batched_up_to_the_max() -> None:
    sizes: list[int] = []
    batcher = MicroBatcher(
        doubler(sizes), BatcherConfig(max_batch_size=16, max_delay_s=0.02), RuntimeMetrics("t")
    )
    results = await asyncio.gather(*(batcher.submit(float(i)) for i in range(64)))
    await batcher.close()
    assert results == [2.0 * i for i in range(64)]
    assert sum(sizes) == 64
    assert max(sizes) <= 16
    assert len(sizes) <= 8  # without batching this would be 64 calls


async def test_lone_request_waits_at_most_the_max_delay() -> None:
    batcher = MicroBatcher(doubler([], delay=0), BatcherConfig(max_batch_size=64, max_delay_s=0.05))
    start = time.monotonic()
    assert await batcher.submit(1.0) == 2.0
    assert time.monotonic() - start < 1.0
    await batcher.close()


async def test_full_queue_is_resource_exhausted() -> None:
    release = threading.Event()

    def slow(items: list[int]) -> list[int]:
        release.wait(5)
        return items

    batcher = MicroBatcher(slow, BatcherConfig(max_batch_size=1, max_delay_s=0, max_queue=2))
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.05)  # first is computing; the queue is empty again
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0.01)
    with pytest.raises(ServiceError) as err:
        await batcher.submit(3)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    release.set()
    assert await first == 0
    assert await asyncio.gather(*queued) == [1, 2]
    await batcher.close()


async def test_deadline_passed_in_queue_is_not_computed() -> None:
    seen: list[int] = []
    release = threading.Event()

    def fn(items: list[int]) -> list[int]:
        seen.extend(items)
        release.wait(5)
        return items

    batcher = MicroBatcher(fn, BatcherConfig(max_batch_size=1, max_delay_s=0))
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.05)
    late = asyncio.ensure_future(batcher.submit(2, time_remaining=0.05))
    await asyncio.sleep(0.2)
    release.set()
    assert await first == 1
    with pytest.raises(ServiceError) as err:
        await late
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seen == [1]
    await batcher.close()


async def test_one_failing_item_fails_only_its_own_request() -> None:
    def fn(items: list[float]) -> list[float]:
        if any(x < 0 for x in items):
            raise ValueError("negative")
        return [x + 1 for x in items]

    batcher = MicroBatcher(fn, BatcherConfig(max_batch_size=8, max_delay_s=0.05))
    results = await asyncio.gather(
        *(batcher.submit(x) for x in (1.0, -1.0, 2.0, 3.0)), return_exceptions=True
    )
    await batcher.close()
    assert results[0] == 2.0 and results[2] == 3.0 and results[3] == 4.0
    assert isinstance(results[1], ValueError)


async def test_batch_function_may_fail_single_items() -> None:
    def fn(items: list[int]) -> list[object]:
        return [ValueError("odd") if x % 2 else x for x in items]

    batcher = MicroBatcher(fn, BatcherConfig(max_batch_size=8, max_delay_s=0.02))
    results = await asyncio.gather(*(batcher.submit(x) for x in range(4)), return_exceptions=True)
    await batcher.close()
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], ValueError) and isinstance(results[3], ValueError)


async def test_cancelled_caller_is_skipped() -> None:
    seen: list[int] = []
    release = threading.Event()

    def fn(items: list[int]) -> list[int]:
        seen.extend(items)
        release.wait(5)
        return items

    batcher = MicroBatcher(fn, BatcherConfig(max_batch_size=1, max_delay_s=0))
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.05)
    gone = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.01)
    gone.cancel()
    release.set()
    assert await first == 1
    await asyncio.sleep(0.05)
    assert seen == [1]
    await batcher.close()
