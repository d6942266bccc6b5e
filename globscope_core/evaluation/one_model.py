"""Loss and accuracy of one model on a data split (training-time bookkeeping), and fixed evaluation subsets.

Many decoded models at once (landscapes, paths) are evaluated by ``many_models.py``; this is the plain path.
"""
from __future__ import annotations

import torch

from ..errors import GlobScopeError
from ..networks.losses import correct, cross_entropy


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048,
                   device: torch.device | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) on ``(x, y)``, per prediction: per sample
    for a classifier, per token for a language model."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, right = 0.0, 0
    for s in range(0, len(x), batch_size):
        xb, yb = x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
        out = model(xb)
        total_loss += cross_entropy(out, yb, reduction="sum").item()
        right += correct(out, yb)
    model.train(was_training)
    n = max(1, y.numel())
    return total_loss / n, right / n


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int = 0):
    """A fixed random subset of at most ``n`` samples (all of them when ``n`` is None or larger)."""
    if n is None or n >= len(x):
        return x, y
    if n <= 0:
        raise GlobScopeError(f"evaluation subset size must be positive, not {n}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]
