"""GatewayService over gRPC: fan-out, partial results, deadlines, fail-closed risk, request ids."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cbec.gateway.v1 import gateway_pb2
from cbec.recommender.v1 import recommender_pb2
from cbec.risk.v1 import risk_pb2
from google.rpc import error_details_pb2

from services.runtime.errors import field_violations, status_from_error
from tests.gateway.backends import Recorder
from tests.gateway.conftest import AUTH

ORDER = risk_pb2.Transaction(
    transaction_id="t-1",
    user_id="u-42",
    card_fingerprint="card-9",
    occurred_time={"seconds": int(time.time()) - 300},
    ip_country="BR",
    billing_country="DE",
    shipping_country="DE",
    amount=129.9,
    currency="EUR",
)


def md(request_id: str) -> tuple[tuple[str, str], ...]:
    return (*AUTH, ("x-request-id", request_id))


async def test_home_feed_enriches_every_item_with_sentiment(stub: Any, recorder: Recorder) -> None:
    reply = await stub.GetHomeFeed(
        gateway_pb2.GetHomeFeedRequest(user_id="u-7", market="DE", k=8), metadata=md("feed-1"), timeout=5
    )
    assert len(reply.items) == 8
    assert reply.strategy == recommender_pb2.STRATEGY_PERSONALISED
    assert not reply.missing_parts
    with_reviews = [i for i in reply.items if i.HasField("sentiment")]
    assert with_reviews, "the test catalogue has reviewed items"
    for item in with_reviews:
        s = item.sentiment
        assert s.review_count > 0 and 0 <= s.positive_share <= 1 and 0 <= s.negative_share <= 1
    # items whose id ends in 0 have no reviews: no summary, and not a missing part
    assert all(not i.HasField("sentiment") for i in reply.items if i.item.item_id.endswith("0"))
    # one recommend call and one report per item, all with the caller's request id
    assert len(recorder.of("Recommend")) == 1
    assert len(recorder.of("GetMarketReport")) == 8
    assert {c.request_id for c in recorder.calls} == {"feed-1"}
    assert {c.caller for c in recorder.calls} == {"full"}


async def test_product_page_fans_out_concurrently(stub: Any, recorder: Recorder) -> None:
    recorder.delay("SimilarItems", 0.3)
    recorder.delay("GetMarketReport", 0.3)
    recorder.delay("Recommend", 0.3)
    started = time.monotonic()
    reply = await stub.GetProductPage(
        gateway_pb2.GetProductPageRequest(user_id="u-1", product_id="sku-003", market="DE", k=5),
        metadata=md("page-1"),
        timeout=5,
    )
    elapsed = time.monotonic() - started
    assert elapsed < 0.8, f"parts ran one after another ({elapsed:.2f}s)"
    assert not reply.missing_parts
    assert len(reply.similar_items) == 5 and "sku-003" not in {i.item_id for i in reply.similar_items}
    assert len(reply.also_for_you) == 5 and "sku-003" not in {i.item_id for i in reply.also_for_you}
    assert reply.sentiment.distribution.total > 0
    assert list(reply.visually_similar) == []  # no image directory: nothing to search, nothing missing


async def test_visual_part_uses_the_product_image(
    make_gateway: Any, tmp_path: Path, recorder: Recorder
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "sku-005.jpg").write_bytes(b"\xff\xd8\xff fake jpeg bytes")
    gw = await make_gateway(product_images_dir=images)
    async with grpc.aio.insecure_channel(gw.grpc_address) as channel:
        from cbec.gateway.v1 import gateway_pb2_grpc

        reply = await gateway_pb2_grpc.GatewayServiceStub(channel).GetProductPage(
            gateway_pb2.GetProductPageRequest(product_id="sku-005", k=4), metadata=AUTH, timeout=5
        )
    assert len(reply.visually_similar) == 4
    assert "sku-005" not in {m.product_id for m in reply.visually_similar}
    assert len(recorder.of("SearchByImage")) == 1


async def test_partial_result_when_a_backend_fails(stub: Any, recorder: Recorder) -> None:
    recorder.fail("GetMarketReport", grpc.StatusCode.INTERNAL)
    reply = await stub.GetProductPage(
        gateway_pb2.GetProductPageRequest(user_id="u-1", product_id="sku-003", k=3), metadata=AUTH, timeout=5
    )
    assert [(p.part, p.code) for p in reply.missing_parts] == [("sentiment", "INTERNAL")]
    assert len(reply.similar_items) == 3 and len(reply.also_for_you) == 3
    assert not reply.HasField("sentiment")


async def test_partial_result_when_a_backend_hangs(stub: Any, recorder: Recorder) -> None:
    recorder.delay("GetMarketReport", 30)
    started = time.monotonic()
    reply = await stub.GetHomeFeed(
        gateway_pb2.GetHomeFeedRequest(user_id="u-1", k=4), metadata=AUTH, timeout=0.6
    )
    assert time.monotonic() - started < 0.6
    assert len(reply.items) == 4
    assert [(p.part, p.code) for p in reply.missing_parts] == [("sentiment", "DEADLINE_EXCEEDED")]
    assert all(not i.HasField("sentiment") for i in reply.items)


async def test_partial_result_when_a_backend_is_down(stub: Any, backends: Any) -> None:
    await backends["recommender"].stop(grace=0)
    reply = await stub.GetProductPage(
        gateway_pb2.GetProductPageRequest(product_id="sku-003"), metadata=AUTH, timeout=5
    )
    parts = {p.part: p.code for p in reply.missing_parts}
    assert parts == {"similar_items": "UNAVAILABLE", "also_for_you": "UNAVAILABLE"}
    assert reply.sentiment.distribution.total > 0
    assert all("127.0.0.1" not in p.message for p in reply.missing_parts), "no internal addresses leak"
    feed = await stub.GetHomeFeed(gateway_pb2.GetHomeFeedRequest(user_id="u-1"), metadata=AUTH, timeout=5)
    assert not feed.items and [p.part for p in feed.missing_parts] == ["recommendations"]


async def test_backend_deadline_derives_from_the_callers(
    stub: Any, recorder: Recorder, make_gateway: Any
) -> None:
    await stub.GetProductPage(  # with a user, so that all three backends are called
        gateway_pb2.GetProductPageRequest(product_id="sku-003", user_id="u-1"), metadata=AUTH, timeout=0.8
    )
    remaining = [c.time_remaining for c in recorder.calls]
    assert len(remaining) == 3 and all(r is not None and 0.5 < r < 0.8 for r in remaining), remaining
    # without a caller deadline, each backend gets its own cap (here 1.5 s for sentiment)
    recorder.clear()
    gw = await make_gateway(backend_timeouts={"sentiment": 1.5}, backend_timeout_s=3.0)
    async with grpc.aio.insecure_channel(gw.grpc_address) as channel:
        from cbec.gateway.v1 import gateway_pb2_grpc

        await gateway_pb2_grpc.GatewayServiceStub(channel).GetProductPage(
            gateway_pb2.GetProductPageRequest(product_id="sku-003"), metadata=AUTH
        )
    by_method = {c.method: c.time_remaining for c in recorder.calls}
    assert 1.0 < by_method["GetMarketReport"] <= 1.52  # grpc-timeout rounds up slightly
    assert 2.5 < by_method["SimilarItems"] <= 3.02


async def test_expired_budget_skips_the_backend_call(stub: Any, recorder: Recorder) -> None:
    recorder.delay("Recommend", 0.5)
    reply = await stub.GetHomeFeed(gateway_pb2.GetHomeFeedRequest(user_id="u-1"), metadata=AUTH, timeout=0.3)
    assert [(p.part, p.code) for p in reply.missing_parts] == [("recommendations", "DEADLINE_EXCEEDED")]


async def test_assess_order_returns_the_risk_decision(stub: Any) -> None:
    reply = await stub.AssessOrder(gateway_pb2.AssessOrderRequest(order=ORDER), metadata=AUTH, timeout=5)
    assert reply.assessment.transaction_id == "t-1"
    assert reply.assessment.decision == risk_pb2.DECISION_REVIEW
    assert [r.code for r in reply.assessment.reasons] == ["COUNTRY_MISMATCH_IP_BILLING"]


@pytest.mark.parametrize("fault", ["down", "hang", "error"])
async def test_assess_order_fails_closed_without_risk(
    stub: Any, backends: Any, recorder: Recorder, fault: str
) -> None:
    if fault == "down":
        await backends["risk"].stop(grace=0)
    elif fault == "hang":
        recorder.delay("ScoreTransaction", 30)
    else:
        recorder.fail("ScoreTransaction", grpc.StatusCode.INTERNAL)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.AssessOrder(gateway_pb2.AssessOrderRequest(order=ORDER), metadata=AUTH, timeout=1)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "must not be approved" in err.value.details()
    status = status_from_error(err.value)
    reasons = []
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reasons.append(info.reason)
    assert reasons == ["RISK_UNAVAILABLE"]


async def test_assess_order_invalid_order_names_the_callers_fields(stub: Any) -> None:
    bad = risk_pb2.Transaction(transaction_id="t-2", amount=-5, currency="euro")
    with pytest.raises(grpc.aio.AioRpcError) as err:  # REQUIRED fields: the gateway's runtime
        await stub.AssessOrder(gateway_pb2.AssessOrderRequest(order=bad), metadata=AUTH, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in field_violations(err.value)} == {"order.card_fingerprint", "order.occurred_time"}
    bad.MergeFrom(risk_pb2.Transaction(card_fingerprint="card-1", occurred_time=ORDER.occurred_time))
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the rest: risk's, renamed to the caller's fields
        await stub.AssessOrder(gateway_pb2.AssessOrderRequest(order=bad), metadata=AUTH, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in field_violations(err.value)} == {"order.amount", "order.currency"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.AssessOrder(gateway_pb2.AssessOrderRequest(), metadata=AUTH, timeout=5)
    assert field_violations(err.value) == [("order", "is required")]


async def test_invalid_k_is_rejected_before_any_backend_call(stub: Any, recorder: Recorder) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetHomeFeed(gateway_pb2.GetHomeFeedRequest(user_id="u-1", k=-1), metadata=AUTH, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err.value)] == ["k"]
    assert not recorder.calls


async def test_request_id_returned_to_the_caller(stub: Any) -> None:
    call = stub.AssessOrder(gateway_pb2.AssessOrderRequest(order=ORDER), metadata=md("rid-42"), timeout=5)
    await call
    trailing = dict(await call.trailing_metadata())
    assert trailing["x-request-id"] == "rid-42"


async def test_oversized_grpc_request_is_refused(stub: Any, recorder: Recorder) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetHomeFeed(
            gateway_pb2.GetHomeFeedRequest(user_id="x" * 2_000_000), metadata=AUTH, timeout=5
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not recorder.calls
