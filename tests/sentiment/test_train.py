"""Training the head on a small real sample, the evaluation it writes, and the data split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.runtime.model_store import ModelStore
from services.sentiment.data import load_reviews, priority_order, split_by_product, stars_to_label
from services.sentiment.encoder import Encoder
from services.sentiment.model import Calibration, load_version, star_logits_to_scores
from services.sentiment.train import Embedded, classification_metrics, fit_calibration


def test_split_keeps_every_product_in_one_split() -> None:
    df = load_reviews()
    assert len(df) > 22_000
    assert df.groupby("product_id")["split"].nunique().max() == 1
    shares = df["split"].value_counts(normalize=True)
    assert (
        abs(shares["train"] - 0.7) < 0.03
        and abs(shares["val"] - 0.1) < 0.03
        and abs(shares["test"] - 0.2) < 0.03
    )
    assert list(stars_to_label(np.array([1, 2, 3, 4, 5]))) == [0, 0, 1, 2, 2]


def test_priority_order_prefix_samples_every_split_in_proportion() -> None:
    df = load_reviews()
    order = priority_order(df)
    assert sorted(order) == list(range(len(df)))
    prefix = df.iloc[order[:1000]]["split"].value_counts(normalize=True)
    full = df["split"].value_counts(normalize=True)
    for split in ("train", "val", "test"):
        assert abs(prefix[split] - full[split]) < 0.01


def test_split_by_product_is_deterministic() -> None:
    products = np.array([f"p{i % 37}" for i in range(500)])
    a, b = split_by_product(products), split_by_product(products)
    assert (a == b).all()
    assert set(a) == {"train", "val", "test"}


def test_classification_metrics_match_hand_computed() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 1, 1, 2, 2, 2, 2, 0])
    m = classification_metrics(y, pred)
    assert m["confusion"] == [[1, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert m["accuracy"] == 5 / 8
    # negative: P 1/2 R 1/2 F 0.5; neutral: P 1/2 R 1/2 F 0.5; positive: P 3/4 R 3/4 F 0.75
    assert m["per_class"]["positive"] == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    assert m["macro_f1"] == round((0.5 + 0.5 + 0.75) / 3, 4)


def test_calibration_fixes_overconfident_logits() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 3000)
    # star logits whose right group is favoured, then made 4x too confident
    base = rng.normal(size=(3000, 5))
    base[np.arange(3000), np.array([0, 2, 4])[y]] += 1.5
    logits = base * 4
    raw = star_logits_to_scores(logits, Calibration())
    cal = fit_calibration(logits, y, [1.5, 3.0, 4.5])
    fixed = star_logits_to_scores(logits, cal)
    nll = lambda p: -np.log(p[np.arange(len(y)), y]).mean()  # noqa: E731
    assert cal.temperature > 2
    assert nll(fixed.probs) < nll(raw.probs)
    assert np.allclose(fixed.probs.sum(axis=1), 1)
    assert ((fixed.stars >= 1) & (fixed.stars <= 5)).all()


def test_head_trains_and_writes_a_version_with_its_evaluation(
    trained: tuple[Path, str, dict[str, Any]], embedded: Embedded, encoder: Encoder
) -> None:
    models, version, _ = trained
    folder = models / "sentiment" / version
    for name in (
        "manifest.json",
        "head.pt",
        "head.json",
        "evaluation.json",
        "confusion.png",
        "calibration.png",
    ):
        assert (folder / name).is_file(), name
    assert (folder / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((folder / "evaluation.json").read_text())
    test = written["test"]
    assert test["n"] == 30 and sum(map(sum, test["confusion"])) == 30
    assert set(test["per_class"]) == {"negative", "neutral", "positive"}
    # ~100 short training reviews are far from the benchmark's quality (and 30 test reviews too few to
    # pin an accuracy), but negative and positive reviews must already be told apart
    te = (embedded.df["split"] == "test").to_numpy()
    labels = embedded.df.loc[te, "label"].to_numpy()
    model = load_version(folder, ModelStore(models, "sentiment").get(version).manifest, lambda: encoder)  # type: ignore[arg-type]
    p_pos = model.score_embeddings(embedded.x[te]).probs[:, 2]  # type: ignore[attr-defined]
    pos, neg = p_pos[labels == 2], p_pos[labels == 0]
    auc = (pos[:, None] > neg[None, :]).mean()
    assert auc > 0.8, (auc, test)
    assert 0 <= written["calibration"]["ece"] <= 1
    assert written["multilingual"]["n"] == 5
    entry = ModelStore(models, "sentiment").get(version)
    assert entry.manifest is not None
    assert entry.manifest.params["kind"] == "head"
    assert entry.manifest.metrics["test_macro_f1"] == test["macro_f1"]

    # the saved version, loaded the way the server loads it, scores exactly like the evaluation did
    model = load_version(folder, entry.manifest, lambda: encoder)
    te = (embedded.df["split"] == "test").to_numpy()
    scores = model.score_embeddings(embedded.x[te])  # type: ignore[attr-defined]
    assert classification_metrics(embedded.df.loc[te, "label"].to_numpy(), scores.labels) == test
    assert np.allclose(scores.probs.sum(axis=1), 1)


def test_loaded_head_separates_clear_cases(
    trained: tuple[Path, str, dict[str, Any]], encoder: Encoder
) -> None:
    models, version, _ = trained
    entry = ModelStore(models, "sentiment").get(version)
    model = load_version(entry.path, entry.manifest, lambda: encoder)  # type: ignore[arg-type]
    texts = [
        "Love this dress, the fit is perfect and the fabric is beautiful.",
        "Terrible quality, it ripped the first time I wore it. Returned.",
    ]
    s = model.score([model.prepare(t).text for t in texts])
    assert s.probs[0, 2] > s.probs[1, 2] and s.probs[1, 0] > s.probs[0, 0]
    assert s.stars[0] > s.stars[1]


def test_defaults_skip_training_when_a_model_exists(
    trained: tuple[Path, str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from services.sentiment import defaults

    models, version, _ = trained
    monkeypatch.setattr("sys.argv", ["defaults", "--models-dir", str(models)])
    defaults.main()
    assert f"model {version} exists" in capsys.readouterr().out
