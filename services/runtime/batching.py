"""Dynamic micro-batching for model inference, after Triton's dynamic batcher.

Requests wait in a bounded queue until ``max_batch_size`` are there or the oldest has waited
``max_delay_s``; the batch then runs in a worker thread so the event loop keeps accepting calls while
the next batch fills. A full queue refuses at once (RESOURCE_EXHAUSTED); a request whose deadline
passes while queued is dropped before compute (DEADLINE_EXCEEDED); a cancelled caller's item is
skipped. If a batch raises, its items are re-run one by one so one bad item fails only its own
request. A batch function may also return an Exception in an item's place to fail just that item.

A sampled request (``tracing.py``) gets two child spans: ``queue <name>`` from its arrival to the start
of its batch, and ``model <name>`` for its batch's model call (``batch.size`` items; the batch function
runs under the first such span, so store round-trips inside it are traced too).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, Tracer

from . import tracing
from .errors import DeadlineExceeded, ResourceExhausted
from .metrics import RuntimeMetrics

In = TypeVar("In")
Out = TypeVar("Out")
log = logging.getLogger("cbec.batching")


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    enqueued: float
    deadline: float | None = None
    #: (the request's span, the service's tracer, arrival in ns since the epoch) when it is sampled.
    trace: tuple[Span, Tracer, int] | None = None


@dataclass
class BatcherConfig:
    max_batch_size: int = 32
    max_delay_s: float = 0.005
    max_queue: int = 1024
    # Batches computed at the same time (Triton's instance count); 1 suits one CPU model.
    concurrency: int = 1
    name: str = "model"


class MicroBatcher(Generic[In, Out]):
    """``await batcher.submit(item, timeout)`` returns ``fn([.., item, ..])[i]``."""

    def __init__(
        self,
        fn: Callable[[list[In]], Sequence[Out | BaseException]],
        config: BatcherConfig,
        metrics: RuntimeMetrics | None = None,
    ) -> None:
        self._fn = fn
        self.config = config
        self._queue: asyncio.Queue[_Pending[In, Out]] = asyncio.Queue(maxsize=config.max_queue)
        self._executor = ThreadPoolExecutor(
            max_workers=config.concurrency, thread_name_prefix=f"batch-{config.name}"
        )
        self._slots = asyncio.Semaphore(config.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._metrics = metrics
        name = config.name
        self._m = (
            (
                metrics.queue_depth.labels(name),
                metrics.batch_size.labels(name),
                metrics.inference_seconds.labels(name),
                metrics.queue_seconds.labels(name),
                metrics.queue_rejected.labels(name),
            )
            if metrics
            else None
        )

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._loop_task is None:
            # A context of its own: started by a first request, it must not keep that request's id and
            # span for every batch after it.
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run(), name=f"batcher-{self.config.name}", context=contextvars.Context()
            )

    async def close(self) -> None:
        """Stop taking items, finish the batches already running, fail what is still queued."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(ResourceExhausted("model is shutting down", retry_after_s=1.0))
        self._executor.shutdown(wait=True)

    async def submit(self, item: In, time_remaining: float | None = None) -> Out:
        """Queue one item and wait for its result. ``time_remaining`` (the caller's deadline, in seconds)
        drops the item unless its batch starts in time; a full queue raises RESOURCE_EXHAUSTED."""
        if self._loop_task is None:
            self.start()
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        deadline = None if time_remaining is None else now + time_remaining
        pending = _Pending(item, loop.create_future(), now, deadline)
        sampled = tracing.recording()
        if sampled is not None:
            pending.trace = (*sampled, time.time_ns())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            if self._m:
                self._m[4].inc()
            raise ResourceExhausted(
                f"{self.config.name} queue is full ({self.config.max_queue} waiting)", retry_after_s=0.05
            ) from None
        if self._m:
            self._m[0].set(self._queue.qsize())
        return await pending.future

    async def _run(self) -> None:
        while True:
            # Wait for a free compute slot first: while the model is busy, requests stay in the
            # bounded queue (so a full queue really refuses) and form the next batch there.
            await self._slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.get_running_loop().create_task(self._compute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _collect(self) -> list[_Pending[In, Out]]:
        first = await self._queue.get()
        batch = [first]
        flush_at = first.enqueued + self.config.max_delay_s
        while len(batch) < self.config.max_batch_size:
            wait = flush_at - time.monotonic()
            if wait <= 0:
                while len(batch) < self.config.max_batch_size and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), wait))
            except TimeoutError:
                break
        if self._m:
            self._m[0].set(self._queue.qsize())
        return batch

    @staticmethod
    def _live(batch: list[_Pending[In, Out]]) -> list[_Pending[In, Out]]:
        now = time.monotonic()
        live = []
        for pending in batch:
            if pending.future.done():  # caller went away (cancelled)
                continue
            if pending.deadline is not None and now >= pending.deadline:
                pending.future.set_exception(
                    DeadlineExceeded("deadline passed while waiting for a model batch")
                )
                continue
            live.append(pending)
        return live

    async def _compute(self, batch: list[_Pending[In, Out]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        spans: list[tuple[Span, Tracer]] = []
        try:
            batch = self._live(batch)
            if not batch:
                return
            spans = self._start_spans(batch)
            if self._m:
                self._m[1].observe(len(batch))
                for pending in batch:
                    self._m[3].observe(started - pending.enqueued, _exemplar(pending.trace))
            items = [p.item for p in batch]
            call: Callable[[list[In]], Sequence[Out | BaseException]] = self._call
            if spans:  # the model call runs under the first sampled request's span
                call = functools.partial(tracing.run_in_span, *spans[0], self._call)
            try:
                results = await loop.run_in_executor(self._executor, call, items)
            except Exception as exc:
                if len(batch) == 1 or getattr(exc, "code", None) is grpc.StatusCode.UNAVAILABLE:
                    # One item, or a store that is down for all of them: isolating would only repeat it.
                    results = [exc] * len(batch)
                else:
                    log.warning("batch of %d failed (%s); isolating the bad items", len(batch), exc)
                    results = [
                        await loop.run_in_executor(self._executor, self._call_one, p.item) for p in batch
                    ]
            if self._m:
                first = next((p.trace for p in batch if p.trace is not None), None)
                self._m[2].observe(time.monotonic() - started, _exemplar(first))
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
        finally:
            for span, _ in spans:
                span.end()
            self._slots.release()

    def _start_spans(self, batch: list[_Pending[In, Out]]) -> list[tuple[Span, Tracer]]:
        """For each sampled item: its queue span, ended now that its batch starts, and its model span."""
        traced = [p.trace for p in batch if p.trace is not None]
        if not traced:
            return []
        now_ns = time.time_ns()
        name = self.config.name
        size = {"batch.size": len(batch)}
        spans = []
        for parent, tracer, arrived_ns in traced:
            ctx = trace.set_span_in_context(parent)
            tracer.start_span(f"queue {name}", ctx, start_time=arrived_ns).end(now_ns)
            spans.append(
                (tracer.start_span(f"model {name}", ctx, attributes=size, start_time=now_ns), tracer)
            )
        return spans

    def _call(self, items: list[In]) -> Sequence[Out | BaseException]:
        results = self._fn(items)
        if len(results) != len(items):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        return results

    def _call_one(self, item: In) -> Out | BaseException:
        try:
            return self._call([item])[0]
        except Exception as exc:
            return exc


def _exemplar(traced: tuple[Span, Tracer, int] | None) -> dict[str, str] | None:
    """The exemplar linking a queue or model observation to a sampled request's trace."""
    if traced is None:
        return None
    ctx = traced[0].get_span_context()
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}
