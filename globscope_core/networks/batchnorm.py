"""BatchNorm running statistics: a mix of two networks needs its own (Garipov et al.'s update_bn).

Interpolating BatchNorm networks collapses the variance of their activations (Jordan et al., REPAIR, ICLR 2023),
so the loss of a mixed or decoded model with its *own* (interpolated or decoded) running statistics is mostly that
collapse. ``BatchNormReset`` re-estimates the statistics of flat parameter vectors on a fixed training subset
(``bn_subset``): connect, align and ``landscape --bn recompute`` share it.
"""
from __future__ import annotations

import copy
import time

import torch

# the fixed training subset statistics are recomputed on: a few batches of 512 (the variance of a per-channel
# mean over 2000 images is small next to the change interpolation makes); seed 3: the evaluation subsets use 0-2
BN_SAMPLES = 2000
BN_SEED = 3
BN_SETTINGS = ("decoded", "recompute")


def bn_modules(model) -> list:
    """The BatchNorm layers of ``model`` (empty for a model without them)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def layout_has_bn(layout) -> bool:
    """Whether a flattened state holds BatchNorm running statistics (decided without building the model)."""
    return any(e.name.endswith(".running_var") for e in layout.entries)


def bn_subset(x: torch.Tensor, samples: int | None = BN_SAMPLES, seed: int = BN_SEED) -> torch.Tensor:
    """The fixed training subset statistics are recomputed on: ``samples`` of ``x`` drawn with ``seed`` (all of
    ``x`` when ``samples`` is None or at least ``len(x)``)."""
    if samples is None or samples >= len(x):
        return x
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: int(samples)]
    return x[idx]


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


class BatchNormReset:
    """Flat parameter vectors [B, P] with their BatchNorm running statistics recomputed on ``x``.

    ``model``: a module of the layout's architecture (copied; on the device ``x`` is moved to). ``layers`` is 0 for
    a model without BatchNorm: calling it then returns its input unchanged (no copy, no forward pass).
    ``seconds`` and ``models`` add up the work done, so the stages can state its cost.
    """

    def __init__(self, model: torch.nn.Module, layout, x: torch.Tensor, batch_size: int = 512):
        self.layout, self.batch_size = layout, int(batch_size)
        self.layers = len(bn_modules(model))
        self.seconds, self.models, self.samples = 0.0, 0, int(len(x))
        if not self.layers:
            self.module = self.x = None
            self.entries = []
            return
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        device = next(self.module.parameters()).device
        self.x = x.to(device)
        if self.x.ndim == 4 and any(isinstance(m, torch.nn.Conv2d) for m in self.module.modules()):
            # oneDNN's fast layout on the CPU, as the per-model evaluation path uses
            self.module = self.module.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        stats = {f"{name}.{buf}" for name, m in self.module.named_modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                 for buf in ("running_mean", "running_var")}
        self.entries = [e for e in layout.entries if e.name in stats]
        self.buffers = dict(self.module.named_buffers())

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """A copy of ``rows`` whose BatchNorm statistics are those of each row's model on ``x``
        (``rows`` itself when the model has no BatchNorm)."""
        if not self.layers:
            return rows
        t = time.perf_counter()
        out = rows.clone()
        for i in range(len(rows)):
            self.layout.load_into(self.module, rows[i])
            recompute_bn(self.module, self.x, self.batch_size)
            for e in self.entries:
                out[i, e.offset : e.offset + e.numel] = self.buffers[e.name].reshape(-1).to(out.device, out.dtype)
        self.seconds += time.perf_counter() - t
        self.models += len(rows)
        return out
