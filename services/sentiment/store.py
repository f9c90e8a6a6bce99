"""Durable review store with running aggregates, and the market report computed from them.

A domain repository over the runtime's state layer: ``sentiment_reviews`` and ``sentiment_agg`` in the
service's ``Database`` (an SQLite file under ``CBEC_STATE_DIR`` embedded, the shared PostgreSQL
otherwise), so a review ingested through any replica counts in every replica's report: reports read
the store, nothing is cached per replica.

Why this shape: a report over a million reviews must not rescan them. Every ingested review adds to
hourly buckets ``(product or category, market or all, hour, language) -> counts, sum of stars`` in the
same transaction that stores it, so a 30-day report reads at most 720 buckets per language. Windows
need not fall on hour boundaries: the partial hours at either edge are counted from the reviews
themselves through an index, so results are exact. Driver terms come from a bounded sample (the most
recent negative and positive reviews of the window, 1,000 of each by default), not from every review.

A review id is stored once: re-sending it (a client retry, on any replica) is accepted and not counted
twice, because only the rows the insert actually created feed the aggregates. The aggregate upsert is
an increment evaluated by the database (``negative = sentiment_agg.negative + excluded.negative``), so
replicas ingesting the same buckets at once never overwrite each other's counts. Rows and buckets are
written in sorted order, so two PostgreSQL transactions take their row locks in the same order and
cannot deadlock. Embedded: WAL with ``synchronous=NORMAL``, a committed batch survives a killed
process (``FULL`` would also survive power loss, at an fsync per batch).
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.runtime.state import Database, Migration, SqliteDatabase, StoreUnavailable

log = logging.getLogger("cbec.sentiment.store")
HOUR_MS = 3_600_000
ALL_MARKETS = ""
COLUMNS = (
    "review_id", "product_id", "category", "market", "created_ms", "text", "rating", "label",
    "p_negative", "p_neutral", "p_positive", "stars", "lang", "lang_confidence", "truncated", "terms",
    "model_version", "ingested_ms",
)  # fmt: skip
INSERT_CHUNK = 500  # rows per INSERT statement (18 parameters each; SQLite allows 32,766 per statement)

MIGRATIONS = [
    Migration(
        """
CREATE TABLE sentiment_reviews (
    review_id TEXT PRIMARY KEY,
    product_id TEXT NOT NULL,
    category TEXT NOT NULL,
    market TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    text TEXT NOT NULL,
    rating INTEGER NOT NULL,
    label INTEGER NOT NULL,
    p_negative REAL NOT NULL,
    p_neutral REAL NOT NULL,
    p_positive REAL NOT NULL,
    stars REAL NOT NULL,
    lang TEXT NOT NULL,
    lang_confidence REAL NOT NULL,
    truncated INTEGER NOT NULL,
    terms TEXT NOT NULL,
    model_version TEXT NOT NULL,
    ingested_ms INTEGER NOT NULL
);
CREATE INDEX sentiment_reviews_product ON sentiment_reviews (product_id, label, created_ms);
CREATE INDEX sentiment_reviews_category ON sentiment_reviews (category, label, created_ms);
CREATE INDEX sentiment_reviews_product_market ON sentiment_reviews (product_id, market, label, created_ms);
CREATE INDEX sentiment_reviews_category_market ON sentiment_reviews (category, market, label, created_ms);
CREATE TABLE sentiment_agg (
    kind TEXT NOT NULL,          -- 'p' product, 'c' category
    scope TEXT NOT NULL,
    market TEXT NOT NULL,        -- '' = all markets
    hour INTEGER NOT NULL,       -- created_ms // 3600000
    lang TEXT NOT NULL,
    negative INTEGER NOT NULL,
    neutral INTEGER NOT NULL,
    positive INTEGER NOT NULL,
    stars_sum REAL NOT NULL,
    PRIMARY KEY (kind, scope, market, hour, lang)
) WITHOUT ROWID;
"""
    )
]

# The increment is computed by the database from the row it locked, never from a value read earlier.
_UPSERT = """
INSERT INTO sentiment_agg (kind, scope, market, hour, lang, negative, neutral, positive, stars_sum)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (kind, scope, market, hour, lang) DO UPDATE SET
    negative = sentiment_agg.negative + excluded.negative,
    neutral = sentiment_agg.neutral + excluded.neutral,
    positive = sentiment_agg.positive + excluded.positive,
    stars_sum = sentiment_agg.stars_sum + excluded.stars_sum
