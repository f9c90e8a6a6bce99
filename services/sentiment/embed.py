"""An on-disk embedding cache keyed by content hash, and embedding through it (the encoder itself is
in ``encoder.py``).

The encoder runs at 15-40 texts per second on 2 busy cores, so training and benchmarks never
embed the same text twice: vectors are cached in SQLite under the models folder, keyed by a hash of
the encoder name (weights and arithmetic) and the exact text it embedded.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .encoder import DEFAULT_INT8, Encoder


class EmbeddingCache:
    """Vectors by sha256(encoder name, text) in one SQLite file; safe to share between threads."""

    def __init__(self, path: Path, encoder: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.encoder = encoder
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS vec (key BLOB PRIMARY KEY, v BLOB NOT NULL)")
        self._lock = threading.Lock()

    @classmethod
    def in_dir(cls, folder: Path, encoder: str) -> EmbeddingCache:
        return cls(folder / "embeddings.sqlite", encoder)

    def key(self, text: str) -> bytes:
        return hashlib.sha256(f"{self.encoder}\x00{text}".encode("utf-8", "surrogatepass")).digest()[:16]

    def get_many(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        keys = [self.key(t) for t in texts]
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                marks = ",".join("?" * len(chunk))
                for k, v in self._db.execute(f"SELECT key, v FROM vec WHERE key IN ({marks})", chunk):
                    found[bytes(k)] = np.frombuffer(v, dtype=np.float32)
        return [found.get(k) for k in keys]

    def put_many(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        rows = [
            (self.key(t), np.ascontiguousarray(v, np.float32).tobytes())
            for t, v in zip(texts, vectors, strict=True)
        ]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO vec (key, v) VALUES (?, ?)", rows)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM vec").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass
class EmbedResult:
    vectors: np.ndarray  # (n, dim); rows not embedded (budget ran out) are NaN
    done: np.ndarray  # bool mask of rows that have a vector
    from_cache: int
    embedded: int
    seconds: float


def embed_cached(
    encoder: Encoder,
    texts: Sequence[str],
    cache: EmbeddingCache | None,
    chunk: int = 64,
    budget_s: float | None = None,
    desc: str = "embedding",
    on_chunk: Callable[[int], None] | None = None,
) -> EmbedResult:
    """Embed texts in order, reusing cached vectors; stop embedding new ones when the budget is spent.

    Texts are cut to the encoder's token limit first (the cache key is the text actually embedded).
    """
    started = time.monotonic()
    prepared = [encoder.prepare(t).text for t in texts]
    vectors = np.full((len(texts), encoder.dim), np.nan, np.float32)
    cached = cache.get_many(prepared) if cache is not None else [None] * len(texts)
    todo = []
    for i, v in enumerate(cached):
        if v is not None and v.shape == (encoder.dim,):
            vectors[i] = v
        else:
            todo.append(i)
    from_cache = len(texts) - len(todo)
    embedded = 0
    with tqdm(total=len(texts), initial=from_cache, desc=desc, unit="text", mininterval=2) as bar:
        for start in range(0, len(todo), chunk):
            if budget_s is not None and time.monotonic() - started > budget_s:
                break
            rows = todo[start : start + chunk]
            batch = [prepared[i] for i in rows]
            out = encoder.embed(batch)
            vectors[rows] = out
            if cache is not None:
                cache.put_many(batch, out)
            embedded += len(rows)
            bar.update(len(rows))
            if on_chunk is not None:
                on_chunk(embedded)
    done = ~np.isnan(vectors).any(axis=1)
    return EmbedResult(vectors, done, from_cache, embedded, time.monotonic() - started)


def warm_cache_main() -> None:
    """``python -m services.sentiment.embed``: fill the embedding cache in the training priority order."""
    import argparse

    from .data import load_reviews, priority_order
    from .train import configured_settings

    parser = argparse.ArgumentParser(description=warm_cache_main.__doc__)
    parser.add_argument("--models-dir", type=Path, help="default: the settings' CBEC_MODELS_DIR (models)")
    parser.add_argument("--limit", type=int, default=None, help="reviews to cover, in priority order")
    parser.add_argument("--budget-s", type=float, default=None, help="stop after this many seconds")
    parser.add_argument(
        "--int8", action=argparse.BooleanOptionalAction, default=DEFAULT_INT8, help="int8 encoder (CPU)"
    )
    args = parser.parse_args()
    df = load_reviews()
    order = priority_order(df)[: args.limit]
    encoder = Encoder(quantize=args.int8)
    # The server's cache: CBEC_SENTIMENT_CACHE_DIR, else under the models folder.
    cache = EmbeddingCache.in_dir(configured_settings(args.models_dir).cache_dir, encoder.name)
    result = embed_cached(encoder, df["text"].to_numpy()[order].tolist(), cache, budget_s=args.budget_s)
    print(
        f"{int(result.done.sum())}/{len(order)} reviews have vectors "
        f"({result.from_cache} cached, {result.embedded} embedded in {result.seconds:.0f}s); "
        f"cache: {len(cache)}"
    )


if __name__ == "__main__":
    warm_cache_main()
