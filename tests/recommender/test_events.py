"""The event store on its embedded backend: append-only, durable commits, erasure, items, the change
feed and the import of a pre-state-layer event file. (PostgreSQL: test_replicas.py.)"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from services.recommender.data import user_hash
from services.recommender.events import Event, EventStore
from tests.recommender.conftest import Shop, settings_for


def test_append_read_reopen_and_sequence(tmp_path: Path) -> None:
    path = tmp_path / "ev.sqlite3"
    store = EventStore(path)
    seqs = store.append([Event("u", "a", 1, None, 10.0, "DE"), Event("u", "b", 4, 5.0, 11.0)])
    assert seqs == [1, 2] and store.last_seq == 2
    assert store.append([]) == []
    store.close()
    again = EventStore(path)
    assert again.last_seq == 2
    assert [(e.item_id, e.rating, e.market) for e in again.events_for_user("u")] == [
        ("a", None, "DE"),
        ("b", 5.0, ""),
    ]
    assert [e.seq for e in again.events_since(1)] == [2]
    assert again.db.scalar("PRAGMA journal_mode") == "wal"
    assert again.db.scalar("PRAGMA synchronous") == 2  # FULL
    again.close()
    with pytest.raises(ValueError):
        EventStore(tmp_path / "x.sqlite3", synchronous="OFF")


def test_forget_deletes_events_and_keeps_only_a_hash(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "ev.sqlite3")
    store.append(
        [
            Event("alice", "a", 1, None, 1.0),
            Event("alice", "b", 1, None, 2.0),
            Event("bob", "a", 1, None, 3.0),
        ]
    )
    assert store.forget("alice") == 2
    assert store.events_for_user("alice") == [] and store.count() == 1
    assert store.is_forgotten("alice") and not store.is_forgotten("bob")
    raw = b"".join(bytes(str(row), "utf8") for row in store.db.all("SELECT * FROM recommender_forgotten"))
    assert b"alice" not in raw and user_hash("alice").encode() in raw
    store.close()
    assert EventStore(tmp_path / "ev.sqlite3").forgotten_hashes() == {user_hash("alice")}


def test_items_are_upserted_with_their_embedding(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "ev.sqlite3")
    store.upsert_items([("n1", {"title": "neu"}, np.ones(4, np.float32)), ("n2", {"title": "x"}, None)])
    store.upsert_items([("n1", {"title": "neuer"}, np.zeros(4, np.float32))])
    items = {i.item_id: i for i in store.items()}
    assert items["n1"].body["title"] == "neuer" and not items["n1"].embedding.any()
    assert items["n2"].embedding is None
    assert store.items_seq == max(i.seq for i in items.values())
    assert [i.item_id for i in store.items(since=items["n2"].seq)] == ["n1"]  # the re-upserted one


def test_writes_notify_followers_with_the_newest_seq_and_positions_pass_deleted_rows(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "ev.sqlite3")
    seen: list[tuple[str, str | None]] = []
    store.follow(lambda channel, payload: seen.append((channel, payload)))
    store.append([Event("u", "a", 1, None, 1.0), Event("u", "b", 1, None, 2.0)])
    store.upsert_items([("n1", {"title": "x"}, None)])
    store.forget("u")
    assert seen == [("recommender_events", "2"), ("recommender_items", "1"), ("recommender_forgotten", "1")]
    # the erasure counts at once; its log position advances only by reading the log
    assert store.is_forgotten("u") and store.forgotten_seq == 0 and store.forgotten_known == 1
    assert store.forgotten_after(0) == ([], 0)
    store.refresh_forgotten()
    assert store.forgotten_after(0) == ([user_hash("u")], 1)
    # erasing again gives the erasure a new seq, so every reader re-applies it
    store.forget("u")
    store.refresh_forgotten()
    assert store.forgotten_after(1) == ([user_hash("u")], 2)
    assert store.events_since(0, limit=1) == [] and store.last_seq == 2


def test_a_pre_state_layer_event_file_is_imported_once(tmp_path: Path) -> None:
    legacy = tmp_path / "events.sqlite3"
    with sqlite3.connect(legacy) as conn:
        conn.executescript(
            """
            CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT, item_id TEXT,
                type INTEGER, rating REAL, occurred REAL, market TEXT, received REAL);
            CREATE TABLE items (seq INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT UNIQUE, body TEXT,
                embedding BLOB, updated REAL);
            CREATE TABLE forgotten (user_hash TEXT PRIMARY KEY, forgotten REAL);
            INSERT INTO events VALUES (1, 'u', 'a', 3, NULL, 10.0, 'DE', 11.0),
                (2, 'v', 'b', 4, 4.5, 12.0, '', 13.0);
            INSERT INTO items VALUES (1, 'n1', '{"title": "neu"}', NULL, 1.0);
            """
        )
        conn.execute("INSERT INTO forgotten VALUES (?, 1.0)", (user_hash("gone"),))
    conn.close()
    store = EventStore(tmp_path / "state" / "recommender.sqlite3")
    assert store.import_legacy(legacy) == 2
    assert not legacy.exists() and (tmp_path / "events.sqlite3.imported").exists()
    assert [(e.user_id, e.type, e.rating, e.market) for e in store.events_since(0)] == [
        ("u", 3, None, "DE"),
        ("v", 4, 4.5, ""),
    ]
    assert [i.item_id for i in store.items()] == ["n1"] and store.is_forgotten("gone")
    assert store.last_seq == 2 and store.items_seq == 1
    assert store.import_legacy(tmp_path / "events.sqlite3.imported") == 0  # the store holds events now
    store.close()


def test_fold_in_on_a_worker_thread_is_safe_while_serving(shop: Shop, tmp_path: Path) -> None:
    """A writer thread records interactions and upserts items and a fold-in thread applies them while
    this thread serves Recommend and SimilarItems: no call fails, and everything is folded in."""
    from services.recommender.bundle import load_bundle
    from services.recommender.engine import Engine
    from services.runtime.model_store import ModelStore

    entry = ModelStore(shop.models_dir, "recommender").newest_valid()
    assert entry is not None
    store = EventStore(tmp_path / "state" / "recommender.sqlite3")
    engine = Engine(load_bundle(entry.path), store, settings_for(shop.models_dir, tmp_path, shop.cache_path))
    items = [str(i) for i in shop.prepared.items.item_id]
    dim = shop.embeddings.shape[1]
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for n in range(60):
                store.upsert_items([(f"LIVE-{n}", {"title": f"neu {n}", "category": "x"}, np.ones(dim))])
                who = f"u{n % 7}"
                store.append([Event(who, items[(n * 5 + j) % len(items)], 1, None, 1.0) for j in range(5)])
                store.append([Event(who, f"LIVE-{n}", 3, None, 2.0)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    def fold() -> None:
        try:
            while not stop.is_set():
                engine.catch_up()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write), threading.Thread(target=fold)]
    for t in threads:
        t.start()
    served = 0
    while not stop.is_set() or served < 50:
        user = f"u{served % 7}"
        results, _ = engine.recommend(user, 5, "", [], [], False, True)
        assert len(results) == 5
        assert engine.similar(items[served % len(items)], 3, "", [], "blended") is not None
        served += 1
    for t in threads:
        t.join(30)
    assert not errors, errors
    engine.catch_up()
    assert engine.applied_seq == store.last_seq == 360 and len(engine.new.ids) == 60
    pairs = {(e.user_id, e.item_id) for e in store.events_since(0)}
    assert sum(len(v) for v in engine.extra.values()) == len(pairs)
    store.close()
