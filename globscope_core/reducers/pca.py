"""PCA baseline: the leading principal components of the standardized checkpoints.

The span basis (basis.py) is already the eigenbasis of the centred Gram matrix, sorted by variance,
so its first ``dim`` coordinates are exactly the principal components: PCA is free once the basis
is streamed, and decoding sets the remaining components to zero.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import SpanReducer, register_reducer


@register_reducer("pca")
class PCAReducer(SpanReducer):
    min_checkpoints = 2

    def _fit_coords(self, C, progress=False):
        self.k_ = C.shape[1]

    def _encode(self, C):
        C = np.asarray(C, dtype=np.float64)
        Z = np.zeros((len(C), self.dim))
        d = min(self.dim, C.shape[1])
        Z[:, :d] = C[:, :d]  # rank below dim (e.g. 2 checkpoints): the extra axes stay 0
        return Z

    def _decode_torch(self, z):
        z = z.to(torch.float32)
        out = torch.zeros((z.shape[0], self.k_), dtype=torch.float32, device=z.device)
        d = min(self.dim, self.k_)
        out[:, :d] = z[:, :d]
        return out

    def _state(self):
        return {}

    def _load_state(self, state):
        self.k_ = self.basis.rank
