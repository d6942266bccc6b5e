"""The optimizers a run (or a connect curve) trains with, by name."""
from __future__ import annotations

import torch

from ..errors import GlobScopeError

OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise GlobScopeError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}")
