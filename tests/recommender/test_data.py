"""Loading any interactions file, cleaning, the packaged MovieLens-100K and the synthetic shop."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from services.recommender import data as D
from services.recommender.events import Event, EventStore


def test_reads_csv_tsv_recbole_headers_parquet_and_aliases(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("userId,movieId,rating,timestamp\n1,10,4,100\n2,11,5,200\n")
    (tmp_path / "b.inter").write_text("user_id:token\titem_id:token\trating:float\n1\t10\t3\n")
    pd.DataFrame({"customer_id": ["x"], "sku": ["s1"], "event_time": ["2024-01-01T00:00:00Z"]}).to_parquet(
        tmp_path / "c.parquet"
    )
    a = D.load_interactions(tmp_path / "a.csv")
    assert list(a.columns[:4]) == ["user_id", "item_id", "rating", "timestamp"]
    b = D.load_interactions(tmp_path / "b.inter")
    assert b.loc[0, "item_id"] == "10"
    c, _ = D.clean_interactions(D.load_interactions(tmp_path / "c.parquet"))
    assert c.loc[0, "timestamp"] == pd.Timestamp("2024-01-01", tz="UTC").timestamp()
    (tmp_path / "bad.csv").write_text("who,what\n1,2\n")
    with pytest.raises(D.DataError, match="missing column"):
        D.load_interactions(tmp_path / "bad.csv")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(D.DataError, match="unsupported"):
        D.read_table(tmp_path / "x.json")


def test_cleaning_drops_bad_rows_merges_duplicates_and_erased_users() -> None:
    raw = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "b", "", None, "c", "c", "gone", "d"],
            "item_id": ["x", "x", "y", "x", "x", "x", "z", "w", "x", "x"],
            "rating": ["4", "5", "nan", "-1", "3", "3", "", "2", "5", "1"],
            "timestamp": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            "type": ["view", "purchase", "view", "view", "view", "view", "cart", "view", "view", "view"],
        }
    )
    clean, report = D.clean_interactions(raw, forgotten={D.user_hash("gone")})
    assert report.dropped_missing_ids == 2
    assert report.dropped_bad_rating == 2  # NaN and negative; an empty rating is just absent
    assert report.dropped_forgotten == 1
    assert report.duplicates_merged == 1
    a_x = clean[(clean.user_id == "a") & (clean.item_id == "x")].iloc[0]
    assert a_x.weight == pytest.approx(D.EVENT_WEIGHTS["view"] + D.EVENT_WEIGHTS["purchase"])
    assert a_x.rating == 5 and a_x.timestamp == 2  # latest wins
    assert set(clean.user_id) == {"a", "c", "d"}
    sparse, rep2 = D.clean_interactions(raw, min_user_interactions=2)
    # 'a' keeps only x (its y had a NaN rating); 'a', 'gone' and 'd' have one item each
    assert set(sparse.user_id) == {"c"} and rep2.dropped_sparse_users == 3


def test_event_store_is_a_readable_interactions_file(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.sqlite3")
    store.append([Event("u1", "i1", 3, None, 100.0, "DE"), Event("u1", "i2", 4, 4.0, 101.0, "")])
    frame, last = store.interactions_frame()
    store.close()
    assert last == 2
    clean, _ = D.clean_interactions(frame)
    assert clean.set_index("item_id")["weight"].to_dict() == {"i1": D.EVENT_WEIGHTS["purchase"], "i2": 1.0}
    with sqlite3.connect(tmp_path / "other.db") as conn:
        conn.execute("CREATE TABLE t (a)")
    with pytest.raises(D.DataError, match="event store"):
        D.load_interactions(tmp_path / "other.db")


def test_movielens_100k_is_read_from_the_recbole_package_without_importing_it() -> None:
    import sys

    inter, items = D.movielens_100k()
    assert "recbole" not in sys.modules
    assert len(inter) == 100_000 and inter.user_id.nunique() == 943 and inter.item_id.nunique() == 1682
    assert len(items) == 1682 and items.loc[0, "title"] == "Toy Story (1995)"
    assert items.loc[0, "category"] == "Animation"


def test_synthetic_catalogue_is_seeded_multilingual_and_cross_border() -> None:
    a = D.synthetic_catalogue(n_items=300, n_users=200, seed=11)
    b = D.synthetic_catalogue(n_items=300, n_users=200, seed=11)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    assert set(a.items.language) >= {"de", "fr", "en", "ja"}
    assert a.items.title.str.contains("Laufschuhe|Regenjacke|Kochmesser|Kaffeebohnen").any()
    assert set(a.items.currency) >= {"EUR", "USD", "JPY"}
    assert set(a.users.market) <= set(D.MARKETS) and len(set(a.users.market)) >= 6
    assert (a.items.markets == "").any() and a.items.markets.str.contains(r"\|").any()
    # purchases follow tastes: a user's items are closer to their latent taste than random items
    users = a.users.set_index("user_id").index
    items = a.items.set_index("item_id").index
    u = users.get_indexer(a.interactions.user_id)
    i = items.get_indexer(a.interactions.item_id)
    affinity = np.einsum("nd,nd->n", a.user_latent[u], a.item_latent[i]).mean()
    random_affinity = (a.user_latent[u] @ a.item_latent.mean(0)).mean()
    assert affinity > random_affinity + 1.0


def test_encoding_builds_the_matrix_with_cold_catalogue_items() -> None:
    df = pd.DataFrame({"user_id": ["a", "b", "a"], "item_id": ["x", "y", "y"], "weight": [1.0, 2.0, 3.0]})
    enc = D.Encoding.fit(df, items=["x", "y", "cold"])
    X = enc.matrix(df)
    assert X.shape == (2, 3)
    assert X.toarray().tolist() == [[1.0, 3.0, 0.0], [0.0, 2.0, 0.0]]
    assert enc.matrix(df, binary=True).sum() == 3


def _messy_file(path: Path) -> dict[str, int]:
    """A CSV with known faults (string ids): 400 distinct (user, item) rows of 40 users, 50 exact
    duplicates of rows of the first 10 users, 7 rows without an id, 6 bad ratings, 3 rows with an empty
    rating (kept: no rating), 2 users with one item each. Returns the counts the report must give."""
    rng = np.random.default_rng(5)
    rows = [
        (f"user {u:03d}", f"SKU-{i:03d}/é", str(rng.integers(1, 6)), str(1_700_000_000 + u * 100 + i))
        for u in range(40)
        for i in rng.choice(60, size=10, replace=False)
    ]
    first_ten = [r for r in rows if int(r[0][5:]) < 10]
    duplicates = [first_ten[j] for j in rng.choice(len(first_ten), size=50, replace=True)]
    missing = [("", "SKU-900", "3", "1"), ("user 001", "", "3", "1"), ("  ", "SKU-901", "4", "2")]
    missing += [
        ("user 002", " ", "4", "2"),
        ("", "", "5", "3"),
        ("user 003", "", "", "4"),
        ("", "x", "", "5"),
    ]
    bad = [
        (f"user {u:03d}", f"SKU-{800 + u}", r, "9")
        for u, r in enumerate(["x", "-1", "nan", "inf", "-0.5", "?"])
    ]
    no_rating = [(f"user {u:03d}", f"SKU-{700 + u}", "", "9") for u in range(3)]
    sparse = [("lonely 1", "SKU-001/é", "5", "9"), ("lonely 2", "SKU-002/é", "4", "9")]
    table = pd.DataFrame(
        rows + duplicates + missing + bad + no_rating + sparse,
        columns=["user_id", "item_id", "rating", "timestamp"],
    )
    table.sample(frac=1.0, random_state=1).to_csv(path, index=False)
    return {
        "rows_in": len(table),
        "rows_out": 400 + 3,
        "dropped_missing_ids": 7,
        "dropped_bad_rating": 6,
        "dropped_forgotten": 0,
        "dropped_sparse_users": 2,
        "duplicates_merged": 50,
        "users": 40,
    }


def _adds_up(report: D.CleanReport) -> bool:
    r = report
    removed = r.dropped_missing_ids + r.dropped_bad_rating + r.dropped_forgotten + r.dropped_sparse_users
    return r.rows_in == r.rows_out + removed + r.duplicates_merged


def test_the_cleaning_report_counts_what_the_first_pass_removed_and_merged(tmp_path: Path) -> None:
    """prepare() cleans each input, then all of them together: the report is the sum over both
    passes, not the second pass's (which has nothing left to clean)."""
    from services.recommender import train

    path = tmp_path / "messy.csv"
    expected = _messy_file(path)
    report = train.prepare(path, min_user_interactions=2).report
    assert {k: v for k, v in report.to_dict().items() if k != "items"} == expected
    assert _adds_up(report)

    # with an event store: its duplicates and those across the file and the store are merged too,
    # and an erased user's rows in the file are dropped
    store = EventStore(tmp_path / "events.sqlite3")
    store.append([Event("user 000", "SKU-700", 3, None, 1e9)])  # the same pair as a file row
    store.append([Event("newbie", f"SKU-{i:03d}/é", 1, None, 1e9 + i) for i in (1, 2, 2, 3)])  # one twice
    store.forget("user 039")
    store.close()
    both = train.prepare(path, events=tmp_path / "events.sqlite3", min_user_interactions=2).report
    assert both.rows_in == expected["rows_in"] + 5
    assert both.dropped_forgotten == 10  # user 039's ten rows
    assert both.duplicates_merged == 50 + 1 + 1
    assert both.dropped_missing_ids == 7 and both.dropped_bad_rating == 6 and both.dropped_sparse_users == 2
    assert both.rows_out == 403 - 10 + 3 and both.users == 40 - 1 + 1
    assert _adds_up(both)


