"""Every aggregated route over the demo catalogue shows real content: the suite as ``make run`` starts
it (the launcher, the catalogue loaded through the APIs), called through the HTTP bridge."""

from __future__ import annotations

import pytest

from tests.demo_suite import DemoSuite

PARTS = ("similarItems", "visuallySimilar", "alsoForYou")


def test_every_product_page_has_all_four_parts(demo_suite: DemoSuite) -> None:
    import pandas as pd

    reviews = pd.read_parquet(demo_suite.demo_dir / "reviews.parquet")
    reviewed_in = set(zip(reviews["product_id"], reviews["market"], strict=True))
    ids = {p["productId"] for p in demo_suite.products}
    users = demo_suite.catalogue["users"]
    failures = []
    for i, product in enumerate(demo_suite.products):
        user = users[i % len(users)]
        status, page = demo_suite.post(
            "/v1/gateway/product-page",
            {"userId": user["userId"], "productId": product["productId"], "market": user["market"], "k": 5},
        )
        if status != 200:
            failures.append(f"{product['productId']}: HTTP {status} {page}")
            continue
        empty = [part for part in PARTS if not page.get(part)]
        if int(page.get("sentiment", {}).get("distribution", {}).get("total", 0)) <= 0:
            empty.append("sentiment")
        if page.get("missingParts") or empty:
            failures.append(f"{product['productId']}: empty {empty}, missing {page.get('missingParts')}")
            continue
        # every part names catalogue products, never the product itself
        named = [m["productId"] for m in page["visuallySimilar"]]
        named += [it["itemId"] for part in ("similarItems", "alsoForYou") for it in page[part]]
        assert set(named) <= ids, set(named) - ids
        assert product["productId"] not in named
        # the shopper's market when it has reviews of the product, else every market's
        expected = user["market"] if (product["productId"], user["market"]) in reviewed_in else ""
        assert page["sentimentMarket"] == expected, product["productId"]
    assert not failures, "\n".join(failures)


def test_a_market_without_reviews_of_the_product_shows_every_market(demo_suite: DemoSuite) -> None:
    import pandas as pd

    reviews = pd.read_parquet(demo_suite.demo_dir / "reviews.parquet")
    markets = set(demo_suite.catalogue["markets"])
    for pid, group in reviews.groupby("product_id"):
        absent = sorted(markets - set(group["market"]))
        present = sorted(set(group["market"]))
        if absent:
            product_id = str(pid)
            break
    else:
        pytest.fail("the suite's catalogue (6 reviews per product, 9 markets) has no product to test with")
    _, page = demo_suite.post(
        "/v1/gateway/product-page", {"userId": "u-1001", "productId": product_id, "market": absent[0]}
    )
    assert page["sentimentMarket"] == ""
    assert int(page["sentiment"]["distribution"]["total"]) == len(group)
    _, page = demo_suite.post(
        "/v1/gateway/product-page", {"userId": "u-1001", "productId": product_id, "market": present[0]}
    )
    assert page["sentimentMarket"] == present[0]
    assert int(page["sentiment"]["distribution"]["total"]) == int((group["market"] == present[0]).sum())


@pytest.mark.parametrize("market", ["DE", "JP", "US"])
def test_home_feed_items_carry_their_sentiment(demo_suite: DemoSuite, market: str) -> None:
    user = next(u for u in demo_suite.catalogue["users"] if u["market"] == market)
    status, feed = demo_suite.post(
        "/v1/gateway/home-feed", {"userId": user["userId"], "market": market, "k": 8}
    )
    assert status == 200, feed
    assert not feed.get("missingParts"), feed["missingParts"]
    assert len(feed["items"]) == 8
    ids = {p["productId"] for p in demo_suite.products}
    import pandas as pd

    reviews = pd.read_parquet(demo_suite.demo_dir / "reviews.parquet")
    for item in feed["items"]:
        pid = item["item"]["itemId"]
        assert pid in ids
        here = reviews[(reviews["product_id"] == pid) & (reviews["market"] == market)]
        scope = here if len(here) else reviews[reviews["product_id"] == pid]
        assert int(item["sentiment"]["reviewCount"]) == len(scope), item
        assert item["sentiment"]["market"] == (market if len(here) else "")


def test_checkout_of_catalogue_items_gets_a_decision_with_reasons(demo_suite: DemoSuite) -> None:
    products = demo_suite.products[:3]
    total = round(sum(p["prices"]["DE"]["amount"] for p in products), 2)
    order = {
        "transactionId": "demo-checkout-1",
        "userId": "u-1001",
        "cardFingerprint": "card-demo-1",
        "deviceId": "device-demo-1",
        "ipCountry": "DE",
        "billingCountry": "DE",
        "shippingCountry": "DE",
        "amount": total,
        "currency": "EUR",
        "occurredTime": "2026-12-01T10:00:00Z",
    }
    status, body = demo_suite.post("/v1/gateway/assess-order", {"order": order})
    assert status == 200, body
    assessment = body["assessment"]
    assert assessment["decision"] in ("DECISION_APPROVE", "DECISION_REVIEW", "DECISION_DECLINE")
    assert assessment["reasons"], assessment