"""


def _insert_sql(rows: int) -> str:
    values = ", ".join(["(" + ", ".join("?" * len(COLUMNS)) + ")"] * rows)
    return (
        f"INSERT INTO sentiment_reviews ({', '.join(COLUMNS)}) VALUES {values} "
        "ON CONFLICT (review_id) DO NOTHING RETURNING review_id"
    )


# --- terms ---------------------------------------------------------------------------------------
_WORD = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)?", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
MAX_TERMS = 64


def terms_of(text: str) -> list[str]:
    """Distinct terms of a review: lower-cased words of 2+ letters; character bigrams for Chinese and
    Japanese, which are written without spaces."""
    out: dict[str, None] = {}
    for run in _CJK.findall(text):
        for i in range(len(run) - 1):
            out.setdefault(run[i : i + 2], None)
    for word in _WORD.findall(_CJK.sub(" ", text.lower())):
        if len(word) >= 2:
            out.setdefault(word, None)
        if len(out) >= MAX_TERMS:
            break
    return list(out)[:MAX_TERMS]


# --- rows ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredReview:
    review_id: str
    product_id: str
    category: str
    market: str
    created_ms: int
    text: str
    rating: int
    label: int
    probs: tuple[float, float, float]
    stars: float
    lang: str
    lang_confidence: float
    truncated: bool
    model_version: str
    ingested_ms: int
    terms: str = ""

    def row(self) -> tuple[object, ...]:
        """The row as plain Python values (numpy scalars do not bind on PostgreSQL)."""
        terms = self.terms or " ".join(terms_of(self.text))
        return (
            str(self.review_id), str(self.product_id), str(self.category), str(self.market),
            int(self.created_ms), str(self.text), int(self.rating), int(self.label),
            *(float(p) for p in self.probs), float(self.stars), str(self.lang), float(self.lang_confidence),
            int(bool(self.truncated)), terms, str(self.model_version), int(self.ingested_ms),
        )  # fmt: skip

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> StoredReview:
        """A review from a row in ``COLUMNS`` order."""
        (rid, product, category, market, created, text, rating, label, pn, pu, pp, stars, lang, conf,
         truncated, terms, version, ingested) = row  # fmt: skip
        return cls(
            str(rid), str(product), str(category), str(market), int(created), str(text), int(rating),
            int(label), (float(pn), float(pu), float(pp)), float(stars), str(lang), float(conf),
            bool(truncated), str(version), int(ingested), str(terms),
        )  # fmt: skip


@dataclass
class Counts:
    negative: int = 0
    neutral: int = 0
    positive: int = 0
    stars_sum: float = 0.0
    languages: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.negative + self.neutral + self.positive

    def add(self, label: int, stars: float, lang: str, n: int = 1) -> None:
        if label == 0:
            self.negative += n
        elif label == 1:
            self.neutral += n
        else:
            self.positive += n
        self.stars_sum += stars
        self.languages[lang] += n

    @property
    def negative_share(self) -> float:
        return self.negative / self.total if self.total else 0.0

    @property
    def average_stars(self) -> float:
        return self.stars_sum / self.total if self.total else 0.0


@dataclass(frozen=True)
class Theme:
    term: str
    language: str
    score: float  # log-odds ratio of the term in this polarity vs the other
    z: float
    count: int  # sampled reviews of this polarity containing the term


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test (1.0 when undefined)."""
    if n1 == 0 or n2 == 0:
        return 1.0
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (x1 / n1 - x2 / n2) / se
    return math.erfc(abs(z) / math.sqrt(2))


def log_odds_themes(
    docs_a: Sequence[Sequence[str]],
    docs_b: Sequence[Sequence[str]],
    min_count: int,
    top: int,
    prior: float = 50.0,
    min_z: float = 1.0,
) -> list[tuple[str, float, float, int]]:
    """Terms over-represented in ``docs_a`` vs ``docs_b``: weighted log-odds ratio with an informative
    Dirichlet prior (Monroe, Colaresi & Quinn 2008), ranked by its z-score.
    Terms with z below ``min_z`` (about as common in both) are left out.
    Returns (term, log-odds ratio, z, count in a)."""
    ca: Counter[str] = Counter(t for d in docs_a for t in d)
    cb: Counter[str] = Counter(t for d in docs_b for t in d)
    na, nb = sum(ca.values()), sum(cb.values())
    total = na + nb
    if na == 0 or nb == 0:
        return []
    out = []
    for term, ya in ca.items():
        if ya < min_count:
            continue
        yb = cb.get(term, 0)
        alpha = prior * (ya + yb) / total
        delta = math.log((ya + alpha) / (na + prior - ya - alpha)) - math.log(
            (yb + alpha) / (nb + prior - yb - alpha)
        )
        z = delta / math.sqrt(1 / (ya + alpha) + 1 / (yb + alpha))
        if z >= min_z:
            out.append((term, delta, z, ya))
    out.sort(key=lambda r: (-r[2], r[0]))
    return out[:top]


