"""Cross-entropy and accuracy for classifiers (logits [N, C], labels [N]) and language models (logits
[N, T, V], next tokens [N, T]): every position of a sequence is one prediction."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction)


def correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    """How many predictions (samples, or tokens of sequences) are right."""
    return int((logits.argmax(-1) == y).sum())
