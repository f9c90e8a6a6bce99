"""Durable review store with running aggregates, and the market report computed from them.

Why this shape: a report over a million reviews must not rescan them. Every ingested review adds to
hourly buckets ``(product or category, market or all, hour, language) -> counts, sum of stars`` in the
same transaction that stores it, so a 30-day report reads at most 720 buckets per language. Windows
need not fall on hour boundaries: the partial hours at either edge are counted from the reviews
themselves through an index, so results are exact. Driver terms come from a bounded sample (the most
recent negative and positive reviews of the window, 1,000 of each by default), not from every review.

SQLite in WAL mode with ``synchronous=NORMAL``: a committed batch survives a killed process (``FULL``
would also survive power loss, at an fsync per batch). A review id is stored once: re-sending it
(a client retry) is accepted and not counted twice.
"""

from __future__ import annotations

import math
import re
import sqlite3
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HOUR_MS = 3_600_000
ALL_MARKETS = ""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
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
CREATE INDEX IF NOT EXISTS reviews_product ON reviews (product_id, label, created_ms);
CREATE INDEX IF NOT EXISTS reviews_category ON reviews (category, label, created_ms);
CREATE INDEX IF NOT EXISTS reviews_product_market ON reviews (product_id, market, label, created_ms);
CREATE INDEX IF NOT EXISTS reviews_category_market ON reviews (category, market, label, created_ms);
CREATE TABLE IF NOT EXISTS agg (
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

_UPSERT = """
INSERT INTO agg (kind, scope, market, hour, lang, negative, neutral, positive, stars_sum)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (kind, scope, market, hour, lang) DO UPDATE SET
    negative = negative + excluded.negative,
    neutral = neutral + excluded.neutral,
    positive = positive + excluded.positive,
    stars_sum = stars_sum + excluded.stars_sum
"""

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
        terms = self.terms or " ".join(terms_of(self.text))
        return (
            self.review_id, self.product_id, self.category, self.market, self.created_ms, self.text,
            self.rating, self.label, *self.probs, self.stars, self.lang, self.lang_confidence,
            int(self.truncated), terms, self.model_version, self.ingested_ms,
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
    def __init__(self, path: Path | str, synchronous: str = "NORMAL") -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writes ---
    def add(self, reviews: Iterable[StoredReview]) -> tuple[int, int]:
        """Store reviews and fold them into the aggregates in one transaction.
        Returns (newly stored, already stored)."""
        buckets: dict[tuple[str, str, str, int, str], list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
        new = dup = 0
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for r in reviews:
                    cur.execute("INSERT OR IGNORE INTO reviews VALUES (" + ",".join("?" * 18) + ")", r.row())
                    if cur.rowcount == 0:
                        dup += 1
                        continue
                    new += 1
                    hour = r.created_ms // HOUR_MS
                    keys = [("p", r.product_id, r.market), ("p", r.product_id, ALL_MARKETS)]
                    if r.category:
                        keys += [("c", r.category, r.market), ("c", r.category, ALL_MARKETS)]
                    for kind, scope, market in keys:
                        b = buckets[(kind, scope, market, hour, r.lang)]
                        b[r.label] += 1
                        b[3] += r.stars
                cur.executemany(
                    _UPSERT, [(*k, int(v[0]), int(v[1]), int(v[2]), v[3]) for k, v in buckets.items()]
                )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return new, dup

    # --- reads ---
    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM reviews").fetchone()[0])

    def get(self, review_id: str) -> dict[str, object] | None:
        with self._lock:
            cur = self._db.execute("SELECT * FROM reviews WHERE review_id = ?", (review_id,))
            row = cur.fetchone()
            return None if row is None else dict(zip([c[0] for c in cur.description], row, strict=True))

    def window(self, kind: str, scope: str, market: str, start_ms: int, end_ms: int) -> Counts:
        """Counts for reviews created in [start_ms, end_ms): whole hours from the aggregates, the partial
        hours at the edges from the reviews themselves."""
        counts = Counts()
        if end_ms <= start_ms:
            return counts
        h0 = -(-start_ms // HOUR_MS)  # first whole hour
        h1 = end_ms // HOUR_MS  # end of the last whole hour
        with self._lock:
            if h0 < h1:
                rows = self._db.execute(
                    "SELECT lang, SUM(negative), SUM(neutral), SUM(positive), SUM(stars_sum) FROM agg "
                    "WHERE kind = ? AND scope = ? AND market = ? AND hour >= ? AND hour < ? GROUP BY lang",
                    (kind, scope, market, h0, h1),
                ).fetchall()
                for lang, neg, neu, pos, stars in rows:
                    counts.negative += neg
                    counts.neutral += neu
                    counts.positive += pos
                    counts.stars_sum += stars
                    counts.languages[lang] += neg + neu + pos
                edges = [(start_ms, h0 * HOUR_MS), (h1 * HOUR_MS, end_ms)]
            else:
                edges = [(start_ms, end_ms)]
            for a, b in edges:
                if b > a:
                    for label, stars, lang in self._raw(kind, scope, market, a, b, "label, stars, lang"):
                        counts.add(label, stars, lang)
        return counts

    @staticmethod
    def _source(kind: str, market: str) -> tuple[str, str]:
        """(scope column, table with the index that serves it): with a market, the index that has it,
        so a rare market inside a big category does not walk every review of the category."""
        column = "product_id" if kind == "p" else "category"
        index = f"reviews_{'product' if kind == 'p' else 'category'}{'_market' if market else ''}"
        return column, f"reviews INDEXED BY {index}"

    def _raw(
        self, kind: str, scope: str, market: str, a: int, b: int, columns: str
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
        return self._db.execute(sql, args).fetchall()

    def sample_terms(
        self, kind: str, scope: str, market: str, start_ms: int, end_ms: int, label: int, limit: int
    ) -> list[tuple[str, list[str]]]:
        """(language, terms) of the most recent ``limit`` reviews with ``label`` in the window."""
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
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [(lang, terms.split()) for lang, terms in rows]

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
