"""The product catalogue in SQLite: the durable source of truth every FAISS index is built from.

It keeps each product's original image (so a new model version can re-embed everything), the
embeddings per model version (so an index is never built from another version's vectors), and a
change log (so an index snapshot taken at change N catches up by replaying changes after N; a
process killed between a commit and the next snapshot loses nothing). Writes are one transaction
per batch with ``synchronous=FULL``: an accepted product survives a crash.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    product_id TEXT NOT NULL UNIQUE,
    category TEXT NOT NULL DEFAULT '',
    market TEXT NOT NULL DEFAULT '',
    sha256 TEXT NOT NULL,
    image BLOB NOT NULL,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    row_id INTEGER NOT NULL REFERENCES products(row_id) ON DELETE CASCADE,
    model_version TEXT NOT NULL,
    vec BLOB NOT NULL,
    dup BLOB NOT NULL,
    PRIMARY KEY (row_id, model_version)
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    row_id INTEGER NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('add', 'remove')),
    token TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


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


class Catalogue:
    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('catalogue_id', ?)", (secrets.token_hex(16),)
            )
            self.id = str(self._db.execute("SELECT value FROM meta WHERE key = 'catalogue_id'").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            raise CatalogueError(f"catalogue {self.path} is unreadable: {exc}") from None

    def check(self) -> None:
        """Refuse a damaged file (``PRAGMA quick_check``) rather than serve from it."""
        with self._lock:
            try:
                result = [r[0] for r in self._db.execute("PRAGMA quick_check")]
            except sqlite3.DatabaseError as exc:
                raise CatalogueError(f"catalogue {self.path} is corrupt: {exc}") from None
        if result != ["ok"]:
            raise CatalogueError(f"catalogue {self.path} is corrupt: {'; '.join(result[:5])}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writes ---
    def upsert(self, items: Sequence[NewProduct], model_version: str) -> list[int]:
        """Add or replace products (a replaced product gets a new row id); returns the row ids."""
        now = time.time()
        rows: list[int] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for item in items:
                    old = self._db.execute(
                        "SELECT row_id FROM products WHERE product_id = ?", (item.product_id,)
                    ).fetchone()
                    if old is not None:
                        self._db.execute("DELETE FROM products WHERE row_id = ?", (old[0],))
                        self._db.execute(
                            "INSERT INTO changes (row_id, op, token) VALUES (?, 'remove', ?)",
                            (old[0], _token()),
                        )
                    cursor = self._db.execute(
                        "INSERT INTO products (product_id, category, market, sha256, image, added_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (item.product_id, item.category, item.market, item.sha256, item.image, now),
                    )
                    row_id = int(cursor.lastrowid or 0)
                    if item.vector is not None and item.duplicate is not None:
                        self._db.execute(
                            "INSERT INTO embeddings (row_id, model_version, vec, dup) VALUES (?, ?, ?, ?)",
                            (row_id, model_version, _f32(item.vector), _f16(item.duplicate)),
                        )
                    self._db.execute(
                        "INSERT INTO changes (row_id, op, token) VALUES (?, 'add', ?)", (row_id, _token())
                    )
                    rows.append(row_id)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return rows

    def remove(self, product_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Remove products by id; returns (removed, not found)."""
        removed: list[str] = []
        missing: list[str] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for pid in product_ids:
                    row = self._db.execute(
                        "SELECT row_id FROM products WHERE product_id = ?", (pid,)
                    ).fetchone()
                    if row is None:
                        missing.append(pid)
                        continue
                    self._db.execute("DELETE FROM products WHERE row_id = ?", (row[0],))
                    self._db.execute(
                        "INSERT INTO changes (row_id, op, token) VALUES (?, 'remove', ?)", (row[0], _token())
                    )
                    removed.append(pid)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return removed, missing

    def put_embeddings(self, model_version: str, items: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> None:
        """Store embeddings computed later (re-indexing with a new model); rows removed since are skipped."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO embeddings (row_id, model_version, vec, dup) "
                    "SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM products WHERE row_id = ?)",
                    [(row_id, model_version, _f32(v), _f16(d), row_id) for row_id, v, d in items],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def prune_embeddings(self, keep_versions: set[str]) -> int:
        """Drop embeddings of model versions that no longer exist; returns how many rows went."""
        with self._lock:
            versions = [r[0] for r in self._db.execute("SELECT DISTINCT model_version FROM embeddings")]
            gone = [v for v in versions if v not in keep_versions]
            total = 0
            for version in gone:
                total += self._db.execute(
                    "DELETE FROM embeddings WHERE model_version = ?", (version,)
                ).rowcount
            return total

    # --- reads ---
    def head(self) -> int:
        """The newest change number (0 for an empty catalogue)."""
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])

    def token_at(self, seq: int) -> str | None:
        """The random token of change ``seq`` ('' for 0): a snapshot taken at ``seq`` of another history
        (a catalogue restored from a backup, then written to) has a different one."""
        if seq == 0:
            return ""
        with self._lock:
            row = self._db.execute("SELECT token FROM changes WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else str(row[0])

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM products").fetchone()[0])

    def changes_since(self, seq: int) -> list[Change]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, row_id, op FROM changes WHERE seq > ? ORDER BY seq", (seq,)
            ).fetchall()
        return [Change(int(s), int(r), str(o)) for s, r, o in rows]

    def products(self, row_ids: Sequence[int] | None = None) -> list[Product]:
        with self._lock:
            if row_ids is None:
                rows = self._db.execute(
                    "SELECT row_id, product_id, category, market, sha256 FROM products ORDER BY row_id"
                ).fetchall()
            else:
                rows = []
                for chunk in _chunks(list(row_ids)):
                    marks = ",".join("?" * len(chunk))
                    rows += self._db.execute(
                        "SELECT row_id, product_id, category, market, sha256 FROM products "
                        f"WHERE row_id IN ({marks})",
                        chunk,
                    ).fetchall()
        return [Product(int(r), str(p), str(c), str(m), str(s)) for r, p, c, m, s in rows]

    def state(self) -> tuple[int, list[Product]]:
        """(head change number, every product) read in one transaction, so they agree."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                head = self.head()
                products = self.products()
            finally:
                self._db.execute("COMMIT")
        return head, products

    def embeddings(self, model_version: str, row_ids: Sequence[int], dim: int) -> dict[int, np.ndarray]:
        """Embeddings of ``model_version``; a stored vector of the wrong size counts as missing."""
        out: dict[int, np.ndarray] = {}
        with self._lock:
            for chunk in _chunks(list(row_ids)):
                marks = ",".join("?" * len(chunk))
                for row_id, blob in self._db.execute(
                    f"SELECT row_id, vec FROM embeddings WHERE model_version = ? AND row_id IN ({marks})",
                    [model_version, *chunk],
                ):
                    if len(blob) == dim * 4:
                        out[int(row_id)] = np.frombuffer(blob, dtype=np.float32)
        return out

    def duplicates(self, model_version: str, row_ids: Sequence[int], dim: int) -> dict[int, np.ndarray]:
        """Near-duplicate descriptors (float32 from stored float16) of the rows, for ``model_version``."""
        out: dict[int, np.ndarray] = {}
        with self._lock:
            for chunk in _chunks(list(row_ids)):
                marks = ",".join("?" * len(chunk))
                for row_id, blob in self._db.execute(
                    f"SELECT row_id, dup FROM embeddings WHERE model_version = ? AND row_id IN ({marks})",
                    [model_version, *chunk],
                ):
                    if len(blob) == dim * 2:
                        out[int(row_id)] = np.frombuffer(blob, dtype=np.float16).astype(np.float32)
        return out

    def images(self, row_ids: Sequence[int]) -> Iterator[tuple[int, bytes]]:
        for chunk in _chunks(list(row_ids), 256):
            with self._lock:
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT row_id, image FROM products WHERE row_id IN ({marks})", chunk
                ).fetchall()
            yield from ((int(r), bytes(b)) for r, b in rows)


def _f32(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


def _f16(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float16).tobytes()


def _token() -> str:
    return secrets.token_hex(8)


def _chunks(items: list[int], size: int = 900) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
