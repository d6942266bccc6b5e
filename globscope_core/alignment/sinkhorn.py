"""Sinkhorn re-basin (Pena et al., CVPR 2023): permutations learned on the loss between the two models.

Weight and activation matching, and DEEP-ALIGN, match units by similarity; none of them looks at the loss on
the straight line between the models, which is what a barrier measures. Here every permutation P_p is relaxed
to a doubly stochastic matrix (Sinkhorn of learned scores) and the scores follow the gradient of the training
loss at a random point (1 - t) A + t P(B) of the segment. The forward pass uses the hard permutation nearest to
the soft one (Hungarian) and the gradient passes through the soft one (straight-through), so what is trained is
what is returned.

As DEEP-ALIGN's paper does, it refines a start (``start``: another aligner, e.g. deep-align; the identity by
default). The permutations it returns are those with the lower loss at the midpoint, on a fixed batch, of the
start's and the trained ones: never worse than its start on what it optimizes.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..networks.losses import cross_entropy
from .matching import Aligner
from .permutation import PermutationSpec


def _log_sinkhorn(scores: torch.Tensor, iters: int = 20) -> torch.Tensor:
    for _ in range(iters):
        scores = scores - scores.logsumexp(1, keepdim=True)
        scores = scores - scores.logsumexp(0, keepdim=True)
    return scores


def _hard(soft: torch.Tensor) -> np.ndarray:
    return linear_sum_assignment(soft.detach().cpu().numpy(), maximize=True)[1]


def one_hot_matrix(idx, n: int) -> torch.Tensor:
    """The [n, n] matrix of a permutation index: row i has its 1 at idx[i]."""
    m = torch.zeros(n, n)
    m[torch.arange(n), torch.as_tensor(np.asarray(idx), dtype=torch.long)] = 1.0
    return m


def apply_matrices(spec: PermutationSpec, mats: dict, state: dict) -> dict:
    """``state`` with permutation matrices applied (row i of axis a becomes sum_j P[i, j] w[j]: permute_state's
    ``take(w, idx)`` for a one-hot P[i, idx[i]] = 1), differentiably."""
    out = dict(state)
    for name, axes in spec.axes.items():
        w = state[name]
        for axis, p in enumerate(axes):
            if p is not None:
                w = torch.tensordot(mats[p], w.movedim(axis, 0), dims=1).movedim(0, axis)
        out[name] = w
    return out


def segment_loss(model, a: dict, b: dict, ts, x, y) -> torch.Tensor:
    """Mean cross-entropy of ``model`` at the points (1 - t) a + t b (state dicts; integer entries from a).

    BatchNorm's running statistics enter as constants: torch's batch norm cannot differentiate with respect to
    them, so a gradient with respect to a permutation sees the weights only."""
    losses = []
    for t in ts:
        mid = {n: (1 - t) * a[n] + t * b[n] if a[n].is_floating_point() else a[n] for n in a}
        mid = {n: v.detach() if n.endswith(BN_STATISTICS) else v for n, v in mid.items()}
        losses.append(cross_entropy(torch.func.functional_call(model, mid, (x,)), y))
    return torch.stack(losses).mean()


BN_STATISTICS = (".running_mean", ".running_var")


class SinkhornRefinement(Aligner):
    name = "sinkhorn"

    def __init__(self, spec: PermutationSpec, build_model, x: torch.Tensor, y: torch.Tensor, start=None,
                 steps: int = 300, lr: float = 0.01, batch_size: int = 256, seed: int = 0, device="cpu"):
        super().__init__(spec)
        self.build_model, self.start = build_model, start
        self.steps, self.lr, self.batch_size, self.seed = int(steps), float(lr), int(batch_size), int(seed)
        self.device = torch.device(device)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.kept_start = 0  # pairs where the start's permutations stayed (the trained ones were not better)

    def find(self, ref_state: dict, other_state: dict, init: dict | None = None) -> dict:
        spec, dev = self.spec, self.device
        a = {n: torch.as_tensor(v).detach().to(dev) for n, v in ref_state.items()}
        b = {n: torch.as_tensor(v).detach().to(dev) for n, v in other_state.items()}
        sizes = spec.sizes({n: tuple(w.shape) for n, w in a.items() if n in spec.axes})
        if init is None:
            init = self.start.find(ref_state, other_state) if self.start is not None else \
                {p: np.arange(n) for p, n in sizes.items()}
        model = self.build_model().to(dev).eval()  # eval: BatchNorm uses the interpolated running statistics
        g = torch.Generator().manual_seed(self.seed)
        # scores start at the start's permutations, sharp enough that the first soft matrices are near them
        scores = {p: (one_hot_matrix(init[p], n) * 5.0).to(dev).requires_grad_() for p, n in sizes.items()}
        opt = torch.optim.Adam(scores.values(), lr=self.lr)
        for _ in range(self.steps):
            soft = {p: _log_sinkhorn(s).exp() for p, s in scores.items()}
            mats = {p: one_hot_matrix(_hard(m), len(m)).to(dev) + m - m.detach() for p, m in soft.items()}
            i = torch.randint(len(self.x), (min(self.batch_size, len(self.x)),), generator=g).to(dev)
            t = float(torch.rand((), generator=g))
            loss = segment_loss(model, a, apply_matrices(spec, mats, b), (t,), self.x[i], self.y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained = {p: _hard(_log_sinkhorn(s.detach())) for p, s in scores.items()}
        # keep whichever of the start and the trained permutations has the lower midpoint loss on a fixed batch
        with torch.no_grad():
            x, y = self.x[: 4 * self.batch_size], self.y[: 4 * self.batch_size]

            def mid(perms):
                mats = {p: one_hot_matrix(perms[p], sizes[p]).to(dev) for p in sizes}
                return float(segment_loss(model, a, apply_matrices(spec, mats, b), (0.5,), x, y))

            if mid(trained) <= mid(init):
                return trained
        self.kept_start += 1
        return {p: np.asarray(init[p]) for p in sizes}
