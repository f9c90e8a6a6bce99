"""The product catalogue: the durable source of truth every FAISS index is built from.

A domain repository over the runtime's state layer (``services.runtime.state.Database``): an embedded
SQLite file for one replica, or the shared PostgreSQL for any number of them (tables ``vision_*``).

It keeps each product's original image (so a new model version can re-embed everything), the
embeddings per model version (computed once, by the replica that indexed the product, and read by
every other one), and a change log (``seq``) that every replica's index follows: an index snapshot
taken at change N catches up by replaying changes after N, so a process killed between a commit and
the next snapshot loses nothing. Appends to the log hold one lock until commit, so ``seq`` order is
commit order and a reader tailing ``seq > last`` never skips a change that commits late; each commit
notifies ``vision_catalogue`` with the new head so other replicas sync within milliseconds.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.runtime.state import Database, Migration, SqliteDatabase, Tx

CHANNEL = "vision_catalogue"  # NOTIFY channel; the payload is the head change number after the commit
LOG_LOCK = "vision_changes"

MIGRATIONS = [
    Migration(
        """
        CREATE TABLE vision_products (
            row_id INTEGER PRIMARY KEY AUTOINCREMENT,
            product_id TEXT NOT NULL UNIQUE,
            category TEXT NOT NULL DEFAULT '',
            market TEXT NOT NULL DEFAULT '',
            sha256 TEXT NOT NULL,
            image BLOB NOT NULL,
            added_at REAL NOT NULL
        );
        -- No foreign key: rows are deleted explicitly, and a late re-embedding of a product removed
        -- meanwhile on another replica leaves a harmless orphan instead of failing.
        CREATE TABLE vision_embeddings (
            row_id INTEGER NOT NULL,
            model_version TEXT NOT NULL,
            vec BLOB NOT NULL,
            dup BLOB NOT NULL,
            PRIMARY KEY (row_id, model_version)
        );
        -- The model versions that have embeddings: pruning reads this, not the whole embeddings table.
        CREATE TABLE vision_embedding_versions (model_version TEXT PRIMARY KEY);
        CREATE TABLE vision_changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            row_id INTEGER NOT NULL,
            op TEXT NOT NULL CHECK (op IN ('add', 'remove')),
            token TEXT NOT NULL
        );
        CREATE TABLE vision_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """
    ),
]


class CatalogueError(RuntimeError):
    """The catalogue file is unreadable or corrupt: the service must not serve from it."""


@dataclass(frozen=True)
class Product:
    """Catalogue row without its image."""

    row_id: int
    product_id: str
    category: str
    market: str
    sha256: str


@dataclass(frozen=True)
class NewProduct:
    product_id: str
    category: str
    market: str
    sha256: str
    image: bytes
    # Retrieval embedding and near-duplicate descriptor by the model version given to ``upsert``.
    vector: np.ndarray | None = None
    duplicate: np.ndarray | None = None


@dataclass(frozen=True)
class Change:
    seq: int
    row_id: int
    op: str
    token: str = ""


class Catalogue:
    """The catalogue on ``source``: a runtime ``Database`` (not closed here: the runtime owns it), or a
    path, opened as an embedded SQLite store of its own (tools and tests)."""

    def __init__(self, source: Database | Path | str, synchronous: str = "FULL") -> None:
        self._owned = not isinstance(source, Database)
        try:
            if isinstance(source, Database):
                self.db = source
            else:
                self.db = SqliteDatabase(Path(source), name="vision", synchronous=synchronous)
            self.path = Path(self.db.path) if isinstance(self.db, SqliteDatabase) else None
            self.db.migrate("vision", MIGRATIONS)
            with self.db.transaction() as tx:
                tx.execute(
                    "INSERT INTO vision_meta (key, value) VALUES ('catalogue_id', ?) "
                    "ON CONFLICT (key) DO NOTHING",
                    (secrets.token_hex(16),),
                )
                self.id = str(tx.scalar("SELECT value FROM vision_meta WHERE key = 'catalogue_id'"))
        except sqlite3.DatabaseError as exc:
            raise CatalogueError(f"catalogue {source} is unreadable: {exc}") from None

    def check(self) -> None:
        """Refuse a damaged SQLite file (``PRAGMA quick_check``) rather than serve from it; PostgreSQL
        checks its own pages, so there it only has to answer."""
        if self.db.dialect != "sqlite":
            self.db.check()
            return
        try:
            result = [str(r[0]) for r in self.db.all("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            raise CatalogueError(f"catalogue {self.path} is corrupt: {exc}") from None
        if result != ["ok"]:
            raise CatalogueError(f"catalogue {self.path} is corrupt: {'; '.join(result[:5])}")

    def close(self) -> None:
        if self._owned:
            self.db.close()

    # --- writes ---
    def upsert(self, items: Sequence[NewProduct], model_version: str) -> list[int]:
        """Add or replace products (a replaced product gets a new row id); returns the row ids."""
        now = time.time()
        rows: list[int] = []
        with self.db.transaction() as tx:
            tx.lock(LOG_LOCK)  # before the first read: concurrent upserts of one id serialize here
            head = 0
            for item in items:
                old = tx.scalar("SELECT row_id FROM vision_products WHERE product_id = ?", (item.product_id,))
                if old is not None:
                    head = self._delete(tx, int(old))
                row_id = int(
                    tx.scalar(
                        "INSERT INTO vision_products (product_id, category, market, sha256, image, added_at) "
                        "VALUES (?, ?, ?, ?, ?, ?) RETURNING row_id",
                        (item.product_id, item.category, item.market, item.sha256, item.image, now),
                    )
                )
                if item.vector is not None and item.duplicate is not None:
                    tx.execute(
                        "INSERT INTO vision_embeddings (row_id, model_version, vec, dup) VALUES (?, ?, ?, ?)",
                        (row_id, model_version, _f32(item.vector), _f16(item.duplicate)),
                    )
                head = self._log(tx, row_id, "add")
                rows.append(row_id)
            if rows:
                if any(i.vector is not None for i in items):
                    _note_version(tx, model_version)
                tx.notify(CHANNEL, str(head))
        return rows

    def remove(self, product_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Remove products by id; returns (removed, not found)."""
        removed: list[str] = []
        missing: list[str] = []
        with self.db.transaction() as tx:
            tx.lock(LOG_LOCK)
            head = 0
            for pid in product_ids:
                row = tx.scalar("SELECT row_id FROM vision_products WHERE product_id = ?", (pid,))
                if row is None:
                    missing.append(pid)
                    continue
                head = self._delete(tx, int(row))
                removed.append(pid)
            if removed:
                tx.notify(CHANNEL, str(head))
        return removed, missing

    def _delete(self, tx: Tx, row_id: int) -> int:
        tx.execute("DELETE FROM vision_products WHERE row_id = ?", (row_id,))
        tx.execute("DELETE FROM vision_embeddings WHERE row_id = ?", (row_id,))
        return self._log(tx, row_id, "remove")

    @staticmethod
    def _log(tx: Tx, row_id: int, op: str) -> int:
        return int(
            tx.scalar(
                "INSERT INTO vision_changes (row_id, op, token) VALUES (?, ?, ?) RETURNING seq",
                (row_id, op, _token()),
            )
        )

    def put_embeddings(self, model_version: str, items: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> None:
        """Store embeddings computed later (re-indexing with a new model); rows removed since are skipped."""
        if not items:
            return
        with self.db.transaction() as tx:
            tx.executemany(
                "INSERT INTO vision_embeddings (row_id, model_version, vec, dup) "
                "SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM vision_products WHERE row_id = ?) "
                "ON CONFLICT (row_id, model_version) DO UPDATE SET vec = excluded.vec, dup = excluded.dup",
                [(int(row_id), model_version, _f32(v), _f16(d), int(row_id)) for row_id, v, d in items],
            )
            _note_version(tx, model_version)

    def prune_embeddings(self, keep_versions: set[str]) -> int:
        """Drop embeddings of model versions that no longer exist; returns how many rows went.

        Only versions older than the newest kept one go: a newer version is one another replica may
        already serve while this replica's model store has not shown it yet."""
        if not keep_versions:
            return 0
        newest = max(keep_versions)
        versions = [str(r[0]) for r in self.db.all("SELECT model_version FROM vision_embedding_versions")]
        total = 0
        for version in versions:
            if version in keep_versions or version > newest:
                continue
            with self.db.transaction() as tx:
                total += tx.execute("DELETE FROM vision_embeddings WHERE model_version = ?", (version,))
                tx.execute("DELETE FROM vision_embedding_versions WHERE model_version = ?", (version,))
        return total

    # --- reads ---
    def head(self) -> int:
        """The newest change number (0 for an empty catalogue)."""
        return int(self.db.scalar("SELECT COALESCE(MAX(seq), 0) FROM vision_changes") or 0)

    def token_at(self, seq: int) -> str | None:
        """The random token of change ``seq`` ('' for 0): a snapshot taken at ``seq`` of another history
        (a catalogue restored from a backup, then written to) has a different one."""
        if seq == 0:
            return ""
        row = self.db.scalar("SELECT token FROM vision_changes WHERE seq = ?", (seq,))
        return None if row is None else str(row)

    def count(self) -> int:
        return int(self.db.scalar("SELECT COUNT(*) FROM vision_products") or 0)

    def changes_since(self, seq: int, limit: int | None = None) -> list[Change]:
        """Changes after ``seq`` in order, read through the log's primary key (never a table scan)."""
        sql = "SELECT seq, row_id, op, token FROM vision_changes WHERE seq > ? ORDER BY seq"
        params: tuple[int, ...] = (seq,)
        if limit is not None:
            sql += " LIMIT ?"
            params = (seq, limit)
        rows = self.db.all(sql, params)
        return [Change(int(s), int(r), str(o), str(t)) for s, r, o, t in rows]

    def products(self, row_ids: Sequence[int] | None = None) -> list[Product]:
        with self.db.read() as tx:
            return self._products(tx, row_ids)

    @staticmethod
    def _products(tx: Tx, row_ids: Sequence[int] | None) -> list[Product]:
        if row_ids is None:
            rows = tx.all(
                "SELECT row_id, product_id, category, market, sha256 FROM vision_products ORDER BY row_id"
            )
        else:
            rows = []
            for chunk in _chunks([int(r) for r in row_ids]):
                marks = ",".join("?" * len(chunk))
                rows += tx.all(
                    "SELECT row_id, product_id, category, market, sha256 FROM vision_products "
                    f"WHERE row_id IN ({marks})",
                    chunk,
                )
        return [Product(int(r), str(p), str(c), str(m), str(s)) for r, p, c, m, s in rows]

    def state(self) -> tuple[int, list[Product]]:
        """(head change number, every product) read from one snapshot of the store, so they agree."""
        with self.db.transaction() as tx:
            if tx.dialect == "postgres":  # one snapshot for both reads (READ COMMITTED takes one each)
                tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            head = int(tx.scalar("SELECT COALESCE(MAX(seq), 0) FROM vision_changes") or 0)
            products = self._products(tx, None)
        return head, products

    def embeddings(self, model_version: str, row_ids: Sequence[int], dim: int) -> dict[int, np.ndarray]:
        """Embeddings of ``model_version``; a stored vector of the wrong size counts as missing."""
        return {r: v for r, (v, _) in self.embeddings_and_duplicates(model_version, row_ids, dim).items()}

    def duplicates(self, model_version: str, row_ids: Sequence[int], dim: int) -> dict[int, np.ndarray]:
        """Near-duplicate descriptors (float32 from stored float16) of the rows, for ``model_version``."""
        out: dict[int, np.ndarray] = {}
        with self.db.read() as tx:
            for chunk in _chunks([int(r) for r in row_ids]):
                marks = ",".join("?" * len(chunk))
                for row_id, blob in tx.all(
                    "SELECT row_id, dup FROM vision_embeddings "
                    f"WHERE model_version = ? AND row_id IN ({marks})",
                    [model_version, *chunk],
                ):
                    if len(blob) == dim * 2:
                        out[int(row_id)] = np.frombuffer(bytes(blob), dtype=np.float16).astype(np.float32)
        return out

    def embeddings_and_duplicates(
        self, model_version: str, row_ids: Sequence[int], dim: int, dup_dim: int | None = None
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """(embedding, near-duplicate descriptor as float32) of ``model_version`` in one read; a vector
        (or, with ``dup_dim``, a descriptor) of the wrong size counts as missing."""
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        with self.db.read() as tx:
            for chunk in _chunks([int(r) for r in row_ids]):
                marks = ",".join("?" * len(chunk))
                for row_id, vec, dup in tx.all(
                    "SELECT row_id, vec, dup FROM vision_embeddings "
                    f"WHERE model_version = ? AND row_id IN ({marks})",
                    [model_version, *chunk],
                ):
                    if len(vec) != dim * 4 or (dup_dim is not None and len(dup) != dup_dim * 2):
                        continue
                    out[int(row_id)] = (
                        np.frombuffer(bytes(vec), dtype=np.float32),
                        np.frombuffer(bytes(dup), dtype=np.float16).astype(np.float32),
                    )
        return out

    def images(self, row_ids: Sequence[int]) -> Iterator[tuple[int, bytes]]:
        for chunk in _chunks([int(r) for r in row_ids], 256):
            marks = ",".join("?" * len(chunk))
            rows = self.db.all(f"SELECT row_id, image FROM vision_products WHERE row_id IN ({marks})", chunk)
            yield from ((int(r), bytes(b)) for r, b in rows)


def _note_version(tx: Tx, model_version: str) -> None:
    tx.execute(
        "INSERT INTO vision_embedding_versions (model_version) VALUES (?) "
        "ON CONFLICT (model_version) DO NOTHING",
        (model_version,),
    )


def _f32(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


def _f16(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float16).tobytes()


def _token() -> str:
    return secrets.token_hex(8)


def _chunks(items: list[int], size: int = 900) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
