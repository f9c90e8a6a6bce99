"""``make run`` preparation: the knowledge base, demo orders and a default model, skipping what exists.

    python -m services.chat.defaults     # honours CBEC_MODELS_DIR and the CBEC_STATE_* settings

It writes into the configured store, whichever it is: the embedded file under ``CBEC_STATE_DIR``, or the
shared PostgreSQL with ``CBEC_STATE_BACKEND=shared`` (so a Job in the cluster seeds what every replica
serves; the replicas rebuild their indexes on the upsert's notification).

The demo orders are invented by the project (users ``u-1001`` to ``u-1003``) so the order actions can be
tried: e.g. user ``u-1001`` asking "where is CB-100231?". With the shared demo catalogue
(``--demo-dir``, built by ``make run``: ``demo/catalogue.py``) their items are its products, named in
the destination's language and priced in its currency, so chat and the storefront tell one story.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from tqdm import tqdm

from services.runtime.config import load_settings
from services.runtime.state import StateConfig

from .config import ChatSettings
from .knowledge import Embedder, embed_missing, packaged_articles
from .store import ChatStore, OrderRecord
from .train import current_version_matches, train

log = logging.getLogger("cbec.chat.defaults")

DEMO_ORDERS = [
    OrderRecord(
        "CB-100231",
        "u-1001",
        "shipped",
        "DHL Express",
        "JD014600006281",
        "DE",
        "in 2-3 business days",
        "",
        ["Merino wool sweater (M)"],
        89.0,
        "EUR",
        "2026-11-20",
    ),
    OrderRecord(
        "CB-100233",
        "u-1001",
        "processing",
        "",
        "",
        "DE",
        "in 5-8 business days",
        "",
        ["Running shoes (EU 42)"],
        120.0,
        "EUR",
        "2026-11-27",
    ),
    OrderRecord(
        "CB-100245",
        "u-1001",
        "delivered",
        "DHL Express",
        "JD014600006455",
        "DE",
        "",
        "2026-11-18",
        ["Leather sneakers (EU 41)"],
        140.0,
        "EUR",
        "2026-11-10",
    ),
    OrderRecord(
        "CB-100250",
        "u-1002",
        "shipped",
        "USPS",
        "9400111899223856",
        "US",
        "in 4-6 business days",
        "",
        ["Wireless headphones"],
        199.0,
        "USD",
        "2026-11-22",
    ),
    OrderRecord(
        "CB-100262",
        "u-1002",
        "delivered",
        "USPS",
        "9400111899223901",
        "US",
        "",
        "2026-11-15",
        ["Linen shirt (L)"],
        59.0,
        "USD",
        "2026-11-08",
    ),
    OrderRecord(
        "CB-100270",
        "u-1003",
        "cancelled",
        "",
        "",
        "JP",
        "",
        "",
        ["Ceramic tea set"],
        8900.0,
        "JPY",
        "2026-11-21",
    ),
    OrderRecord(
        "CB-100275",
        "u-1003",
        "shipped",
        "Japan Post EMS",
        "EN123456789JP",
        "JP",
        "in 3-6 business days",
        "",
        ["Rain jacket (S)"],
        12800.0,
        "JPY",
        "2026-11-24",
    ),
]


def seed_knowledge(store: ChatStore, embedder: Embedder) -> int:
    """Load packaged articles that are missing or changed; never overwrite an article that was
    replaced through UpsertKnowledge (origin 'api'). Returns how many were written."""
    stored = store.stored_hashes()
    todo = []
    for article in packaged_articles():
        have = stored.get((article.article_id, article.language))
        if have is None or (have[1] == "package" and have[0] != article.content_hash):
            todo.append(article)
    for start in tqdm(range(0, len(todo), 8), desc="embed knowledge base", disable=not todo):
        embed_missing(todo[start : start + 8], embedder)
    if todo:
        store.upsert_articles(todo)
    return len(todo)


def demo_orders(demo_dir: Path | None) -> list[OrderRecord]:
    """``DEMO_ORDERS``, their items taken from the demo catalogue when there is one."""
    path = demo_dir / "products.json" if demo_dir is not None else None
    if path is None or not path.is_file():
        return DEMO_ORDERS
    catalogue = json.loads(path.read_text(encoding="utf-8"))
    products = catalogue["products"]
    orders = []
    for i, order in enumerate(DEMO_ORDERS):
        product = products[(3 * i) % len(products)]
        language = catalogue["markets"].get(order.destination, {}).get("language", "en")
        price = product["prices"].get(order.destination)
        if price is None:
            orders.append(order)
            continue
        title = product["titles"].get(language) or product["titles"]["en"]
        orders.append(
            dataclasses.replace(
                order, items=[title], total=float(price["amount"]), currency=price["currencyCode"]
            )
        )
    return orders


def prepare(models_dir: Path, state: StateConfig, demo_dir: Path | None = None) -> None:
    embedder = Embedder()
    store = ChatStore.open(state)
    try:
        written = seed_knowledge(store, embedder)
        store.put_orders(demo_orders(demo_dir))
        print(f"chat: knowledge base ready ({written} articles written), {store.count_orders()} demo orders")
    finally:
        store.close()
    if current_version_matches(models_dir):
        print("chat: default model is up to date")
        return
    version = train(models_dir, state, embedder)
    print(f"chat: trained model version {version}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo-dir", type=Path, default=Path("data/demo"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = load_settings(ChatSettings, "chat")
    prepare(settings.models_dir, StateConfig.from_settings(settings), args.demo_dir)


if __name__ == "__main__":
    main()
