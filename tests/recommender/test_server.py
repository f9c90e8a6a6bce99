"""The gRPC surface on a real server (ephemeral port) with a tiny trained model."""

from __future__ import annotations

import math
import shutil
from typing import Any

import grpc
import numpy as np
import pytest
from cbec.common.v1 import common_pb2, common_pb2_grpc
from cbec.recommender.v1 import recommender_pb2 as pb

from services.runtime.errors import field_violations
from services.runtime.server import Server
from tests.recommender.conftest import Shop
from tests.support import trusted_channel


def history_of(shop: Shop, user: str) -> set[str]:
    df = shop.prepared.interactions
    return set(df.loc[df.user_id == user, "item_id"])


def busiest_user(shop: Shop) -> str:
    return str(shop.prepared.interactions.user_id.value_counts().index[0])


async def expect_invalid(call: Any, request: Any, field: str) -> list[tuple[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    violations = field_violations(err.value)
    assert field in [f for f, _ in violations], violations
    return violations


async def test_known_user_gets_personalised_unseen_items_with_explanations(stub: Any, shop: Shop) -> None:
    user = busiest_user(shop)
    r = await stub.Recommend(pb.RecommendRequest(user_id=user, k=5, explain=True))
    assert r.strategy == pb.STRATEGY_HYBRID
    assert r.model.version == shop.version and r.model.name == "recommender"
    assert len(r.items) == 5 and not {i.item_id for i in r.items} & history_of(shop, user)
    assert [i.score for i in r.items] == sorted((i.score for i in r.items), reverse=True)
    assert all(i.title and i.category for i in r.items)
    explained = [e.item_id for i in r.items for e in i.explanation]
    assert explained and set(explained) <= history_of(shop, user)


async def test_unknown_user_gets_market_aware_cold_start(stub: Any, shop: Shop) -> None:
    r = await stub.Recommend(pb.RecommendRequest(user_id="never-seen", k=6, market="DE"))
    assert r.strategy == pb.STRATEGY_COLD_START and len(r.items) == 6
    markets = shop.prepared.items.set_index("item_id")["markets"]
    assert all(markets[i.item_id] in ("",) or "DE" in markets[i.item_id].split("|") for i in r.items)


async def test_a_market_no_item_names_gets_the_items_sold_everywhere(stub: Any, shop: Shop) -> None:
    """A valid market the catalogue does not name yet is not an error: items sold everywhere qualify."""
    markets = shop.prepared.items.set_index("item_id")["markets"]
    named = {m for value in markets for m in str(value).split("|") if m}
    unnamed = next(c for c in ("JP", "KR", "NZ", "ZA", "IS") if c not in named)
    r = await stub.Recommend(pb.RecommendRequest(user_id="nobody-yet", k=5, market=unnamed))
    assert r.items, "items sold everywhere exist in the tiny shop"
    assert all(markets[i.item_id] == "" for i in r.items)


async def test_filters_categories_exclusions_and_seen(stub: Any, shop: Shop) -> None:
    user = busiest_user(shop)
    categories = shop.prepared.items.set_index("item_id")["category"]
    wanted = sorted(set(categories))[:2]
    r = await stub.Recommend(
        pb.RecommendRequest(user_id=user, k=3, filters=pb.RecommendFilters(categories=wanted))
    )
    assert r.items and all(categories[i.item_id] in wanted for i in r.items)
    first = (await stub.Recommend(pb.RecommendRequest(user_id=user, k=3))).items[0].item_id
    r = await stub.Recommend(
        pb.RecommendRequest(user_id=user, k=3, filters=pb.RecommendFilters(exclude_item_ids=[first]))
    )
    assert first not in {i.item_id for i in r.items}
    r = await stub.Recommend(
        pb.RecommendRequest(user_id=user, k=40, filters=pb.RecommendFilters(include_seen=True))
    )
    assert history_of(shop, user) <= {i.item_id for i in r.items}


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"user_id": "u", "k": 0}, "k"),
        ({"user_id": "u", "k": 501}, "k"),
        ({"user_id": "", "k": 5}, "user_id"),
        ({"user_id": "u", "k": 5, "market": "Germany"}, "market"),
        ({"user_id": "u", "k": 5, "market": "ZZ"}, "market"),
        (
            {"user_id": "u", "k": 5, "filters": pb.RecommendFilters(categories=["no such thing"])},
            "filters.categories[0]",
        ),
        (
            {"user_id": "u", "k": 5, "filters": pb.RecommendFilters(categories=["shoes", ""])},
            "filters.categories[1]",
        ),
        (
            {"user_id": "u", "k": 5, "filters": pb.RecommendFilters(exclude_item_ids=[""])},
            "filters.exclude_item_ids[0]",
        ),
    ],
)
async def test_bad_recommend_requests_are_invalid_argument_with_field_violations(
    stub: Any, request_kwargs: dict[str, Any], field: str
) -> None:
    await expect_invalid(stub.Recommend, pb.RecommendRequest(**request_kwargs), field)


