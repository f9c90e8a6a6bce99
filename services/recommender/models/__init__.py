"""Every recommender model behind one interface (``base.Recommender``)."""

from __future__ import annotations

from .base import FitContext, Recommender, VectorModel
from .content import ContentModel
from .ease import EASE
from .factor import ALS, BPR
from .hybrid import Hybrid
from .popularity import Popularity
from .session_ease import SessionEASE
from .sparse_ease import SparseEASE
from .torch_mf import BiasedMF

MODELS: dict[str, type[Recommender]] = {
    m.name: m for m in (ALS, BPR, EASE, SessionEASE, SparseEASE, BiasedMF, ContentModel, Popularity, Hybrid)
}


def build(name: str, **params: object) -> Recommender:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](**params)


__all__ = [
    "ALS",
    "BPR",
    "EASE",
    "MODELS",
    "BiasedMF",
    "ContentModel",
    "FitContext",
    "Hybrid",
    "Popularity",
    "Recommender",
    "SessionEASE",
    "SparseEASE",
    "VectorModel",
    "build",
]
