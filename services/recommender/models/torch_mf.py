"""The seed's biased factor model r(u, i) = W_u . A_i + b_u (+ c_i, an item bias), trained by
gradient descent in torch on the runtime's device.

Two losses:

- ``softmax`` (default, for implicit feedback): each user's interactions are a multinomial draw
  over the catalogue; the loss is the negative log-likelihood of the user's items under
  softmax_i(r(u, i)) (b_u cancels in the softmax). Above ``full_softmax_max_items`` the softmax is
  sampled: each batch shares ``negatives`` uniformly drawn items.
- ``mse``: the seed's regression, r(u, i) fitted to the rating (1 for implicit events) on observed
  pairs and to 0 on as many uniformly sampled unobserved pairs.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from .base import FitContext, VectorModel


class BiasedMF(VectorModel):
    name = "torch_mf"
    defaults = {
        "factors": 64,
        "epochs": 20,
        "lr": 0.01,
        "weight_decay": 1e-4,
        "loss": "softmax",
        "batch_users": 256,
        "full_softmax_max_items": 50000,
        "negatives": 2048,
        "item_bias": True,
    }

    user_bias: np.ndarray | None = None

    def fit(self, X: sp.csr_matrix, ctx: FitContext) -> None:
        import torch
        from tqdm.auto import tqdm

        p = self.params
        if p["loss"] not in ("softmax", "mse"):
            raise ValueError("loss must be 'softmax' or 'mse'")
        torch.manual_seed(ctx.seed)
        rng = np.random.default_rng(ctx.seed)
        device = torch.device(ctx.device.torch)
        X = X.tocsr().astype(np.float32)
        n_users, n_items = X.shape
        d = int(p["factors"])
        W = torch.nn.Parameter(torch.randn(n_users, d, device=device) * 0.05)
        A = torch.nn.Parameter(torch.randn(n_items, d, device=device) * 0.05)
        bu = torch.nn.Parameter(torch.zeros(n_users, device=device))
        bi = torch.nn.Parameter(torch.zeros(n_items, device=device))
        params = [W, A, bu] + ([bi] if p["item_bias"] else [])
        opt = torch.optim.Adam(params, lr=float(p["lr"]), weight_decay=float(p["weight_decay"]))
        full = n_items <= int(p["full_softmax_max_items"])
        batch = int(p["batch_users"])
        for _epoch in tqdm(range(int(p["epochs"])), desc="torch_mf", disable=not ctx.progress, leave=False):
            order = rng.permutation(n_users)
            for start in range(0, n_users, batch):
                rows = order[start : start + batch]
                sub = X[rows].tocoo()
                if sub.nnz == 0:
                    continue
                r = torch.as_tensor(rows, device=device)
                u_local = torch.as_tensor(sub.row, device=device, dtype=torch.long)
                items = torch.as_tensor(sub.col, device=device, dtype=torch.long)
                weights = torch.as_tensor(sub.data, device=device)
                if p["loss"] == "softmax":
                    loss = self._softmax_loss(W[r], A, bi, u_local, items, weights, full, rng, device)
                else:
                    loss = self._mse_loss(W[r], bu[r], A, bi, u_local, items, weights, rng, device, n_items)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.user_factors = W.detach().cpu().numpy().astype(np.float32)
        self.item_factors = A.detach().cpu().numpy().astype(np.float32)
        self.item_bias = bi.detach().cpu().numpy().astype(np.float32) if p["item_bias"] else None
        self.user_bias = bu.detach().cpu().numpy().astype(np.float32)
        self.n_items = n_items

    def _softmax_loss(self, Wb, A, bi, u_local, items, weights, full, rng, device):  # type: ignore[no-untyped-def]
        import torch

        if full:
            logits = Wb @ A.T + bi[None, :]
            logp = torch.log_softmax(logits, dim=1)
            picked = logp[u_local, items]
            per_user = torch.zeros(len(Wb), device=device).index_add_(0, u_local, weights * picked)
            totals = torch.zeros(len(Wb), device=device).index_add_(0, u_local, weights)
            return -(per_user / totals.clamp_min(1e-9)).mean()
        n_items = A.shape[0]
        neg = torch.as_tensor(rng.integers(0, n_items, int(self.params["negatives"])), device=device)
        pos_logit = (Wb[u_local] * A[items]).sum(1) + bi[items]
        neg_logit = Wb[u_local] @ A[neg].T + bi[neg][None, :] + math.log(n_items / len(neg))
        logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)
        return -(weights * torch.log_softmax(logits, dim=1)[:, 0]).sum() / weights.sum()

    def _mse_loss(self, Wb, bub, A, bi, u_local, items, weights, rng, device, n_items):  # type: ignore[no-untyped-def]
        import torch

        neg_items = torch.as_tensor(rng.integers(0, n_items, len(items)), device=device)
        u = torch.cat([u_local, u_local])
        i = torch.cat([items, neg_items])
        target = torch.cat([weights.clamp(max=5.0), torch.zeros_like(weights)])
        pred = (Wb[u] * A[i]).sum(1) + bub[u] + bi[i]
        return torch.mean((pred - target) ** 2)

    def arrays(self) -> dict[str, np.ndarray]:
        out = super().arrays()
        if self.user_bias is not None:
            out["user_bias"] = self.user_bias
        return out

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().set_arrays(arrays)
        self.user_bias = arrays.get("user_bias")
