"""The review store's running aggregates and the report maths, against hand-computed values, on both
backends of the state layer (an SQLite file and a real PostgreSQL)."""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.runtime.state import PostgresDatabase
from services.sentiment.store import (
    COLUMNS,
    HOUR_MS,
    ReviewStore,
    StoredReview,
    log_odds_themes,
    terms_of,
    two_proportion_test,
)
from tests.stores import PG_PASSWORD

T0 = 1_750_000_000_000 // HOUR_MS * HOUR_MS  # an hour boundary


def review(
    i: int,
    label: int,
    minutes: float,
    market: str = "DE",
    product: str = "p1",
    category: str = "dresses",
    stars: float | None = None,
    lang: str = "en",
    text: str = "",
) -> StoredReview:
    probs = [0.1, 0.1, 0.1]
    probs[label] = 0.8
    return StoredReview(
        review_id=f"r{i}",
        product_id=product,
        category=category,
        market=market,
        created_ms=T0 + int(minutes * 60_000),
        text=text or f"review {i}",
        rating=0,
        label=label,
        probs=(probs[0], probs[1], probs[2]),
        stars=stars if stars is not None else (1.0, 3.0, 5.0)[label],
        lang=lang,
        lang_confidence=0.9,
        truncated=False,
        model_version="v1",
        ingested_ms=T0,
    )


def pg_store(url: str) -> ReviewStore:
    return ReviewStore(PostgresDatabase(url, PG_PASSWORD, name="sentiment", timeout_s=5))


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReviewStore]:
    if request.param == "sqlite":
        s = ReviewStore(tmp_path / "state" / "sentiment.sqlite3")
    else:
        s = pg_store(request.getfixturevalue("pg_url"))
    yield s
    s.db.close()


def test_window_counts_whole_hours_from_aggregates_and_edges_exactly(store: ReviewStore) -> None:
    rows = [
        review(1, 0, -30),  # before the window
        review(2, 0, 10),  # partial first hour (window starts at +5 min)
        review(3, 2, 70, market="FR"),  # whole hour 1
        review(4, 1, 130, lang="de"),  # whole hour 2
        review(5, 2, 150, product="p2"),  # other product, same category
        review(6, 2, 185),  # partial last hour (window ends at +190 min)
        review(7, 0, 195),  # after the window
    ]
    assert store.add(rows) == (7, 0)
    start, end = T0 + 5 * 60_000, T0 + 190 * 60_000

    p1_all = store.window("p", "p1", "", start, end)
    assert (p1_all.negative, p1_all.neutral, p1_all.positive) == (1, 1, 2)  # r2, r4, r3 + r6
    assert p1_all.stars_sum == 1 + 3 + 5 + 5
    assert p1_all.average_stars == pytest.approx(14 / 4)
    assert dict(p1_all.languages) == {"en": 3, "de": 1}

    p1_de = store.window("p", "p1", "DE", start, end)
    assert (p1_de.negative, p1_de.neutral, p1_de.positive) == (1, 1, 1)

    category = store.window("c", "dresses", "", start, end)
    assert category.total == 5 and category.positive == 3

    # a window inside one hour is counted from the reviews alone
    inner = store.window("p", "p1", "", T0 + 60 * 60_000, T0 + 75 * 60_000)
    assert (inner.total, inner.positive) == (1, 1)
    # the previous window of the same length
    before = store.window("p", "p1", "", start - (end - start), start)
    assert (before.total, before.negative) == (1, 1)


def test_same_review_id_is_stored_and_counted_once(store: ReviewStore) -> None:
    assert store.add([review(1, 0, 10)]) == (1, 0)
    assert store.add([review(1, 0, 10), review(2, 2, 20)]) == (1, 1)
    c = store.window("p", "p1", "", T0, T0 + HOUR_MS)
    assert (c.total, c.negative, c.positive) == (2, 1, 1)
    assert store.count() == 2


def test_failed_batch_leaves_no_partial_aggregates(store: ReviewStore) -> None:
    bad = review(2, 2, 20)
    object.__setattr__(bad, "label", 7)  # aggregates have no column for it
    with pytest.raises(ValueError, match="label 7"):
        store.add([review(1, 0, 10), bad])
    assert store.count() == 0
    assert store.window("p", "p1", "", T0, T0 + HOUR_MS).total == 0


def test_two_proportion_test_matches_hand_computation() -> None:
    # 30/100 vs 15/100: pooled 0.225, se = sqrt(0.225 * 0.775 * 0.02) = 0.059055, z = 2.5400
    assert two_proportion_test(30, 100, 15, 100) == pytest.approx(math.erfc(2.5400 / math.sqrt(2)), abs=2e-4)
    assert two_proportion_test(30, 100, 15, 100) == pytest.approx(0.01108, abs=1e-4)
    assert two_proportion_test(5, 10, 5, 10) == 1.0
    assert two_proportion_test(0, 0, 3, 10) == 1.0


