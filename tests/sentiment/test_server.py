"""The gRPC surface on a real server: scoring, languages, truncation, bad input, ingestion, reports,
and the stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cbec.sentiment.v1 import sentiment_pb2 as pb
from google.protobuf import duration_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.errors import field_violations
from services.runtime.server import Server

POSITIVE = "Love this dress, the fit is perfect and the fabric is beautiful."
NEGATIVE = "Terrible quality, it ripped the first time I wore it. Returned."


def ts(dt: datetime) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(dt)
    return t


def days(n: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromSeconds(int(n * 86400))
    return d


async def fails(call: object, code: grpc.StatusCode) -> list[tuple[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() == code, err.value.details()
    return field_violations(err.value)


async def test_health_and_analyze(server: Server, stub: object) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    texts = [
        pb.TextInput(id="en+", text=POSITIVE),
        pb.TextInput(id="en-", text=NEGATIVE),
        pb.TextInput(id="de", utf8_bytes="Das Kleid ist wunderschön und passt perfekt.".encode()),
        pb.TextInput(id="ja", text="とても可愛いワンピースで、着心地も最高です。"),
    ]
    response = await stub.Analyze(pb.AnalyzeRequest(texts=texts), timeout=120)  # type: ignore[attr-defined]
    assert response.model.name == "sentiment" and response.model.version
    by_id = {r.id: r for r in response.results}
    assert [r.id for r in response.results] == ["en+", "en-", "de", "ja"]
    for r in response.results:
        p = r.probabilities
        assert p.negative + p.neutral + p.positive == pytest.approx(1, abs=1e-6)
        assert 1 <= r.estimated_stars <= 5 and not r.truncated and r.token_count > 5
        assert r.label != pb.SENTIMENT_UNSPECIFIED
    assert by_id["en+"].probabilities.positive > by_id["en-"].probabilities.positive
    assert by_id["en+"].estimated_stars > by_id["en-"].estimated_stars
    assert (by_id["en+"].language, by_id["de"].language, by_id["ja"].language) == ("en", "de", "ja")
    assert by_id["de"].language_confidence > 0.5


async def test_long_text_is_scored_on_its_start_and_flagged(stub: object) -> None:
    long_text = "The fabric is soft and the colour is lovely. " * 400  # ~18 kB, ~4,000 tokens
    response = await stub.Analyze(pb.AnalyzeRequest(texts=[pb.TextInput(text=long_text)]), timeout=120)  # type: ignore[attr-defined]
    result = response.results[0]
    assert result.truncated and result.token_count > 512


async def test_bad_texts_name_their_fields(stub: object) -> None:
    s = stub
    v = await fails(
        s.Analyze(pb.AnalyzeRequest(texts=[pb.TextInput(text="   ")])), grpc.StatusCode.INVALID_ARGUMENT
    )  # type: ignore[attr-defined]
    assert v[0][0] == "texts[0].text" and "empty" in v[0][1]
    request = pb.AnalyzeRequest(
        texts=[
            pb.TextInput(text="fine"),
            pb.TextInput(utf8_bytes=b"ok \xff\xfe"),
            pb.TextInput(id="no content"),
        ]
    )
    v = await fails(s.Analyze(request), grpc.StatusCode.INVALID_ARGUMENT)  # type: ignore[attr-defined]
    assert [f for f, _ in v] == ["texts[1].utf8_bytes", "texts[2].content"]
    assert "UTF-8" in v[0][1]
    huge = pb.AnalyzeRequest(texts=[pb.TextInput(text="x" * 2_000_000)])
    v = await fails(s.Analyze(huge), grpc.StatusCode.INVALID_ARGUMENT)  # type: ignore[attr-defined]
    assert v[0][0] == "texts[0].text" and "65536 characters" in v[0][1]
    v = await fails(s.Analyze(pb.AnalyzeRequest()), grpc.StatusCode.INVALID_ARGUMENT)  # type: ignore[attr-defined]
    assert v[0][0] == "texts"
    many = pb.AnalyzeRequest(texts=[pb.TextInput(text="ok")] * 10_000)
    v = await fails(s.Analyze(many), grpc.StatusCode.INVALID_ARGUMENT)  # type: ignore[attr-defined]
    assert v[0][0] == "texts" and "10000" in v[0][1]


async def test_size_limits_are_invalid_argument_naming_field_and_limit(stub: object) -> None:
    """A per-request limit is a client error (HTTP 400), never the RESOURCE_EXHAUSTED (429) of load:
    a client retrying on 429 would resend it forever. The fixture's setting (64 texts) is stricter
    than the contract's 256 and is what applies."""
    s = stub
    for n, limit in ((65, "64"), (257, "256")):
        many = pb.AnalyzeRequest(texts=[pb.TextInput(text="ok")] * n)
        v = await fails(s.Analyze(many), grpc.StatusCode.INVALID_ARGUMENT)  # type: ignore[attr-defined]
        assert v == [("texts", v[0][1])] and limit in v[0][1] and str(n) in v[0][1]
    control = pb.AnalyzeRequest(texts=[pb.TextInput(text="fine"), pb.TextInput(text="nul\x00inside")])
    v = await fails(s.Analyze(control), grpc.StatusCode.INVALID_ARGUMENT)  # type: ignore[attr-defined]
    assert v[0][0] == "texts[1].text" and "control" in v[0][1]


