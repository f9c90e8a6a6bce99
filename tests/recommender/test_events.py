"""The event store: append-only, durable commits, erasure, items."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.recommender.data import user_hash
from services.recommender.events import Event, EventStore


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
    assert again._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert again._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
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
    raw = b"".join(bytes(str(row), "utf8") for row in store._conn.execute("SELECT * FROM forgotten"))
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