@pytest.mark.parametrize(
    ("filters", "field", "words"),
    [
        (pb.RecommendFilters(categories=["c" * 10_000]), "filters.categories[0]", "256"),
        (pb.RecommendFilters(categories=["c" * 250]), "filters.categories[0]", "unknown category"),
        (pb.RecommendFilters(categories=[f"c{i}" for i in range(10_000)]), "filters.categories", "100"),
        (pb.RecommendFilters(exclude_item_ids=[""] * 100_000), "filters.exclude_item_ids", "1000"),
    ],
    ids=["10KB-category", "long-unknown-category", "10k-categories", "100k-empty-exclusions"],
)
async def test_oversized_filters_are_a_bounded_invalid_argument(
    stub: Any, filters: pb.RecommendFilters, field: str, words: str
) -> None:
    """Unbounded input once came back quoted whole: past gRPC's 16 KB trailer limit the client saw
    RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" with no field named."""
    request = pb.RecommendRequest(user_id="u", k=5, filters=filters)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Recommend(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = field_violations(err.value)
    assert violation[0] == field and words in violation[1] and len(violation[1]) <= 256
    assert len(err.value.details()) <= 512


async def test_a_huge_model_version_is_invalid_argument(server: Server) -> None:
    async with trusted_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        admin = common_pb2_grpc.ModelAdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.LoadModelVersion(common_pb2.LoadModelVersionRequest(version="v" * 1_000_000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err.value)] == ["version"]


async def test_several_violations_are_reported_together(stub: Any) -> None:
    violations = await expect_invalid(stub.Recommend, pb.RecommendRequest(user_id="", k=-1), "user_id")
    assert {f for f, _ in violations} == {"user_id", "k"}


async def test_similar_items_sources_and_errors(stub: Any, shop: Shop) -> None:
    item = str(shop.prepared.interactions.item_id.value_counts().index[0])
    for source in (
        pb.SIMILARITY_SOURCE_BLENDED,
        pb.SIMILARITY_SOURCE_COLLABORATIVE,
        pb.SIMILARITY_SOURCE_CONTENT,
    ):
        r = await stub.SimilarItems(pb.SimilarItemsRequest(item_id=item, k=4, source=source))
        assert len(r.items) == 4 and item not in {i.item_id for i in r.items}
        assert r.model.version == shop.version
    category = shop.prepared.items.set_index("item_id")["category"][item]
    r = await stub.SimilarItems(pb.SimilarItemsRequest(item_id=item, k=3, categories=[category]))
    assert all(i.category == category for i in r.items)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SimilarItems(pb.SimilarItemsRequest(item_id="no-such-item", k=3))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await expect_invalid(stub.SimilarItems, pb.SimilarItemsRequest(item_id=item, k=0), "k")
    await expect_invalid(stub.SimilarItems, pb.SimilarItemsRequest(item_id="", k=3), "item_id")
    await expect_invalid(
        stub.SimilarItems, pb.SimilarItemsRequest(item_id=item, k=3, categories=["?"]), "categories[0]"
    )


async def test_record_interactions_rejects_bad_events_one_by_one(stub: Any, shop: Shop) -> None:
    item = str(shop.prepared.items.item_id[0])
    good = dict(user_id="rec-user", item_id=item, type=pb.INTERACTION_TYPE_VIEW)
    events = [
        pb.Interaction(**good),
        pb.Interaction(**{**good, "item_id": "not-in-catalogue"}),
        pb.Interaction(**{**good, "rating": math.nan}),
        pb.Interaction(**{**good, "rating": -2.0}),
        pb.Interaction(**{**good, "type": pb.INTERACTION_TYPE_RATING, "rating": 7.0}),
        pb.Interaction(**{**good, "type": pb.INTERACTION_TYPE_UNSPECIFIED}),
        pb.Interaction(**{**good, "market": "Deutschland"}),
        pb.Interaction(**{**good, "user_id": ""}),
        pb.Interaction(**{**good, "type": pb.INTERACTION_TYPE_RATING, "rating": 4.0, "market": "DE"}),
    ]
    r = await stub.RecordInteractions(pb.RecordInteractionsRequest(interactions=events))
    assert r.accepted_count == 2
    got = {rej.index: [v.field for v in rej.violations] for rej in r.rejected}
    assert got == {
        1: ["interactions[1].item_id"],
        2: ["interactions[2].rating"],
        3: ["interactions[3].rating"],
        4: ["interactions[4].rating"],
        5: ["interactions[5].type"],
        6: ["interactions[6].market"],
        7: ["interactions[7].user_id"],
    }
    await expect_invalid(stub.RecordInteractions, pb.RecordInteractionsRequest(), "interactions")


async def test_feedback_is_reflected_by_the_very_next_recommend(
    stub: Any, server: Server, shop: Shop
) -> None:
    # a brand-new user: cold start -> content similarity (few events) -> personalised
    user = "fresh-user"
    r = await stub.Recommend(pb.RecommendRequest(user_id=user, k=5))
    assert r.strategy == pb.STRATEGY_COLD_START
    touched = str(r.items[0].item_id)
    await stub.RecordInteractions(
        pb.RecordInteractionsRequest(
            interactions=[pb.Interaction(user_id=user, item_id=touched, type=pb.INTERACTION_TYPE_PURCHASE)]
        )
    )
    r = await stub.Recommend(pb.RecommendRequest(user_id=user, k=5, explain=True))
    assert r.strategy == pb.STRATEGY_CONTENT and touched not in {i.item_id for i in r.items}
    assert all(e.item_id == touched for i in r.items for e in i.explanation)
    more = [str(i) for i in shop.prepared.items.item_id[:5] if i != touched][:4]  # 5 events in all
    await stub.RecordInteractions(
        pb.RecordInteractionsRequest(
            interactions=[
                pb.Interaction(user_id=user, item_id=i, type=pb.INTERACTION_TYPE_VIEW) for i in more
            ]
        )
    )
    r = await stub.Recommend(pb.RecommendRequest(user_id=user, k=5))
    assert r.strategy == pb.STRATEGY_HYBRID and not {touched, *more} & {i.item_id for i in r.items}
    # a known user: what they just bought is no longer recommended and the list changes
    known = busiest_user(shop)
    before = [i.item_id for i in (await stub.Recommend(pb.RecommendRequest(user_id=known, k=5))).items]
    await stub.RecordInteractions(
        pb.RecordInteractionsRequest(
            interactions=[pb.Interaction(user_id=known, item_id=before[0], type=pb.INTERACTION_TYPE_PURCHASE)]
        )
    )
    after = [i.item_id for i in (await stub.Recommend(pb.RecommendRequest(user_id=known, k=5))).items]
    assert before[0] not in after and after != before


async def test_upserted_item_is_recommendable_at_once_through_its_text(stub: Any, shop: Shop) -> None:
    items = shop.prepared.items
    source = items.iloc[0]
    new = pb.Item(
        item_id="NEW-1",
        title=str(source.title) + " neu",
        description=str(source.description),
        category=str(source.category),
        markets=["DE", "FR"],
        price=common_pb2.Money(currency_code="EUR", amount=19.9),
    )
    bad = [
        pb.Item(item_id="", title="x"),
        pb.Item(item_id="NEW-2"),
        pb.Item(item_id="NEW-3", title="x", markets=["Germany"]),
        pb.Item(item_id="NEW-4", title="x", price=common_pb2.Money(currency_code="euro", amount=-1)),
    ]
    r = await stub.UpsertItems(pb.UpsertItemsRequest(items=[new, *bad]))
    assert r.upserted_count == 1
    assert {rej.index: sorted(v.field for v in rej.violations) for rej in r.rejected} == {
        1: ["items[1].item_id"],
        2: ["items[2].title"],
        3: ["items[3].markets[0]"],
        4: ["items[4].price.amount", "items[4].price.currency_code"],
    }
    similar = await stub.SimilarItems(
        pb.SimilarItemsRequest(item_id=str(source.item_id), k=3, source=pb.SIMILARITY_SOURCE_CONTENT)
    )
    assert "NEW-1" in {i.item_id for i in similar.items}
    r = await stub.SimilarItems(pb.SimilarItemsRequest(item_id="NEW-1", k=3))
    assert len(r.items) == 3 and str(source.item_id) in {i.item_id for i in r.items}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SimilarItems(
            pb.SimilarItemsRequest(item_id="NEW-1", k=3, source=pb.SIMILARITY_SOURCE_COLLABORATIVE)
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # a new user who touched the source item is shown the new item (content strategy)
    await stub.RecordInteractions(
        pb.RecordInteractionsRequest(
            interactions=[
                pb.Interaction(user_id="fan", item_id=str(source.item_id), type=pb.INTERACTION_TYPE_VIEW)
            ]
        )
    )
    # content similarity plus the popularity prior: among the first half of this 40-item catalogue
    r = await stub.Recommend(pb.RecommendRequest(user_id="fan", k=20, market="DE"))
    shown = {i.item_id: i for i in r.items}
    assert r.strategy == pb.STRATEGY_CONTENT and "NEW-1" in shown
    assert shown["NEW-1"].category == str(source.category)
    # events on the new item are accepted; upserting again changes it in place
    r2 = await stub.RecordInteractions(
        pb.RecordInteractionsRequest(interactions=[pb.Interaction(user_id="fan", item_id="NEW-1", type=1)])
    )
    assert r2.accepted_count == 1
    renamed = pb.Item(item_id="NEW-1", title="Nordwind Laufschuhe", category="running", markets=["DE"])
    await stub.UpsertItems(pb.UpsertItemsRequest(items=[renamed, pb.Item(item_id="NEW-5", title="x y z")]))
    r3 = await stub.SimilarItems(pb.SimilarItemsRequest(item_id="NEW-5", k=50, categories=["running"]))
    found = [(i.item_id, i.title, i.category) for i in r3.items]
    assert found == [("NEW-1", "Nordwind Laufschuhe", "running")]


async def test_forget_user_removes_events_and_vector(stub: Any, server: Server, shop: Shop) -> None:
    user = busiest_user(shop)
    item = next(i for i in shop.prepared.items.item_id if i not in history_of(shop, user))
    await stub.RecordInteractions(
        pb.RecordInteractionsRequest(interactions=[pb.Interaction(user_id=user, item_id=item, type=1)] * 2)
    )
    r = await stub.ForgetUser(pb.ForgetUserRequest(user_id=user))
    assert r.events_deleted == 2
    engine = server.service.slot.current.model
    assert engine.store.events_for_user(user) == []
    row = int(engine.b.user_pos.get_indexer([user])[0])
    als = engine.b.model.components["als"]
    assert not np.any(als.user_factors[row])
    after = await stub.Recommend(pb.RecommendRequest(user_id=user, k=5))
    assert after.strategy == pb.STRATEGY_COLD_START  # no history left: a stranger
    await expect_invalid(stub.ForgetUser, pb.ForgetUserRequest(user_id=""), "user_id")


async def test_a_version_that_fails_to_load_leaves_the_previous_serving(server: Server, shop: Shop) -> None:
    good = server.service.slot.current.manifest.version
    broken = shop.models_dir / "recommender" / "29990101T000000000000Z"
    shutil.copytree(shop.models_dir / "recommender" / good, broken)
    try:
        manifest = (broken / "manifest.json").read_text().replace(good, broken.name)
        (broken / "manifest.json").write_text(manifest)
        (broken / "model" / "model.json").write_text("{not json")
        async with trusted_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            admin = common_pb2_grpc.ModelAdminServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin.LoadModelVersion(common_pb2.LoadModelVersionRequest(version=broken.name))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            status = await admin.GetModelStatus(common_pb2.GetModelStatusRequest())
            assert status.serving.version == good
            r = await admin.LoadModelVersion(common_pb2.LoadModelVersionRequest())  # newest valid: falls back
            assert r.serving.version == good
    finally:
        shutil.rmtree(broken)
