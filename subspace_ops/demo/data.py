"""The demo's data: Python's documentation text, a character tokenizer, batches and validation windows."""
from __future__ import annotations

import torch
from torch import Tensor


def load_corpus() -> str:
    """Python's documentation topics, as shipped with CPython (no download)."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


class CharTokenizer:
    """One token per distinct character of the corpus, in code-point order."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def split_corpus(tokens: Tensor, train_fraction: float = 0.9):
    """Deterministic split: the first ``train_fraction`` of the tokens trains, the rest validates."""
    cut = int(len(tokens) * train_fraction)
    return tokens[:cut], tokens[cut:]


def get_batch(data: Tensor, batch_size: int, context: int, generator: torch.Generator, device):
    """Random windows of ``context + 1`` tokens: inputs and next-token targets."""
    starts = torch.randint(len(data) - context - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s : s + context] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + context + 1] for s in starts.tolist()])
    return x.to(device), y.to(device)


def eval_windows(data: Tensor, context: int, count: int):
    """``count`` evenly spaced validation windows (the same ones at every evaluation)."""
    last = len(data) - context - 1
    count = max(1, min(count, last + 1))
    starts = torch.linspace(0, last, count).long().tolist()
    x = torch.stack([data[s : s + context] for s in starts])
    y = torch.stack([data[s + 1 : s + context + 1] for s in starts])
    return x, y
