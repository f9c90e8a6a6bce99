"""Fine-tuning on a tiny labelled sample: the head learns, the version is written and loads back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.runtime.model_store import ModelStore
from services.vision import evaluate, model, train
from tests.vision.conftest import IMAGE_SIZE


def split(shape_data: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Every 4th photo of each (shape, colour) for validation, the rest for training."""
    n = len(shape_data["labels"])
    val = np.arange(n) % 4 == 3
    return np.flatnonzero(~val), np.flatnonzero(val)


def test_fit_learns_and_writes_a_loadable_version(shape_data: dict[str, Any], tmp_path: Path) -> None:
    tr, va = split(shape_data)
    feats, labels, pngs = shape_data["features"], shape_data["labels"], shape_data["pngs"]
    config = train.TrainConfig(
        image_size=IMAGE_SIZE,
        epochs=25,
        batch_size=16,
        hidden=64,
        dim=16,
        calibration_size=20,
        duplicate_dim=24,
    )
    result = train.fit(
        feats[tr], labels[tr], feats[va], labels[va], [pngs[i] for i in va], config, progress=False
    )
    m = result.metrics
    # Shapes in five colours: the fine-tuned embedding ranks same-shape photos first (5 per shape in
    # validation, so precision@10 is at most 0.4; mAP@10 normalises by the 4 relevant ones).
    assert m["val_finetuned_map_at_10"] > 0.6
    assert 0 <= m["val_pretrained_precision_at_10"] <= 1
    assert result.spec.kind == (
        "finetuned"
        if m["val_finetuned_precision_at_10"] > m["val_pretrained_precision_at_10"]
        else "pretrained"
    )
    assert m["val_precision_at_10"] == max(
        m["val_finetuned_precision_at_10"], m["val_pretrained_precision_at_10"]
    )
    assert -1 <= m["near_duplicate_threshold"] <= 1
    assert m["near_duplicate_fpr"] <= 0.1
    assert m["near_duplicate_tpr_reupload"] >= m["near_duplicate_tpr_rephotographed"] - 0.2

    store = ModelStore(tmp_path, "vision")
    version = train.write_version(store, result, data_fingerprint="abc")
    entry = store.get(version)
    assert entry.valid and entry.manifest is not None
    assert entry.manifest.metrics["val_precision_at_10"] == pytest.approx(m["val_precision_at_10"])
    loaded = model.load(entry.path, version)
    assert loaded.version == version and loaded.spec.kind == result.spec.kind
    vectors, duplicates = loaded.embed_with_duplicates(shape_data["pixels"][:6])
    assert vectors.shape == (6, loaded.dim) and duplicates.shape == (6, 24)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(duplicates, axis=1), 1, atol=1e-5)


def test_fine_tuned_head_beats_the_pretrained_embedding_on_held_out_photos(
    shape_data: dict[str, Any], projector: model.DuplicateProjector
) -> None:
    """Products labelled by colour: the pretrained features group the photos by shape first, the head
    fine-tuned on the labels retrieves same-colour products for new photos (the gain fine-tuning is for)."""
    from services.vision.features import extract
    from services.vision.images import ImageLimits, decode
    from tests.vision import imagegen

    config = train.TrainConfig(image_size=IMAGE_SIZE, epochs=15, batch_size=32, hidden=64, dim=16)
    head = train.train_head(shape_data["features"], shape_data["colours"], config, progress=False)
    pngs, labels = [], []
    for s, shape in enumerate(imagegen.SHAPES):
        for c, colour in enumerate(imagegen.COLOURS):
            pngs.append(imagegen.encode(imagegen.draw(shape, colour, seed=90_000 + 10 * s + c)))
            labels.append(c)
    held_out = extract(np.stack([decode(p, IMAGE_SIZE, ImageLimits()) for p in pngs]), progress=False)
    gallery, gallery_labels = shape_data["features"], shape_data["colours"]
    tuned = model.Embedder(model.ModelSpec("finetuned", IMAGE_SIZE, 16, 1.0), head, projector)
    pre = model.Embedder(model.pretrained_spec(IMAGE_SIZE, 1.0), None, projector)

    def precision(embedder: model.Embedder) -> float:
        return evaluate.retrieval(
            embedder.embed_features(held_out),
            np.array(labels),
            embedder.embed_features(gallery),
            gallery_labels,
            10,
        ).precision_at_k

    assert precision(tuned) > precision(pre) + 0.2


