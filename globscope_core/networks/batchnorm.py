"""BatchNorm running statistics: a mix of two networks needs its own (Garipov et al.'s update_bn)."""
from __future__ import annotations

import torch


def bn_modules(model) -> list:
    """The BatchNorm layers of ``model`` (empty for a model without them)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def recompute_bn(model, x, batch_size: int = 512, device=None) -> bool:
    """Reset BatchNorm running statistics and recompute them on ``x`` (averages over its batches).

    A point on a curve is a mix of two networks: the ends' running statistics do not describe it.
    Returns False (and does nothing) for a model without BatchNorm.
    """
    bns = bn_modules(model)
    if not bns:
        return False
    device = device or next(model.parameters()).device
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    model.train()
    seen = 0
    for s in range(0, len(x), batch_size):
        xb = x[s : s + batch_size].to(device)
        for m in bns:  # weight each batch by its size (as Garipov et al.'s update_bn does)
            m.momentum = len(xb) / (seen + len(xb))
        with torch.no_grad():  # statistics only: autograd would keep every activation (3 GB for ResNet-56)
            model(xb)
        seen += len(xb)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.eval()
    return True