async def test_huge_market_is_a_bounded_invalid_argument(stub: object) -> None:
    """A 20 KB market was quoted whole: the error passed gRPC's 16 KB trailer limit and the client got
    RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" with no field named."""
    request = pb.GetMarketReportRequest(product_id="sku-1", market="M" * 20_000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetMarketReport(request, timeout=30)  # type: ignore[attr-defined]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err.value)] == ["market"]
    assert len(err.value.details()) < 1024


async def test_malformed_bytes_in_a_string_field_are_invalid_argument(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        raw = ch.unary_unary("/cbec.sentiment.v1.SentimentService/Analyze")
        # field 1 (texts) holding a TextInput whose field 2 (text, a string) is not UTF-8
        inner = b"\x12\x02\xff\xfe"
        await fails(raw(b"\x0a" + bytes([len(inner)]) + inner), grpc.StatusCode.INVALID_ARGUMENT)


async def test_ingest_report_and_rejections(stub: object) -> None:
    now = datetime.now(UTC)
    reviews = []
    for i in range(6):
        reviews.append(
            pb.Review(
                review_id=f"n{i}",
                product_id="sku-1",
                category="dresses",
                market="de",
                created_time=ts(now - timedelta(days=1, minutes=i)),
                text=NEGATIVE,
                rating=1,
            )
        )
    for i in range(4):
        reviews.append(
            pb.Review(
                review_id=f"p{i}",
                product_id="sku-1",
                category="dresses",
                market="FR",
                created_time=ts(now - timedelta(days=2, minutes=i)),
                text=POSITIVE,
            )
        )
    reviews += [
        pb.Review(review_id="bad-market", product_id="sku-1", market="XX", text=POSITIVE),
        pb.Review(review_id="", product_id="sku-1", market="DE", text=POSITIVE, rating=9),
        pb.Review(review_id="n0", product_id="sku-1", market="DE", text=POSITIVE),
        pb.Review(review_id="old", product_id="sku-1", category="dresses", market="DE",
                  created_time=ts(now - timedelta(days=40)), text=POSITIVE),
    ]  # fmt: skip
    response = await stub.IngestReviews(pb.IngestReviewsRequest(reviews=reviews), timeout=120)  # type: ignore[attr-defined]
    assert response.accepted_count == 11
    rejected = {r.index: [(v.field, v.description) for v in r.violations] for r in response.rejected}
    assert set(rejected) == {10, 11, 12}
    assert rejected[10][0][0] == "market" and "XX" in rejected[10][0][1]
    assert {f for f, _ in rejected[11]} == {"review_id", "rating"}
    assert rejected[12][0][0] == "review_id" and "reviews[0]" in rejected[12][0][1]

    report = await stub.GetMarketReport(pb.GetMarketReportRequest(product_id="sku-1"), timeout=60)  # type: ignore[attr-defined]
    d = report.distribution
    assert d.total == 10 and d.negative + d.neutral + d.positive == 10  # "old" is outside the 30 days
    assert report.trend.previous.total == 1
    assert sum(report.languages.values()) == 10 and report.languages["en"] == 10
    assert 1 <= report.average_estimated_stars <= 5
    assert report.model.version
    assert report.window_end.ToDatetime(UTC) - report.window_start.ToDatetime(UTC) == timedelta(days=30)

    fr = await stub.GetMarketReport(  # type: ignore[attr-defined]
        pb.GetMarketReportRequest(category="dresses", market="fr", end_time=ts(now), window=days(7)),
        timeout=60,
    )
    assert fr.distribution.total == 4
    nothing = await stub.GetMarketReport(
        pb.GetMarketReportRequest(product_id="sku-1", market="JP"), timeout=60
    )  # type: ignore[attr-defined]
    assert nothing.distribution.total == 0 and not nothing.alerts


async def test_report_bad_arguments(stub: object) -> None:
    s = stub
    v = await fails(s.GetMarketReport(pb.GetMarketReportRequest()), grpc.StatusCode.INVALID_ARGUMENT)  # type: ignore[attr-defined]
    assert v[0][0] == "scope"
    v = await fails(
        s.GetMarketReport(pb.GetMarketReportRequest(product_id="a", market="Narnia")),  # type: ignore[attr-defined]
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert v[0][0] == "market"
    bad_window = duration_pb2.Duration(seconds=-5)
    v = await fails(
        s.GetMarketReport(pb.GetMarketReportRequest(category="x", window=bad_window)),  # type: ignore[attr-defined]
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert v[0][0] == "window"
    v = await fails(
        s.GetMarketReport(pb.GetMarketReportRequest(category="x", window=days(100_000))),  # type: ignore[attr-defined]
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert v[0][0] == "window"
    many = pb.IngestReviewsRequest(reviews=[pb.Review(review_id="r", text="t")] * 1001)
    v = await fails(s.IngestReviews(many), grpc.StatusCode.INVALID_ARGUMENT)  # type: ignore[attr-defined]
    assert v[0][0] == "reviews" and "1000" in v[0][1]


async def test_stream_returns_results_in_order(stub: object) -> None:
    texts = [POSITIVE, NEGATIVE, "Die Qualität ist schlecht.", "Très belle robe."] * 3

    async def requests() -> AsyncIterator[pb.AnalyzeStreamRequest]:
        for i, t in enumerate(texts):
            yield pb.AnalyzeStreamRequest(text=pb.TextInput(id=f"s{i}", text=t))
            await asyncio.sleep(0)

    results = [r async for r in stub.AnalyzeStream(requests(), timeout=120)]  # type: ignore[attr-defined]
    assert [r.result.id for r in results] == [f"s{i}" for i in range(len(texts))]
    assert all(r.model_version for r in results)
    assert results[2].result.language == "de" and results[3].result.language == "fr"


async def test_stream_bad_item_ends_the_stream_with_its_field(stub: object) -> None:
    async def requests() -> AsyncIterator[pb.AnalyzeStreamRequest]:
        yield pb.AnalyzeStreamRequest(text=pb.TextInput(id="a", text=POSITIVE))
        yield pb.AnalyzeStreamRequest(text=pb.TextInput(id="b", text=""))

    call = stub.AnalyzeStream(requests(), timeout=120)  # type: ignore[attr-defined]
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for r in call:
            got.append(r.result.id)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err.value)[0][0] == "requests[1].text.text"
    assert got in (["a"], [])
