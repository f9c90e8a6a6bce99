"""One model version on disk: everything the service needs to serve, written by the training
pipeline into a model-store version folder and loaded by the service.

    bundle.json        which model serves, catalogue categories and markets, events included
    users.npy          training user ids (row order of the history and of user vectors)
    items.parquet      the catalogue (item order = column order of every matrix)
    history_*.npy      training interactions per user (CSR), for excluding seen items and fold-in
    model/             the serving model (models.base.Recommender.save)
    popularity/        market-aware popularity (cold start), always present
    content.npy        item text embeddings, when the catalogue has text
    index/             FAISS index over the serving model's item vectors (vector models)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from services.runtime.device import Device

from .index import VectorIndex
from .models import EASE, Popularity, Recommender, SparseEASE, VectorModel
from .models.hybrid import Hybrid

ALL_MARKETS = np.uint64(0xFFFFFFFFFFFFFFFF)
MAX_MARKETS = 64


def market_bits(codes: list[str], markets: list[str]) -> np.uint64:
    """The availability mask of an item sold in ``codes`` (empty: every market)."""
    if not codes:
        return ALL_MARKETS
    value = 0
    for code in codes:
        value |= 1 << markets.index(code)
    return np.uint64(value)


@dataclass
class Catalogue:
    item_ids: np.ndarray
    titles: np.ndarray
    categories: list[str]
    category_codes: np.ndarray  # int32 into ``categories``
    markets: list[str]
    market_mask: np.ndarray  # uint64 bit per market; ALL_MARKETS = sold everywhere
    frame: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)

    @property
    def n(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_frame(cls, items: pd.DataFrame) -> Catalogue:
        from .data import normalise_items

        items = normalise_items(items) if "markets" not in items.columns else items.reset_index(drop=True)
        cats = items["category"].fillna("").astype(str)
        categories = sorted(c for c in cats.unique() if c)
        code_of = {c: i for i, c in enumerate(categories)}
        codes = np.array([code_of.get(c, -1) for c in cats], dtype=np.int32)
        market_strings = items["markets"].fillna("").astype(str)
        unique, inverse = np.unique(market_strings.to_numpy(dtype=str), return_inverse=True)
        markets = sorted({m for value in unique for m in value.split("|") if m})
        if len(markets) > MAX_MARKETS:
            raise ValueError(f"at most {MAX_MARKETS} markets are supported, found {len(markets)}")
        unique_masks = np.array([market_bits(value.split("|") if value else [], markets) for value in unique])
        mask = unique_masks[inverse].astype(np.uint64) if len(items) else np.zeros(0, np.uint64)
        return cls(
            item_ids=items["item_id"].astype(str).to_numpy(),
            titles=items["title"].fillna("").astype(str).to_numpy(dtype=object),
            categories=categories,
            category_codes=codes,
            markets=markets,
            market_mask=mask,
            frame=items,
        )


@dataclass
class Bundle:
    serving: str
    users: np.ndarray
    catalogue: Catalogue
    history: sp.csr_matrix
    model: Recommender
    popularity: Popularity
    content: np.ndarray | None = None
    index: VectorIndex | None = None
    events_seq: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.user_pos = pd.Index(self.users)

    @property
    def vector_model(self) -> VectorModel | None:
        return self.model if isinstance(self.model, VectorModel) else None

    def collaborative_vectors(self) -> np.ndarray | None:
        """L2-normalised item vectors of the collaborative part of the model (item-to-item)."""
        cached = getattr(self, "_collab", None)
        if cached is not None:
            return cached
        model = self.model
        candidates = list(model.components.values()) if isinstance(model, Hybrid) else [model]
        from .models.base import row_normalise

        for m in candidates:
            if isinstance(m, VectorModel) and m.name != "content":
                self._collab = row_normalise(np.asarray(m.item_factors, dtype=np.float32))
                return self._collab
        return None

    def ease_matrix(self) -> np.ndarray | sp.csr_matrix | None:
        """The EASE family's item x item B: dense for EASE and its variants (session_ease), CSR for
        sparse_ease."""
        model = self.model
        candidates = list(model.components.values()) if isinstance(model, Hybrid) else [model]
        for m in candidates:
            if isinstance(m, EASE | SparseEASE):
                return m.B
        return None


def save_bundle(
    path: Path,
    serving: str,
    users: np.ndarray,
    items: pd.DataFrame,
    history: sp.csr_matrix,
    model: Recommender,
    popularity: Popularity,
    content: np.ndarray | None = None,
    index: VectorIndex | None = None,
    events_seq: int = 0,
    meta: dict[str, Any] | None = None,
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    history = history.tocsr()
    if history.shape != (len(users), len(items)):
        raise ValueError(f"history is {history.shape}, expected {(len(users), len(items))}")
    np.save(path / "users.npy", np.asarray(users).astype(str), allow_pickle=False)
    items.reset_index(drop=True).to_parquet(path / "items.parquet", index=False)
    np.save(path / "history_indptr.npy", history.indptr.astype(np.int64))
    np.save(path / "history_indices.npy", history.indices.astype(np.int32))
    np.save(path / "history_data.npy", history.data.astype(np.float32))
    model.save(path / "model")
    popularity.save(path / "popularity")
    if content is not None:
        np.save(path / "content.npy", np.asarray(content, dtype=np.float32))
    if index is not None:
        index.save(path / "index")
    (path / "bundle.json").write_text(
        json.dumps(
            {"serving": serving, "events_seq": int(events_seq), **(meta or {})}, indent=2, sort_keys=True
        )
    )


def load_bundle(path: Path, device: Device | None = None) -> Bundle:
    meta = json.loads((path / "bundle.json").read_text())
    users = np.load(path / "users.npy", allow_pickle=False)
    catalogue = Catalogue.from_frame(pd.read_parquet(path / "items.parquet"))
    catalogue.frame = pd.DataFrame()  # serving needs the arrays only
    indptr = np.load(path / "history_indptr.npy")
    history = sp.csr_matrix(
        (np.load(path / "history_data.npy"), np.load(path / "history_indices.npy"), indptr),
        shape=(len(users), catalogue.n),
    )
    model = Recommender.load(path / "model")
    if model.n_items != catalogue.n:
        raise ValueError(f"model scores {model.n_items} items but the catalogue has {catalogue.n}")
    popularity = Recommender.load(path / "popularity")
    if not isinstance(popularity, Popularity):
        raise ValueError("popularity/ does not hold a popularity model")
    content = np.load(path / "content.npy") if (path / "content.npy").exists() else None
    if content is not None and content.shape[0] != catalogue.n:
        raise ValueError("content embeddings do not match the catalogue")
    index = VectorIndex.load(path / "index", device) if (path / "index").exists() else None
    if index is not None and index.info.n != catalogue.n:
        raise ValueError("the index does not match the catalogue")
    if isinstance(model, VectorModel) and model.user_factors is not None:
        model.user_factors = np.array(model.user_factors, dtype=np.float32)  # writable: erasure zeroes rows
    return Bundle(
        serving=str(meta["serving"]),
        users=users,
        catalogue=catalogue,
        history=history,
        model=model,
        popularity=popularity,
        content=content,
        index=index,
        events_seq=int(meta.get("events_seq", 0)),
        meta=meta,
    )
