"""Sentiment replicas on one shared PostgreSQL: concurrent ingestion through both (disjoint ids, the same
ids, retries) gives every replica the hand-computed report; a store that is down makes ingestion and
reports UNAVAILABLE with RetryInfo while scoring keeps serving; ``kill -9`` loses no acknowledged review."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cbec.sentiment.v1 import sentiment_pb2 as pb
from cbec.sentiment.v1 import sentiment_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.errors import status_from_error
from services.runtime.server import Server
from services.runtime.state import PostgresDatabase
from services.sentiment.server import SentimentService
from services.sentiment.store import HOUR_MS, ReviewStore
from tests.sentiment.conftest import settings_for
from tests.sentiment.test_process import start, wait_serving
from tests.stores import PG_PASSWORD, PostgresServer, shared_fields, store_env
from tests.support import serving

# Clearly polar texts (their labels do not sit near a decision boundary), in two languages.
TEXTS = [
    "Terrible quality, it ripped the first time I wore it. Returned.",
    "Love this dress, the fit is perfect and the fabric is beautiful.",
    "Schreckliche Qualität, die Naht ist nach einem Tag gerissen. Zurückgeschickt.",
    "Wunderschönes Kleid, passt perfekt und der Stoff ist herrlich weich.",
]
MARKETS = ("DE", "FR", "PL")
LABELS = {pb.SENTIMENT_NEGATIVE: 0, pb.SENTIMENT_NEUTRAL: 1, pb.SENTIMENT_POSITIVE: 2}


def shared(models: Path, state: Path, pg_url: str, redis_url: str, **over: Any) -> Any:
    return settings_for(
        models,
        state,
        **shared_fields(pg_url, redis_url),
        **over,
    )


def running(
    settings: Any,
) -> AbstractAsyncContextManager[tuple[Server, sentiment_pb2_grpc.SentimentServiceStub]]:
    return serving(settings, SentimentService, sentiment_pb2_grpc.SentimentServiceStub)


def make_review(i: int, now: datetime) -> pb.Review:
    r = pb.Review(
        review_id=f"rv-{i}",
        product_id=f"sku-{i % 2}",
        category="coats",
        market=MARKETS[i % 3],
        text=TEXTS[i % 4],
    )
    r.created_time.FromDatetime(now - timedelta(hours=i % 5, minutes=10))
    return r


async def retry_unavailable(call: Callable[[], Awaitable[Any]], deadline_s: float = 60) -> Any:
    """A client's retry loop: UNAVAILABLE (e.g. a transaction that lost a race) is retried."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_two_replicas_agree_on_every_report(
    trained: tuple[Path, str, dict[str, Any]], tmp_path: Path, pg_url: str, redis_db: str
) -> None:
    models = trained[0]
    now = datetime.now(UTC)
    only_a, only_b, both = range(0, 24), range(24, 48), range(48, 72)
    async with (
        running(shared(models, tmp_path / "a", pg_url, redis_db)) as (_, a),
        running(shared(models, tmp_path / "b", pg_url, redis_db)) as (_, b),
    ):
        scored = await a.Analyze(pb.AnalyzeRequest(texts=[pb.TextInput(text=t) for t in TEXTS]), timeout=120)
        label_of = [LABELS[r.label] for r in scored.results]
        lang_of = [r.language for r in scored.results]
        assert lang_of == ["en", "en", "de", "de"]

        async def ingest(stub: sentiment_pb2_grpc.SentimentServiceStub, ids: list[int]) -> None:
            request = pb.IngestReviewsRequest(reviews=[make_review(i, now) for i in ids])
            response = await retry_unavailable(lambda: stub.IngestReviews(request, timeout=120))
            assert response.accepted_count == len(ids) and not response.rejected

        def batches(ids: range, size: int = 6) -> list[list[int]]:
            return [list(ids[k : k + size]) for k in range(0, len(ids), size)]

        calls = [ingest(a, ids) for ids in batches(only_a)] + [ingest(b, ids) for ids in batches(only_b)]
        calls += [ingest(a, ids) for ids in batches(both)] + [ingest(b, ids) for ids in batches(both)]
        calls += [ingest(b, [0, 1, 2, 30]), ingest(a, [30, 31, 50])]  # retries on the other replica
        await asyncio.gather(*calls)

        expected: dict[tuple[str, str], Counter[str]] = {}
        for i in range(72):
            scopes = [("product_id", f"sku-{i % 2}"), ("category", "coats")]
            for (field, scope), market in [(s, m) for s in scopes for m in ("", MARKETS[i % 3])]:
                c = expected.setdefault((f"{field}={scope}", market), Counter())
                c[("negative", "neutral", "positive")[label_of[i % 4]]] += 1
                c[f"lang:{lang_of[i % 4]}"] += 1
        assert sum(v for k, v in expected[("category=coats", "")].items() if not k.startswith("lang")) == 72

        for key, want in expected.items():
            field, scope = key[0].split("=")
            for stub in (a, b):
                report = await stub.GetMarketReport(
                    pb.GetMarketReportRequest(**{field: scope}, market=key[1]), timeout=60
                )
                d = report.distribution
                got = Counter(
                    {"negative": d.negative, "neutral": d.neutral, "positive": d.positive}
                    | {f"lang:{k}": v for k, v in report.languages.items()}
                )
                assert +got == +want, (key, stub is a)
                assert d.total == d.negative + d.neutral + d.positive


