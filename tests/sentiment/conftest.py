"""Shared fixtures: a small real sample of the clothing reviews, embedded once per session with the
real encoder, and a head trained on it and written to a session model store.

The sample is small on purpose (the encoder does 15-40 texts per second on 2 busy cores): 144 short
reviews, balanced over negative / neutral / positive, drawn from each product-grouped split.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cbec.sentiment.v1 import sentiment_pb2_grpc

from services.runtime.server import Server
from services.sentiment.config import SentimentSettings
from services.sentiment.data import load_reviews
from services.sentiment.embed import EmbeddingCache, embed_cached
from services.sentiment.encoder import Encoder
from services.sentiment.server import SentimentService
from services.sentiment.train import Embedded, HeadParams, train
from tests import stores
from tests.support import local_settings

# Real PostgreSQL / Redis for the shared-backend tests, by assignment (importing the names would trip
# ruff's F811 on the test parameters). Started only by the tests that ask for them.
postgres_server = stores.postgres_server
redis_server = stores.redis_server
pg_url = stores.pg_url
redis_db = stores.redis_db

PER_CLASS = {"train": 30, "val": 8, "test": 10}
TINY_MULTILINGUAL = [
    {"language": "de", "stars": 1, "text": "Schlechte Qualität, die Naht ist sofort gerissen."},
    {"language": "de", "stars": 5, "text": "Wunderschönes Kleid, passt perfekt!"},
    {"language": "es", "stars": 1, "text": "Muy mala calidad, se rompió enseguida."},
    {"language": "es", "stars": 5, "text": "Me encanta, es precioso y cómodo."},
    {"language": "fr", "stars": 3, "text": "Correct, sans plus."},
]


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    return Encoder()


@pytest.fixture(scope="session")
def sample_reviews() -> Any:
    """Short real reviews, PER_CLASS of each label from each split (fixed seed)."""
    df = load_reviews()
    short = df[df["text"].str.len().between(40, 150)]
    parts = []
    for split, n in PER_CLASS.items():
        for label in range(3):
            pool = short[(short["split"] == split) & (short["label"] == label)]
            parts.append(pool.sample(n=n, random_state=1))
    import pandas as pd

    return pd.concat(parts).reset_index(drop=True)


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory, encoder: Encoder, sample_reviews: Any) -> Embedded:
    cache = EmbeddingCache.in_dir(tmp_path_factory.mktemp("cache"), encoder.name)
    result = embed_cached(encoder, sample_reviews["text"].tolist(), cache, desc="test sample")
    assert result.done.all()
    return Embedded(
        sample_reviews,
        result.vectors,
        result.from_cache,
        result.embedded,
        result.seconds,
        len(sample_reviews),
    )


@pytest.fixture(scope="session")
def multilingual_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ml") / "multilingual.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in TINY_MULTILINGUAL) + "\n")
    return path


@pytest.fixture(scope="session")
def trained(
    tmp_path_factory: pytest.TempPathFactory, encoder: Encoder, embedded: Embedded, multilingual_file: Path
) -> tuple[Path, str, dict[str, Any]]:
    """(models dir, version, evaluation) of a head trained on the sample."""
    models = tmp_path_factory.mktemp("models")
    version, evaluation = train(
        models,
        encoder=encoder,
        candidates=(HeadParams(hidden=64, epochs=40, dropout=0.1, weight_decay=1e-3),),
        multilingual_path=multilingual_file,
        data=embedded,
    )
    return models, version, evaluation


def settings_for(models_dir: Path, state_dir: Path, **overrides: Any) -> SentimentSettings:
    """A test server's settings: the review store under ``state_dir`` unless overridden (shared)."""
    fields: dict[str, Any] = dict(service="sentiment", state_dir=state_dir, batch_max_delay_ms=2)
    return local_settings(SentimentSettings, models_dir, **{**fields, **overrides})


@pytest.fixture
async def server(trained: tuple[Path, str, dict[str, Any]], tmp_path: Path) -> AsyncIterator[Server]:
    srv = Server(
        settings_for(trained[0], tmp_path / "state", sentiment_max_texts_per_call=64), SentimentService
    )
    await srv.start()
    yield srv
    await srv.stop(grace=1)


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[sentiment_pb2_grpc.SentimentServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield sentiment_pb2_grpc.SentimentServiceStub(channel)
