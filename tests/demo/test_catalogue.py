"""The demo catalogue: one set of product ids across the data every service is given."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from demo.catalogue import END_TIME, FIXED_USERS, LANGUAGES, MARKETS, Params, build, local_price
from services.sentiment.data import data_path
from services.vision import data as fmnist
from services.vision.train import CATALOGUE_RESERVED

SMALL = Params(products=12, reviews_per_product=4, users=40, events_per_user=5.0)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, build(out, SMALL, progress=False)


def test_every_file_names_the_same_products(small: tuple[Path, dict]) -> None:
    out, catalogue = small
    ids = [p["productId"] for p in catalogue["products"]]
    assert len(ids) == len(set(ids)) == SMALL.products
    items = pd.read_parquet(out / "items.parquet")
    reviews = pd.read_parquet(out / "reviews.parquet")
    interactions = pd.read_parquet(out / "interactions.parquet")
    assert list(items["item_id"]) == ids
    assert set(reviews["product_id"]) == set(ids)
    assert set(interactions["item_id"]) <= set(ids)
    assert reviews.groupby("product_id").size().max() <= SMALL.reviews_per_product
    for p in catalogue["products"]:
        assert (out / p["image"]).is_file()
        assert p["reviewCount"] == int((reviews["product_id"] == p["productId"]).sum())


def test_images_are_reserved_fashion_mnist_photos_of_the_products_class(small: tuple[Path, dict]) -> None:
    out, catalogue = small
    split = fmnist.load("train")
    label_of = {
        hashlib.sha256(split.png(i)).hexdigest(): fmnist.CLASSES[int(split.labels[i])]
        for i in range(CATALOGUE_RESERVED)
    }
    for p in catalogue["products"]:
        digest = hashlib.sha256((out / p["image"]).read_bytes()).hexdigest()
        assert label_of.get(digest) == p["imageClass"], p["productId"]


def test_reviews_are_the_data_sets_own(small: tuple[Path, dict]) -> None:
    out, _ = small
    raw = pd.read_parquet(data_path()).dropna(subset=["Review Text"])
    titles, bodies = raw["Title"].fillna("").str.strip(), raw["Review Text"].str.strip()
    texts = {f"{t}. {b}" if t else b for t, b in zip(titles, bodies, strict=True)}
    reviews = pd.read_parquet(out / "reviews.parquet")
    assert set(reviews["text"]) <= texts
    assert set(reviews["market"]) <= set(MARKETS)
    assert reviews["created"].between(END_TIME - 365 * 86400, END_TIME).all()


def test_text_and_prices_exist_for_every_language_and_market(small: tuple[Path, dict]) -> None:
    _, catalogue = small
    assert "SYNTHETIC" in catalogue["synthetic"]
    for p in catalogue["products"]:
        assert set(p["titles"]) == set(LANGUAGES) == set(p["descriptions"])
        assert set(p["prices"]) == set(MARKETS)
        for market, price in p["prices"].items():
            assert price["currencyCode"] == MARKETS[market][1]
            assert price["amount"] == local_price(p["priceUsd"], market)
    users = {u["userId"]: u["market"] for u in catalogue["users"]}
    for user, market in FIXED_USERS.items():
        assert users[user] == market


def test_a_small_build_is_a_prefix_of_a_large_one(tmp_path: Path, small: tuple[Path, dict]) -> None:
    _, catalogue = small
    larger = build(tmp_path, Params(products=30, reviews_per_product=4, users=40), progress=False)
    assert [p["productId"] for p in larger["products"][: SMALL.products]] == [
        p["productId"] for p in catalogue["products"]
    ]


def test_a_rebuild_with_the_same_parameters_is_skipped(small: tuple[Path, dict]) -> None:
    out, _ = small
    before = (out / "manifest.json").stat().st_mtime_ns
    build(out, SMALL, progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_chat_demo_orders_are_catalogue_products(small: tuple[Path, dict]) -> None:
    from services.chat.defaults import DEMO_ORDERS, demo_orders

    out, catalogue = small
    orders = demo_orders(out)
    assert [o.order_id for o in orders] == [o.order_id for o in DEMO_ORDERS]
    titles = {t: p for p in catalogue["products"] for t in p["titles"].values()}  # any language
    for order in orders:
        (item,) = order.items
        product = titles[item]
        assert product["titles"][catalogue["markets"][order.destination]["language"]] == item
        assert (order.total, order.currency) == (
            product["prices"][order.destination]["amount"],
            product["prices"][order.destination]["currencyCode"],
        )
    assert demo_orders(None) == DEMO_ORDERS
