"""Market-aware popularity: what users with no history get.

Item popularity is counted over a recent window (``window_days`` before the newest event, ``None``:
all time) with an exponential time decay (``half_life_days``, ``None``: none), once over every
market and once per market (the ``market`` column of the interactions); a market with too little
data falls back to the global counts, blended by how much it has. Window and half-life are tuned on
validation like every other model (train.GRIDS), "all time" among the choices: a short window wins
on data with drifting demand, plain counts on data without.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .base import FitContext, Recommender


class Popularity(Recommender):
    name = "popularity"
    defaults = {"window_days": 30.0, "half_life_days": 7.0, "min_market_events": 50}

    global_pop: np.ndarray
    market_pop: dict[str, np.ndarray]
    #: Decayed event weight that scores 1.0 (the top item's), so live events can be added in scale.
    scale: float = 1.0

    def fit(self, X: sp.csr_matrix, ctx: FitContext) -> None:
        n_items = X.shape[1]
        self.n_items = n_items
        df = ctx.interactions
        if df is None or "timestamp" not in df.columns or df["timestamp"].isna().all():
            counts = np.asarray((X > 0).sum(axis=0)).ravel().astype(np.float32)
            self.scale = float(max(counts.max(), 1.0))
            self.global_pop = counts / self.scale
            self.market_pop = {}
            return
        ts = df["timestamp"].fillna(df["timestamp"].min()).to_numpy(dtype=float)
        newest = ts.max()
        window_days, half_life_days = self.params["window_days"], self.params["half_life_days"]
        if window_days is None:
            recent = np.ones(len(ts), dtype=bool)
        else:
            recent = ts >= newest - float(window_days) * 86400
            if recent.sum() < min(len(df), 100):  # too little recent data: use everything, decayed
                recent[:] = True
        if half_life_days is None:
            decay = np.ones(len(ts))
        else:
            decay = 0.5 ** ((newest - ts) / (float(half_life_days) * 86400))
        w = np.where(recent, decay, 0.0)
        items = df["item_idx"].to_numpy()
        counts = np.bincount(items, weights=w, minlength=n_items)
        self.scale = float(counts.max()) if counts.max() > 0 else 1.0
        self.global_pop = self._normalise(counts)
        self.market_pop = {}
        if "market" in df.columns:
            markets = df["market"].fillna("").astype(str).to_numpy()
            for market in pd.unique(markets):
                if not market:
                    continue
                mask = (markets == market) & recent
                n = int(mask.sum())
                if n == 0:
                    continue
                local = self._normalise(np.bincount(items[mask], weights=w[mask], minlength=n_items))
                share = min(1.0, n / float(self.params["min_market_events"]))
                self.market_pop[str(market)] = (share * local + (1 - share) * self.global_pop).astype(
                    np.float32
                )

    @staticmethod
    def _normalise(counts: np.ndarray) -> np.ndarray:
        counts = counts.astype(np.float32)
        top = counts.max()
        return counts / top if top > 0 else counts

    def for_market(self, market: str) -> np.ndarray:
        return self.market_pop.get(market, self.global_pop)

    def score(
        self, users: np.ndarray, history: sp.csr_matrix, base: sp.csr_matrix | None = None
    ) -> np.ndarray:
        return np.repeat(self.global_pop[None, :], history.shape[0], axis=0)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"global_pop": self.global_pop, "scale": np.array([self.scale], dtype=np.float64)}
        for i, (_market, pop) in enumerate(sorted(self.market_pop.items())):
            out[f"market_{i}"] = pop
        return out

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.global_pop = np.asarray(arrays["global_pop"])
        self.scale = float(np.asarray(arrays["scale"])[0]) if "scale" in arrays else 1.0
        self.n_items = len(self.global_pop)
        self._arrays = arrays

    def _save_extra(self, path: Path) -> None:
        (path / "markets.json").write_text(json.dumps(sorted(self.market_pop)))

    def _load_extra(self, path: Path, mmap: bool) -> None:
        names = json.loads((path / "markets.json").read_text())
        self.market_pop = {m: np.asarray(self._arrays[f"market_{i}"]) for i, m in enumerate(names)}
        del self._arrays
