"""The optimizers a run (or a connect curve) trains with, by name."""
from __future__ import annotations

import torch

from ..errors import GlobScopeError

OPTIMIZERS = ("sgd", "adam", "adamw")
MOMENTUM = 0.9  # of SGD


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise GlobScopeError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}")


def divergence_hint(name: str, lr: float, weight_decay: float) -> str:
    """What to lower when training diverged. Weight decay alone makes a weight w follow w <- (1 - lr wd) w (AdamW;
    SGD with momentum m likewise, stable while lr wd < 2 (1 + m)): at or past that limit the weights grow
    whatever the learning rate's share, so --weight-decay is named; else the learning rate (Adam divides the
    decay by its gradient scale: never the decay's fault)."""
    limit = {"sgd": 2 * (1 + MOMENTUM), "adamw": 2.0}.get(name)
    if weight_decay and limit and lr * weight_decay >= limit:
        return (f"try a lower --weight-decay (now {weight_decay:g}: with lr {lr:g}, {name} is unstable from "
                f"lr x weight decay = {limit:g} on, here {lr * weight_decay:.3g})")
    return f"try a lower --lr (now {lr:g})"