# --- the store -----------------------------------------------------------------------------------
class ReviewStore:
    """Reviews and their hourly aggregates in ``db`` (a path opens an SQLite file, for tools and tests).

    The schema is applied on first use, so a database that is down at start-up only makes ingestion
    and reports UNAVAILABLE until it answers; scoring does not need it.
    """

    def __init__(self, db: Database | Path | str, synchronous: str = "NORMAL") -> None:
        self._owned = not isinstance(db, Database)
        self.db: Database = (
            db if isinstance(db, Database) else SqliteDatabase(db, name="sentiment", synchronous=synchronous)
        )
        self._ready = False
        self._schema_lock = threading.Lock()
        try:
            self.ensure_schema()
        except StoreUnavailable as exc:
            log.warning("review store unavailable at start; will retry on use", extra={"error": str(exc)})

    @property
    def dialect(self) -> str:
        return self.db.dialect

    def ensure_schema(self) -> None:
        """Apply the migrations once per process (idempotent across replicas: the runtime locks)."""
        if self._ready:
            return
        with self._schema_lock:
            if not self._ready:
                self.db.migrate("sentiment", MIGRATIONS)
                self._ready = True

    def close(self) -> None:
        """Close the database if this store opened it (the runtime closes the ones it handed out)."""
        if self._owned:
            self.db.close()

    # --- writes ---
    def add(self, reviews: Iterable[StoredReview]) -> tuple[int, int]:
        """Store reviews and fold the newly stored ones into the aggregates, in one transaction.
        Returns (newly stored, already stored)."""
        self.ensure_schema()
        unique: dict[str, StoredReview] = {}
        repeated = 0
        for r in reviews:
            if r.review_id in unique:
                repeated += 1
            else:
                unique[r.review_id] = r
        ordered = sorted(unique.values(), key=lambda r: r.review_id)  # one lock order for every writer
        rows = [r.row() for r in ordered]
        created: set[str] = set()
        with self.db.transaction() as tx:
            for i in range(0, len(rows), INSERT_CHUNK):
                chunk = rows[i : i + INSERT_CHUNK]
                params = [value for row in chunk for value in row]
                created.update(str(r[0]) for r in tx.all(_insert_sql(len(chunk)), params))
            buckets: dict[tuple[str, str, str, int, str], list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
            for r in ordered:
                if r.review_id not in created:
                    continue
                if r.label not in (0, 1, 2):
                    raise ValueError(f"review {r.review_id}: label {r.label} is not 0, 1 or 2")
                hour = r.created_ms // HOUR_MS
                keys = [("p", r.product_id, r.market), ("p", r.product_id, ALL_MARKETS)]
                if r.category:
                    keys += [("c", r.category, r.market), ("c", r.category, ALL_MARKETS)]
                for kind, scope, market in keys:
                    b = buckets[(kind, scope, market, hour, r.lang)]
                    b[r.label] += 1
                    b[3] += r.stars
            tx.executemany(
                _UPSERT,
                [(*k, int(v[0]), int(v[1]), int(v[2]), float(v[3])) for k, v in sorted(buckets.items())],
            )
        return len(created), repeated + len(ordered) - len(created)

    def import_legacy(self, path: Path, batch: int = 1000) -> int:
        """Reviews of a ``reviews.db`` written before the state layer (opened read-only; it may sit on
        the read-only models mount), stored through ``add``: aggregates are rebuilt and ids already
        stored are skipped, so running it twice, or on two replicas, counts nothing twice."""
        con = None
        for options in ("mode=ro", "mode=ro&immutable=1"):  # immutable: no -shm can be made beside it
            try:
                con = sqlite3.connect(f"file:{Path(path).resolve()}?{options}", uri=True)
                cur = con.execute(f"SELECT {', '.join(COLUMNS)} FROM reviews ORDER BY rowid")
                break
            except sqlite3.Error:
                if con is not None:
                    con.close()
                    con = None
        if con is None:
            raise ValueError(f"{path} is not a readable review database")
        imported = 0
        try:
            while rows := cur.fetchmany(batch):
                imported += self.add([StoredReview.from_row(r) for r in rows])[0]
        finally:
            con.close()
        return imported

    # --- reads ---
    def count(self) -> int:
        self.ensure_schema()
        return int(self.db.scalar("SELECT COUNT(*) FROM sentiment_reviews") or 0)

    def get(self, review_id: str) -> dict[str, object] | None:
        self.ensure_schema()
        row = self.db.one(
            f"SELECT {', '.join(COLUMNS)} FROM sentiment_reviews WHERE review_id = ?", (review_id,)
        )
        return None if row is None else dict(zip(COLUMNS, row, strict=True))

    def window(self, kind: str, scope: str, market: str, start_ms: int, end_ms: int) -> Counts:
        """Counts for reviews created in [start_ms, end_ms): whole hours from the aggregates, the partial
        hours at the edges from the reviews themselves."""
        counts = Counts()
        if end_ms <= start_ms:
            return counts
        self.ensure_schema()
        h0 = -(-start_ms // HOUR_MS)  # first whole hour
        h1 = end_ms // HOUR_MS  # end of the last whole hour
        with self.db.read() as tx:
            if h0 < h1:
                rows = tx.all(
                    "SELECT lang, SUM(negative), SUM(neutral), SUM(positive), SUM(stars_sum) "
                    "FROM sentiment_agg WHERE kind = ? AND scope = ? AND market = ? "
                    "AND hour >= ? AND hour < ? GROUP BY lang",
                    (kind, scope, market, h0, h1),
                )
                for lang, neg, neu, pos, stars in rows:  # PostgreSQL sums BIGINT as NUMERIC: Decimal
                    neg, neu, pos = int(neg), int(neu), int(pos)
                    counts.negative += neg
                    counts.neutral += neu
                    counts.positive += pos
                    counts.stars_sum += float(stars)
                    counts.languages[str(lang)] += neg + neu + pos
                edges = [(start_ms, h0 * HOUR_MS), (h1 * HOUR_MS, end_ms)]
            else:
                edges = [(start_ms, end_ms)]
            for a, b in edges:
                if b > a:
                    for label, stars, lang in self._raw(tx, kind, scope, market, a, b, "label, stars, lang"):
                        counts.add(int(label), float(stars), str(lang))  # type: ignore[arg-type]
        return counts

    def _source(self, kind: str, market: str) -> tuple[str, str]:
        """(scope column, table): on SQLite with the index that serves it, so a rare market inside a
        big category does not walk every review of the category. PostgreSQL's planner picks its own."""
        column = "product_id" if kind == "p" else "category"
        if self.db.dialect != "sqlite":
            return column, "sentiment_reviews"
        index = f"sentiment_reviews_{'product' if kind == 'p' else 'category'}{'_market' if market else ''}"
        return column, f"sentiment_reviews INDEXED BY {index}"

    def _raw(
        self, tx: Any, kind: str, scope: str, market: str, a: int, b: int, columns: str
    ) -> list[tuple[object, ...]]:
        column, source = self._source(kind, market)
        sql = (
            f"SELECT {columns} FROM {source} WHERE {column} = ? AND label IN (0, 1, 2) "
            "AND created_ms >= ? AND created_ms < ?"
        )
        args: list[object] = [scope, a, b]
        if market:
            sql += " AND market = ?"
            args.append(market)
        return list(tx.all(sql, args))

    def sample_terms(
        self, kind: str, scope: str, market: str, start_ms: int, end_ms: int, label: int, limit: int
    ) -> list[tuple[str, list[str]]]:
        """(language, terms) of the most recent ``limit`` reviews with ``label`` in the window."""
        self.ensure_schema()
        column, source = self._source(kind, market)
        sql = (
            f"SELECT lang, terms FROM {source} WHERE {column} = ? AND label = ? "
            "AND created_ms >= ? AND created_ms < ?"
        )
        args: list[object] = [scope, label, start_ms, end_ms]
        if market:
            sql += " AND market = ?"
            args.append(market)
        sql += " ORDER BY created_ms DESC LIMIT ?"
        args.append(limit)
        return [(str(lang), str(terms).split()) for lang, terms in self.db.all(sql, args)]

    def themes(
        self,
        kind: str,
        scope: str,
        market: str,
        start_ms: int,
        end_ms: int,
        sample: int = 1000,
        min_count: int = 3,
        min_language_reviews: int = 10,
        top: int = 8,
        max_languages: int = 4,
    ) -> tuple[list[Theme], list[Theme]]:
        """(negative drivers, positive drivers), per language with enough sampled reviews of both kinds."""
        neg = self.sample_terms(kind, scope, market, start_ms, end_ms, 0, sample)
        pos = self.sample_terms(kind, scope, market, start_ms, end_ms, 2, sample)
        by_lang: dict[str, tuple[list[list[str]], list[list[str]]]] = defaultdict(lambda: ([], []))
        for lang, terms in neg:
            by_lang[lang][0].append(terms)
        for lang, terms in pos:
            by_lang[lang][1].append(terms)
        ranked = sorted(by_lang.items(), key=lambda kv: -(len(kv[1][0]) + len(kv[1][1])))
        negative: list[Theme] = []
        positive: list[Theme] = []
        for lang, (n_docs, p_docs) in ranked[:max_languages]:
            if len(n_docs) + len(p_docs) < min_language_reviews or not n_docs or not p_docs:
                continue
            for term, delta, z, c in log_odds_themes(n_docs, p_docs, min_count, top):
                negative.append(Theme(term, lang, delta, z, c))
            for term, delta, z, c in log_odds_themes(p_docs, n_docs, min_count, top):
                positive.append(Theme(term, lang, delta, z, c))
        return negative, positive
