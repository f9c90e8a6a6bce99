"""Fine-tuning the encoder's top layers together with the head (``train.py --finetune-layers N``).

A head on frozen mean-pooled e5 vectors tops out around macro-F1 0.67-0.68 on this data; letting the
top transformer layers adapt to review sentiment gains a few points. On 2 CPU cores only the top few
layers can be trained: the bottom layers' token states are computed once per run (kept in memory as
fp16), and each step runs only the top layers forward and backward. Same discipline as the head:
the validation split picks the checkpoint (3-class log-loss) and fits the calibration and decision
rule; the test split is scored once, for the evaluation written with the version.

A version (``params.kind = "finetuned"``) holds ``top.pt`` (the N layers + a linear head, a few MB)
and ``finetuned.json``; serving runs the packaged bottom layers (the encoder, fp32 or int8) and then
these fp32 top layers and the head.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .encoder import DIM, Encoder, Prepared, batches, layer_pool, mean_pool, packaged_layers, run_layers
from .model import Calibration, Head, Scores, star_logits_to_scores

SCALE = 10.0  # unit vectors into a linear head: logits need a range wider than +-1


@dataclass
class FinetuneParams:
    layers: int = 2
    epochs: int = 2
    lr: float = 5e-5  # top layers
    head_lr: float = 2e-3
    batch_size: int = 16
    weight_decay: float = 0.01
    class_weight_power: float = 0.5  # as the head's: 0 unweighted, 1 inverse class frequency
    aux_weight: float = 0.3  # the "recommended" flag as an auxiliary target
    dropout: float = 0.1
    evals_per_epoch: int = 2
    seed: int = 0


class TopModel(nn.Module):
    """Top transformer layers -> mean pooling -> L2 norm -> linear head (5 star logits + recommended)."""

    def __init__(self, layers: nn.ModuleList, dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = layers
        self.head = Head(DIM, hidden=0, dropout=dropout)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = run_layers(self.layers, states, mask)
        return self.head(mean_pool(h, mask) * SCALE)


def pad_states(states: Sequence[torch.Tensor], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(s.shape[0] for s in states)
    h = torch.zeros(len(states), length, states[0].shape[1])
    m = torch.zeros(len(states), length, dtype=torch.long)
    for r, s in enumerate(states):
        h[r, : s.shape[0]] = s.float()
        m[r, : s.shape[0]] = 1
    return h.to(device), m.to(device)


def bottom_states(
    encoder: Encoder,
    texts: Sequence[str],
    cut: int,
    desc: str,
    exact: Sequence[bool] | None = None,
    vectors: bool = False,
) -> tuple[list[torch.Tensor], np.ndarray | None]:
    """Token states after the first ``cut`` layers for each (prepared) text, on the CPU: fp16 (half
    the memory of training states), fp32 where ``exact`` (scored exactly as serving does). With
    ``vectors`` the frozen encoder's sentence vectors come too, for the price of its top layers: one
    pass gives what the frozen head and the fine-tuning both need (pooled as ``encoder.pool_layers`` says)."""
    ids = encoder.ids(texts)
    out: list[torch.Tensor | None] = [None] * len(ids)
    vecs = np.zeros((len(ids), encoder.dim), np.float32) if vectors else None
    top = list(encoder.bert.encoder.layer[cut:])
    with (
        tqdm(total=len(ids), desc=desc, unit="text", mininterval=2) as bar,
        encoder.lock,
        torch.no_grad(),  # not inference_mode: these tensors are inputs of training steps
    ):
        for b in batches(ids, encoder.tokenizer.pad, encoder.batch_size, encoder.device):
            hs = encoder.states(b, cut)
            h = hs[-1]
            kept = h.cpu()
            for r, j in enumerate(b.rows):
                s = kept[r, : len(ids[j])]
                out[j] = s.clone() if exact is not None and exact[j] else s.to(torch.float16)
            if vecs is not None:
                for layer in top:
                    hs.append(run_layers([layer], hs[-1], b.mask))
                vecs[b.rows] = layer_pool(hs[-encoder.pool_layers :], b.mask).float().cpu().numpy()
            bar.update(len(b.rows))
    return [s for s in out if s is not None], vecs


def top_logits(model: TopModel, states: Sequence[torch.Tensor], device: str, batch: int = 64) -> np.ndarray:
    """Star logits (n, 5) from stored bottom states, batched by length."""
    order = np.argsort([s.shape[0] for s in states], kind="stable")
    out = np.zeros((len(states), 5))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(order), batch):
            rows = order[i : i + batch]
            h, m = pad_states([states[j] for j in rows], device)
            out[rows] = model(h, m)[:, :5].float().cpu().numpy()
    model.train(was_training)
    return out


def three_class_nll(star_logits: np.ndarray, y: np.ndarray) -> float:
    p = star_logits_to_scores(star_logits, Calibration()).probs
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)).mean())


def fit_top(
    encoder: Encoder,
    p: FinetuneParams,
    states: Sequence[torch.Tensor],
    stars: np.ndarray,
    recommended: np.ndarray,
    val_states: Sequence[torch.Tensor],
    y_val: np.ndarray,
) -> tuple[TopModel, dict[str, Any]]:
    """Train the top ``p.layers`` layers + head; keep the checkpoint with the best validation log-loss."""
    torch.manual_seed(p.seed)
    rng = np.random.default_rng(p.seed)
    device = encoder.device
    model = TopModel(packaged_layers(encoder.layers - p.layers, encoder.layers), p.dropout).to(device)
    y3 = np.where(stars <= 2, 0, np.where(stars == 3, 1, 2))
    freq = np.bincount(y3, minlength=3) / len(y3)
    w3 = (1 / np.clip(freq, 1e-6, None)) ** p.class_weight_power
    w3 = w3 / (w3 * freq).sum()
    sample_w = torch.as_tensor(w3[y3], dtype=torch.float32, device=device)
    st = torch.as_tensor(np.asarray(stars, dtype=np.int64) - 1, device=device)
    rt = torch.as_tensor(np.asarray(recommended, dtype=np.float32), device=device)
    opt = torch.optim.AdamW(
        [
            {"params": model.layers.parameters(), "lr": p.lr},
            {"params": model.head.parameters(), "lr": p.head_lr},
        ],
        weight_decay=p.weight_decay,
    )
    lengths = np.array([s.shape[0] for s in states])
    per_epoch = max(len(states) // p.batch_size, 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[p.lr, p.head_lr], total_steps=p.epochs * per_epoch, pct_start=0.1
    )
    eval_every = max(per_epoch // max(p.evals_per_epoch, 1), 1)
    best: tuple[float, dict[str, torch.Tensor], float] = (float("inf"), {}, 0.0)
    history: list[list[float]] = []
    started, seen = time.monotonic(), 0
    model.train()
    with tqdm(total=p.epochs * per_epoch, desc=f"fine-tuning top {p.layers} layers", unit="step") as bar:
        for epoch in range(p.epochs):
            # length-bucketed batches (little padding), in random order
            perm = rng.permutation(len(states))
            chunk = p.batch_size * 20
            epoch_batches = []
            for c in range(0, len(perm), chunk):
                part = perm[c : c + chunk]
                part = part[np.argsort(lengths[part], kind="stable")]
                epoch_batches += [part[i : i + p.batch_size] for i in range(0, len(part), p.batch_size)]
            rng.shuffle(epoch_batches)  # type: ignore[arg-type]
            for step, rows in enumerate(epoch_batches[:per_epoch]):
                h, m = pad_states([states[j] for j in rows], device)
                idx = torch.as_tensor(rows, device=device)
                out = model(h, m)
                loss = (
                    nn.functional.cross_entropy(out[:, :5], st[idx], reduction="none") * sample_w[idx]
                ).mean() + p.aux_weight * nn.functional.binary_cross_entropy_with_logits(out[:, 5], rt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                seen += len(rows)
                bar.update(1)
                if (step + 1) % eval_every == 0 or step + 1 == per_epoch:
                    nll = three_class_nll(top_logits(model, val_states, device), y_val)
                    at = round(epoch + (step + 1) / per_epoch, 3)
                    history.append([at, round(nll, 4)])
                    if nll < best[0]:
                        best = (nll, {k: v.detach().clone() for k, v in model.state_dict().items()}, at)
    model.load_state_dict(best[1])
    model.eval()
    seconds = time.monotonic() - started
    return model, {
        "best_epoch": best[2],
        "val_nll_by_epoch": history,
        "train_seconds": round(seconds, 1),
        "train_reviews_per_s": round(seen / max(seconds, 1e-9), 2),
    }


class FinetunedModel:
    """The packaged encoder's bottom layers, then fine-tuned top layers and a head."""

    kind = "finetuned"

    def __init__(
        self, encoder: Encoder, top: TopModel, calibration: Calibration, device: str = "cpu"
    ) -> None:
        if not 1 <= len(top.layers) < encoder.layers:
            raise ValueError(f"{len(top.layers)} tuned layers do not fit a {encoder.layers}-layer encoder")
        self.encoder = encoder
        self.top = top.to(device).eval()
        self.calibration = calibration
        self.device = device
        self.cut = encoder.layers - len(top.layers)
        self.max_tokens = encoder.max_tokens

    def prepare(self, text: str) -> Prepared:
        return self.encoder.prepare(text)

    def star_logits(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), 5))
        if not texts:
            return out
        ids = self.encoder.ids(texts)
        with self.encoder.lock, torch.inference_mode():
            for b in batches(ids, self.encoder.tokenizer.pad, self.encoder.batch_size, self.device):
                h = self.encoder.bottom_states(b, self.cut)
                out[b.rows] = self.top(h, b.mask)[:, :5].float().cpu().numpy()
        return out

    def score(self, texts: Sequence[str]) -> Scores:
        return star_logits_to_scores(self.star_logits(texts), self.calibration)

    def save(self, folder: Path, extra: dict[str, Any] | None = None) -> None:
        torch.save(self.top.state_dict(), folder / "top.pt")
        meta = {
            "layers": len(self.top.layers),
            "dropout": float(self.top.head.config["dropout"]),
            "calibration": asdict(self.calibration),
            **self.encoder.describe(),
            **(extra or {}),
        }
        (folder / "finetuned.json").write_text(json.dumps(meta, indent=2))


def load_finetuned(folder: Path, encoder: Encoder, device: str = "cpu") -> FinetunedModel:
    meta = json.loads((folder / "finetuned.json").read_text())
    if meta.get("encoder") != encoder.model_name:
        raise ValueError(
            f"layers were fine-tuned from {meta.get('encoder')!r}, this encoder is {encoder.model_name!r}"
        )
    n = int(meta["layers"])
    top = TopModel(packaged_layers(encoder.layers - n, encoder.layers), float(meta.get("dropout", 0.1)))
    top.load_state_dict(torch.load(folder / "top.pt", map_location="cpu", weights_only=True))
    return FinetunedModel(encoder, top, Calibration.from_dict(meta["calibration"]), device)