async def test_store_down_makes_ingestion_and_reports_unavailable_scoring_serves(
    trained: tuple[Path, str, dict[str, Any]], tmp_path: Path, redis_db: str
) -> None:
    now = datetime.now(UTC)
    with PostgresServer() as pg:
        settings = shared(
            trained[0], tmp_path / "state", pg.url(), redis_db, state_check_s=0.2, state_timeout_s=1
        )
        async with running(settings) as (server, stub):
            first = pb.IngestReviewsRequest(reviews=[make_review(i, now) for i in range(3)])
            assert (await stub.IngestReviews(first, timeout=60)).accepted_count == 3
            pg.kill9()

            for call in (
                stub.IngestReviews(pb.IngestReviewsRequest(reviews=[make_review(9, now)]), timeout=60),
                stub.GetMarketReport(pb.GetMarketReportRequest(category="coats"), timeout=60),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
                status = status_from_error(err.value)
                assert status is not None
                assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
            scored = await stub.Analyze(pb.AnalyzeRequest(texts=[pb.TextInput(text=TEXTS[1])]), timeout=60)
            assert scored.results[0].label == pb.SENTIMENT_POSITIVE

            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
                health = health_pb2_grpc.HealthStub(ch)

                async def status_of(name: str) -> int:
                    request = health_pb2.HealthCheckRequest(service=name)
                    return (await health.Check(request, timeout=5)).status

                deadline = time.monotonic() + 30
                while await status_of("sentiment.sentiment") != health_pb2.HealthCheckResponse.NOT_SERVING:
                    assert time.monotonic() < deadline, "the store's health never went NOT_SERVING"
                    await asyncio.sleep(0.1)
                assert await status_of("") == health_pb2.HealthCheckResponse.SERVING  # scoring still works

                pg.start()  # back: ingestion and reports recover without a restart
                again = pb.IngestReviewsRequest(reviews=[make_review(i, now) for i in range(3, 6)])
                await retry_unavailable(lambda: stub.IngestReviews(again, timeout=60))
                report = await stub.GetMarketReport(pb.GetMarketReportRequest(category="coats"), timeout=60)
                assert report.distribution.total == 6


async def test_kill_9_under_load_loses_no_acknowledged_review(
    trained: tuple[Path, str, dict[str, Any]], tmp_path: Path, pg_url: str, redis_db: str
) -> None:
    models = trained[0]
    now = datetime.now(UTC)
    env = store_env(pg_url, redis_db)
    proc, port = start(models, tmp_path / "state", **env)
    acknowledged: list[int] = []
    try:
        await wait_serving(port, proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = sentiment_pb2_grpc.SentimentServiceStub(ch)

            async def batch(k: int) -> None:
                ids = list(range(k * 4, k * 4 + 4))
                request = pb.IngestReviewsRequest(reviews=[make_review(i, now) for i in ids])
                with contextlib.suppress(grpc.aio.AioRpcError):  # cut off by the kill: not acknowledged
                    await stub.IngestReviews(request, timeout=60)
                    acknowledged.extend(ids)

            tasks = [asyncio.ensure_future(batch(k)) for k in range(12)]
            deadline = time.monotonic() + 120
            while len(acknowledged) < 16:  # kill once some are acknowledged and more are in flight
                assert time.monotonic() < deadline and proc.poll() is None
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            await asyncio.gather(*tasks)
    finally:
        if proc.poll() is None:
            proc.kill()

    assert len(acknowledged) >= 16
    store = ReviewStore(PostgresDatabase(pg_url, PG_PASSWORD, name="sentiment"))
    try:
        stored = {
            int(str(r[0]).removeprefix("rv-"))
            for r in store.db.all("SELECT review_id FROM sentiment_reviews")
        }
        assert set(acknowledged) <= stored
        # no batch was half written: the aggregates count exactly the stored reviews
        start_ms = int((now - timedelta(days=1)).timestamp() * 1000) // HOUR_MS * HOUR_MS
        end_ms = start_ms + 2 * 86_400_000
        assert store.window("c", "coats", "", start_ms, end_ms).total == len(stored)
        assert store.window("p", "sku-0", "", start_ms, end_ms).total == sum(1 for i in stored if i % 2 == 0)
    finally:
        store.db.close()
