"""The catalogue repository on both backends (embedded SQLite and real PostgreSQL): the change log,
its notifications, embeddings per model version, pruning, and importing a pre-state-layer file."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.runtime.state import PostgresDatabase, SqliteDatabase
from services.vision import defaults
from services.vision.catalogue import CHANNEL, Catalogue, NewProduct
from services.vision.config import VisionSettings
from tests.stores import PG_PASSWORD
from tests.support import local_settings

V1, V2, V3 = "20260101T000000000000Z", "20260202T000000000000Z", "20260303T000000000000Z"


@pytest.fixture(params=["sqlite", "postgres"])
def catalogue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalogue]:
    if request.param == "sqlite":
        db = SqliteDatabase(tmp_path / "vision.sqlite3", name="vision")
    else:
        db = PostgresDatabase(request.getfixturevalue("pg_url"), PG_PASSWORD, name="vision")
    try:
        yield Catalogue(db)
    finally:
        db.close()


def product(pid: str, seed: int, dim: int = 8) -> NewProduct:
    rng = np.random.default_rng(seed)
    return NewProduct(pid, "cat", "DE", f"sha-{pid}", f"png-{pid}".encode(), rng.random(dim), rng.random(4))


def test_change_log_order_and_notifications(catalogue: Catalogue) -> None:
    heard: list[str | None] = []
    got, listening = threading.Event(), threading.Event()

    def listener(payload: str | None) -> None:
        heard.append(payload)
        if payload is None:  # connected (PostgreSQL: LISTEN is in place) or the embedded backend
            listening.set()
        else:
            got.set()

    catalogue.db.listen(CHANNEL, listener)
    if catalogue.db.dialect == "postgres":
        assert listening.wait(10)  # a NOTIFY sent before LISTEN reaches nobody (the catch-up covers it)
    rows = catalogue.upsert([product("a", 1), product("b", 2)], V1)
    assert got.wait(10)
    assert str(catalogue.head()) in heard  # the payload is the head after the commit
    replaced = catalogue.upsert([product("a", 3)], V1)  # a new row id: remove + add
    removed, missing = catalogue.remove(["b", "nope"])
    assert (removed, missing) == (["b"], ["nope"])
    changes = catalogue.changes_since(0)
    assert [(c.row_id, c.op) for c in changes] == [
        (rows[0], "add"),
        (rows[1], "add"),
        (rows[0], "remove"),
        (replaced[0], "add"),
        (rows[1], "remove"),
    ]
    assert [c.seq for c in changes] == sorted(c.seq for c in changes)
    assert catalogue.changes_since(changes[2].seq) == changes[3:]
    assert catalogue.token_at(changes[1].seq) == changes[1].token != ""
    head, products = catalogue.state()
    assert head == changes[-1].seq and [p.product_id for p in products] == ["a"]
    # The replaced product's embedding went with its old row; the new row has its own.
    pairs = catalogue.embeddings_and_duplicates(V1, [rows[0], replaced[0]], 8, 4)
    assert list(pairs) == [replaced[0]]
    vec, dup = pairs[replaced[0]]
    assert np.allclose(vec, product("a", 3).vector) and dup.dtype == np.float32
    assert [bytes(b) for _, b in catalogue.images(replaced)] == [b"png-a"]


def test_catalogue_id_is_stable_across_opens(catalogue: Catalogue) -> None:
    assert Catalogue(catalogue.db).id == catalogue.id


def test_prune_keeps_versions_newer_than_the_known_ones(catalogue: Catalogue) -> None:
    """A replica whose model store does not show a newer version yet must not delete its embeddings."""
    rows = catalogue.upsert([product("a", 1)], V1)
    vec, dup = np.ones(8), np.ones(4)
    catalogue.put_embeddings(V2, [(rows[0], vec, dup)])
    catalogue.put_embeddings(V3, [(rows[0], vec, dup), (999_999, vec, dup)])  # a removed row is skipped
    assert catalogue.prune_embeddings({V2}) == 1  # V1 went; V3 is newer than anything known here
    assert list(catalogue.embeddings(V1, rows, 8)) == []
    assert list(catalogue.embeddings(V2, rows, 8)) == rows
    assert list(catalogue.embeddings(V3, [*rows, 999_999], 8)) == rows


def test_legacy_catalogue_file_is_imported_once(tmp_path: Path, models_dir: Path) -> None:
    settings = local_settings(VisionSettings, models_dir, service="vision", state_dir=tmp_path / "state")
    legacy = settings.index_cache_dir / defaults.LEGACY_CATALOGUE
    legacy.parent.mkdir(parents=True)
    old = sqlite3.connect(legacy)
    old.executescript(
        "CREATE TABLE products (row_id INTEGER PRIMARY KEY AUTOINCREMENT, product_id TEXT NOT NULL UNIQUE, "
        "category TEXT, market TEXT, sha256 TEXT, image BLOB, added_at REAL);"
        "CREATE TABLE embeddings (row_id INTEGER, model_version TEXT, vec BLOB, dup BLOB, "
        "PRIMARY KEY (row_id, model_version));"
    )
    for i in range(3):
        old.execute(
            "INSERT INTO products VALUES (?, ?, 'c', 'FR', ?, ?, 0)", (i + 5, f"p{i}", f"s{i}", b"img%d" % i)
        )
        vec = np.full(8, i, np.float32).tobytes()
        old.execute(
            "INSERT INTO embeddings VALUES (?, ?, ?, ?)", (i + 5, V1, vec, np.ones(4, np.float16).tobytes())
        )
    old.commit()
    old.close()
    catalogue = defaults.open_catalogue(settings)
    try:
        assert defaults.import_legacy_catalogue(settings, catalogue) == 3
        assert not legacy.exists()
        products = catalogue.products()
        assert [(p.product_id, p.market, p.sha256) for p in products] == [
            (f"p{i}", "FR", f"s{i}") for i in range(3)
        ]
        stored = catalogue.embeddings(V1, [p.row_id for p in products], 8)
        assert [float(stored[p.row_id][0]) for p in products] == [0.0, 1.0, 2.0]
        assert defaults.import_legacy_catalogue(settings, catalogue) == 0
    finally:
        defaults.close_catalogue(catalogue)
    assert (settings.state_dir / "vision.sqlite3").is_file()