def test_terms_cover_spaced_and_unspaced_scripts() -> None:
    assert terms_of("The zipper BROKE, the zipper!") == ["the", "zipper", "broke"]
    assert terms_of("质量太差") == ["质量", "量太", "太差"]
    assert "naht" in terms_of("Die Naht ist gerissen")


def test_log_odds_ranks_the_term_that_separates_the_classes() -> None:
    negative = [["zipper", "broke", "dress"]] * 8 + [["dress", "small"]] * 4
    positive = [["love", "dress"]] * 10 + [["dress", "soft"]] * 5
    top = log_odds_themes(negative, positive, min_count=3, top=3)
    assert [t[0] for t in top[:2]] == ["broke", "zipper"] or [t[0] for t in top[:2]] == ["zipper", "broke"]
    assert "dress" not in [t[0] for t in top]  # in both classes alike
    assert all(delta > 0 for _, delta, _, _ in top)


def test_themes_per_language_from_the_window(store: ReviewStore) -> None:
    rows = []
    for i in range(12):
        rows.append(review(i, 0, i, text="the zipper broke" + (" after one wash" if i % 2 else "")))
        rows.append(review(100 + i, 2, i, text="love the soft fabric" + (" and the fit" if i % 3 else "")))
    for i in range(4):  # too few German reviews for their own themes
        rows.append(review(200 + i, 0, i, lang="de", text="Reißverschluss kaputt"))
    store.add(rows)
    negative, positive = store.themes("p", "p1", "", T0, T0 + HOUR_MS, min_count=3)
    assert {t.language for t in negative + positive} == {"en"}
    assert {t.term for t in negative[:2]} == {"zipper", "broke"}
    assert {t.term for t in negative[2:5]} == {"after", "one", "wash"}
    assert {t.term for t in positive[:3]} == {"love", "soft", "fabric"}
    assert "the" not in {t.term for t in negative + positive}
    assert all(t.count == 12 for t in negative if t.term == "zipper")


def test_tables_are_prefixed_and_the_schema_applies_once(store: ReviewStore) -> None:
    assert store.db.schema_version("sentiment") == 1
    assert ReviewStore(store.db).db.schema_version("sentiment") == 1  # a second replica: nothing new
    store.add([review(1, 0, 10)])
    assert store.db.scalar("SELECT COUNT(*) FROM sentiment_reviews") == 1
    assert store.get("r1")["lang"] == "en"  # type: ignore[index]


def test_legacy_review_file_is_imported_once(store: ReviewStore, tmp_path: Path) -> None:
    legacy = tmp_path / "models" / "sentiment-data" / "reviews.db"
    legacy.parent.mkdir(parents=True)
    con = sqlite3.connect(legacy)
    con.execute(f"CREATE TABLE reviews ({', '.join(COLUMNS)})")
    rows = [review(i, i % 3, 10 + i).row() for i in range(5)]
    con.executemany(f"INSERT INTO reviews VALUES ({', '.join('?' * len(COLUMNS))})", rows)
    con.commit()
    con.close()
    legacy.chmod(0o444)
    assert store.import_legacy(legacy) == 5
    assert store.import_legacy(legacy) == 0  # again (or from another replica): nothing counted twice
    c = store.window("p", "p1", "", T0, T0 + HOUR_MS)
    assert (c.negative, c.neutral, c.positive) == (2, 2, 1)


def test_concurrent_writers_on_postgres_never_lose_or_double_count(pg_url: str) -> None:
    """Two replicas' stores (own pools) ingest overlapping batches into the same hourly buckets at once:
    every review id is counted exactly once and no increment is lost."""
    stores = [pg_store(pg_url), pg_store(pg_url)]
    ids = list(range(240))
    labels = {i: i % 3 for i in ids}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def writer(k: int) -> None:
        store = stores[k % 2]
        try:
            barrier.wait()
            # every writer sends every id (in its own order and batches): each id is a retry elsewhere
            order = ids[k * 60 :] + ids[: k * 60]
            for start in range(0, len(order), 8):
                store.add(
                    [
                        review(i, labels[i], i % 50, market=("DE", "FR")[i % 2])
                        for i in order[start : start + 8]
                    ]
                )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for store in stores:
        assert store.count() == len(ids)
        everything = store.window("p", "p1", "", T0, T0 + HOUR_MS)
        assert (everything.negative, everything.neutral, everything.positive) == (80, 80, 80)
        assert everything.stars_sum == pytest.approx(80 * 1 + 80 * 3 + 80 * 5)
        de = store.window("c", "dresses", "DE", T0, T0 + HOUR_MS)
        assert de.total == 120 and de.negative == sum(1 for i in ids if i % 2 == 0 and labels[i] == 0)
    for store in stores:
        store.db.close()