def test_training_is_deterministic(shape_data: dict[str, Any]) -> None:
    config = train.TrainConfig(epochs=3, batch_size=16, hidden=32, dim=8)
    a = train.train_head(shape_data["features"], shape_data["labels"], config, progress=False)
    b = train.train_head(shape_data["features"], shape_data["labels"], config, progress=False)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_tampered_model_files_do_not_load(
    tmp_path: Path, tiny_head: model.ProjectionHead, projector: model.DuplicateProjector
) -> None:
    from tests.vision.conftest import write_finetuned

    store = ModelStore(tmp_path, "vision")
    version = write_finetuned(tmp_path, tiny_head, projector, 0.9)
    folder = store.get(version).path
    assert model.load(folder, version).dim == 16
    head = folder / model.HEAD_FILE
    head.write_bytes(head.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match="checksum"):
        model.load(folder, version)


def test_retrieval_metrics_by_hand() -> None:
    gallery = np.eye(4, dtype=np.float32)
    gallery_labels = np.array([0, 0, 1, 1])
    queries = np.array([[1, 0.5, 0.1, 0], [0, 0, 0.2, 1]], dtype=np.float32)
    r = evaluate.retrieval(queries, np.array([0, 0]), gallery, gallery_labels, k=2)
    # Query 1: ranks 0, 1 (both class 0) -> P@2 = 1, AP = 1. Query 2: ranks 3, 2 (class 1) -> 0, AP 0.
    assert r.precision_at_k == pytest.approx(0.5)
    assert r.map_at_k == pytest.approx(0.5)
    r = evaluate.retrieval(
        np.array([[0.1, 1, 0.9, 0]], np.float32), np.array([0]), gallery, gallery_labels, 2
    )
    # Ranks 1 (relevant), 2 (not): P@2 = 0.5, AP@2 = (1/1) / min(2, 2) = 0.5.
    assert (r.precision_at_k, r.map_at_k) == (pytest.approx(0.5), pytest.approx(0.5))
    loo = evaluate.retrieval(gallery, gallery_labels, gallery, gallery_labels, 1, exclude_self=True)
    assert loo.queries == 4


def test_train_command_on_a_folder_of_labelled_photos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m services.vision.train --images DIR``: your own products, one sub-folder per label."""
    from tests.vision import imagegen

    photos = tmp_path / "photos"
    for c, colour in enumerate(list(imagegen.COLOURS)[:3]):
        (photos / colour).mkdir(parents=True)
        for i, shape in enumerate(imagegen.SHAPES * 2):
            image = imagegen.draw(shape, colour, seed=500 + 10 * c + i)
            fmt = ("JPEG", "PNG", "WEBP")[i % 3]
            (photos / colour / f"{i}.{fmt.lower()}").write_bytes(imagegen.encode(image, fmt))
    (photos / "red" / "notes.txt").write_text("not a photo: ignored")
    monkeypatch.setenv("CBEC_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CBEC_VISION_DATA_DIR", str(tmp_path / "data"))
    argv = ["--images", str(photos), "--image-size", str(IMAGE_SIZE), "--epochs", "5"]
    assert train.main(argv) == 0
    entry = ModelStore(tmp_path / "models", "vision").newest_valid()
    assert entry is not None and entry.manifest is not None
    assert entry.manifest.params["labels"] == ["blue", "green", "red"]
    assert entry.manifest.params["train_images"] + entry.manifest.params["val_images"] == 24
    assert entry.manifest.data_fingerprint
    assert model.load(entry.path, entry.version).image_size == IMAGE_SIZE
    # --if-missing leaves the store alone now that it has a version.
    assert train.main(["--if-missing"]) == 0
    assert len(ModelStore(tmp_path / "models", "vision").versions()) == 1
    with pytest.raises(ValueError, match="at least 2 labels"):
        train.main(["--images", str(photos / "red")])