def test_reading_errors_are_data_errors_naming_the_file(tmp_path: Path) -> None:
    """Every way a file can be unreadable is a DataError whose one-line message starts with the path."""
    cases = {
        "empty.csv": b"",
        "bad.parquet": b"not parquet",
        "binary.csv": b"user_id,item_id\n\xff\xfe\x00\x01,\xc3\x28\n",
        "ragged.csv": b'user_id,item_id\n"u1,i1\n',
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(D.DataError) as caught:
            D.load_interactions(tmp_path / name)
        message = str(caught.value)
        assert message.startswith(f"{tmp_path / name}: ") and "\n" not in message, message
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(D.DataError, match="is a directory"):
        D.load_interactions(tmp_path / "folder.csv")
    # some non-numeric ratings are dropped and counted; a rating column without any number is refused
    some, report = D.clean_interactions(
        pd.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["x", "y", "x"], "rating": ["4", "good", "5"]})
    )
    assert len(some) == 2 and report.dropped_bad_rating == 1
    with pytest.raises(D.DataError, match=r"^f.csv: column 'rating' is not numeric \(e.g. 'good'\)$"):
        D.clean_interactions(
            pd.DataFrame({"user_id": ["a", "b"], "item_id": ["x", "x"], "rating": ["good", "bad"]}),
            source="f.csv",
        )
