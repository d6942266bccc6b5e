"""Loss-guided weight matching: a descent of the loss between two models over hard permutations (issue 21).

Weight matching and DEEP-ALIGN compare weights; a barrier is the loss on the segment between the models. This
refinement starts from another aligner's permutations and, one permutation p at a time, tries the assignments
that maximise  C_p - lam * G_p  for a few lam:
  * C_p: weight matching's matrix for p, the other permutations fixed (matching.matching_matrix);
  * G_p: the gradient, with respect to p's permutation matrix, of the mean loss at a few points of the segment
    on a fixed batch of training data: a first-order estimate of what moving a unit does to the loss.
Both are scaled to unit spread, so lam is the weight of the loss against the weights' similarity. A candidate is
kept when it lowers that loss; sweeps stop when one keeps nothing. The result is deterministic and never worse
than its start on this objective (on the batch, which is training data: the bench also reports test barriers).

The Sinkhorn relaxation (sinkhorn.py, Pena et al.) follows the same gradient through soft permutations; on the
demo and MNIST-5k studies it never returned a better hard permutation than its start, where checking each hard
candidate on the loss did (docs/measured.md, "Learned alignment").
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .matching import Aligner, float64_weights, matching_matrix
from .permutation import PermutationSpec
from .sinkhorn import apply_matrices, one_hot_matrix, segment_loss

LAMBDAS = (0.1, 0.3, 1.0, 3.0, 10.0)
POINTS = (0.3, 0.5, 0.7)  # where on the segment the loss is taken (a barrier's peak is near the middle)
CHUNK = 256  # samples a forward pass takes at once (autograd keeps one chunk's activations at POINTS)


class LossGuidedMatching(Aligner):
    """``start``: the aligner whose permutations are refined (weight matching or DEEP-ALIGN)."""

    name = "loss-guided"

    def __init__(self, spec: PermutationSpec, build_model, x: torch.Tensor, y: torch.Tensor, start: Aligner,
                 max_sweeps: int = 20, device="cpu"):
        super().__init__(spec)
        self.build_model, self.start, self.max_sweeps = build_model, start, int(max_sweeps)
        self.device = torch.device(device)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.name = f"{start.name}+loss"
        self.moves = 0  # permutations replaced, over all pairs so far

    def find(self, ref_state: dict, other_state: dict) -> dict:
        spec, dev = self.spec, self.device
        perms = {p: np.asarray(v) for p, v in self.start.find(ref_state, other_state).items()}
        a = {n: torch.as_tensor(v).detach().to(dev) for n, v in ref_state.items()}
        b = {n: torch.as_tensor(v).detach().to(dev) for n, v in other_state.items()}
        a64, b64 = float64_weights(ref_state, spec), float64_weights(other_state, spec)
        sizes = spec.sizes({n: w.shape for n, w in a64.items()})
        model = self.build_model().to(dev).eval()  # eval: BatchNorm uses the interpolated running statistics

        def matrices(perms, grad_of=None):
            return {p: one_hot_matrix(perms[p], sizes[p]).to(dev).requires_grad_(p == grad_of) for p in sizes}

        def loss(perms, grad_of=None):
            """The mean loss at POINTS over the batch, in chunks of CHUNK samples (what autograd keeps is one
            chunk's); with ``grad_of``, also its gradient with respect to that permutation's matrix."""
            mats = matrices(perms, grad_of)
            total, grad = 0.0, None
            with torch.set_grad_enabled(grad_of is not None):
                permuted = apply_matrices(spec, mats, b)
                for i in range(0, len(self.x), CHUNK):
                    x, y = self.x[i : i + CHUNK], self.y[i : i + CHUNK]
                    part = segment_loss(model, a, permuted, POINTS, x, y) * (len(x) / len(self.x))
                    if grad_of is not None:
                        g = torch.autograd.grad(part, mats[grad_of], retain_graph=True)[0]
                        grad = g if grad is None else grad + g
                    total += float(part.detach())
                    del part  # retain_graph keeps this chunk's activations until then: one chunk's, not two
            return total, (None if grad is None else grad.cpu().double().numpy())

        current = loss(perms)[0]
        for _ in range(self.max_sweeps):
            kept = False
            for p in sorted(sizes):
                _, grad = loss(perms, grad_of=p)
                cost = matching_matrix(spec, p, sizes[p], a64, b64, perms)
                cost, grad = cost / (cost.std() + 1e-12), grad / (grad.std() + 1e-12)
                best = None
                for lam in LAMBDAS:
                    q = linear_sum_assignment(cost - lam * grad, maximize=True)[1]
                    if np.array_equal(q, perms[p]):
                        continue
                    value = loss({**perms, p: q})[0]
                    if value < (best[0] if best else current):
                        best = (value, q)
                if best is not None:
                    current, perms[p], kept = best[0], best[1], True
                    self.moves += 1
            if not kept:
                break
        return perms
