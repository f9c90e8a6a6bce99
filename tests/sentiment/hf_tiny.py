"""A tiny fine-tuned Hugging Face sequence-classification directory, built and trained here (no hub).

It stands in for the bigger model a GPU node would fine-tune: a 2-layer BERT with 32-d hidden states
and a WordPiece tokenizer whose vocabulary is written by this file. It is trained for a few dozen
steps until it tells a handful of clearly positive, neutral and negative phrases apart, so tests of
the loading path can check that labels come out in the right order, not just that something loads.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [
    "the",
    "dress",
    "shirt",
    "shoes",
    "is",
    "was",
    "are",
    "fit",
    "fits",
    "quality",
    "fabric",
    "color",
    "size",
    "it",
    "this",
    "i",
    "and",
    "very",
    "really",
    "love",
    "great",
    "perfect",
    "beautiful",
    "amazing",
    "comfortable",
    "gorgeous",
    "okay",
    "fine",
    "average",
    "alright",
    "decent",
    "ordinary",
    "awful",
    "terrible",
    "broke",
    "broken",
    "cheap",
    "ripped",
    "horrible",
    "returned",
]

EXAMPLES = {
    2: [
        "i love this dress",
        "great quality",
        "perfect fit",
        "beautiful color",
        "amazing shoes",
        "very comfortable",
    ],
    1: [
        "it is okay",
        "fine fabric",
        "average quality",
        "the size is alright",
        "decent shirt",
        "ordinary color",
    ],
    0: ["awful quality", "it broke", "cheap fabric", "the dress ripped", "terrible fit", "horrible shoes"],
}


def build(
    folder: Path, labels: tuple[str, ...] = ("negative", "neutral", "positive"), steps: int = 40
) -> Path:
    """Write a trained tiny model + tokenizer to ``folder`` and return it."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(
        vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True, model_max_length=64
    )
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster on busy cores
    model = BertForSequenceClassification(config)
    # outputs in the order the labels name them: class c of EXAMPLES goes to the output named for it
    target_of = {c: next(i for i, n in enumerate(labels) if _class_of(n) == c) for c in EXAMPLES}
    texts = [t for c in EXAMPLES for t in EXAMPLES[c]]
    targets = torch.tensor([target_of[c] for c in EXAMPLES for _ in EXAMPLES[c]])
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = model(**enc, labels=targets).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.set_num_threads(threads)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _class_of(name: str) -> int:
    """Sentiment class a label name stands for (3 names, or 5 star names mapped 1-2 / 3 / 4-5)."""
    low = name.lower()
    if low[0].isdigit():
        stars = int(low[0])
        return 0 if stars <= 2 else 1 if stars == 3 else 2
    return {"neg": 0, "neu": 1, "pos": 2}[low[:3]]
