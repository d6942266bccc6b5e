"""Aligning a model to a reference by permuting its hidden units: weight matching and activation matching.

An ``Aligner`` finds, for a model ``other``, the permutations (see permutation.py) that bring it
closest to a reference model: ``find(ref_state, other_state) -> {perm name: index array}``.
Weight matching (Ainsworth et al., Git Re-Basin) matches weights layer by layer; activation matching
matches the units' activations on data. A learned aligner (deep_align.py) subclasses ``Aligner`` too.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import GlobScopeError
from .permutation import PermutationSpec


class Aligner:
    """Finds permutations of ``other`` that match it to ``ref``. States are {name: tensor}."""

    name = "base"

    def __init__(self, spec: PermutationSpec):
        self.spec = spec

    def find(self, ref_state: dict, other_state: dict) -> dict:
        raise NotImplementedError


def float64_weights(state: dict, spec: PermutationSpec) -> dict:
    """The permuted entries of ``state`` as float64 numpy arrays (weight matching's inner products)."""
    return {n: np.asarray(torch.as_tensor(state[n]).detach().cpu(), dtype=np.float64) for n in spec.axes}


def matching_matrix(spec: PermutationSpec, p: str, n: int, a: dict, b: dict, perm: dict) -> np.ndarray:
    """Weight matching's [n, n] matrix for permutation ``p``, the others fixed at ``perm``: entry (i, j) is the sum,
    over every weight ``p`` permutes, of the inner product of A's slice i with B's slice j (``a``, ``b``:
    float64_weights). The assignment maximising its trace is the best ``p`` for the weights' inner product."""
    cost = np.zeros((n, n))
    for wname, axis in spec.perm_to_axes[p]:
        wb = _permute_one(spec, perm, wname, b[wname], skip_axis=axis)
        cost += np.moveaxis(a[wname], axis, 0).reshape(n, -1) @ np.moveaxis(wb, axis, 0).reshape(n, -1).T
    return cost


class WeightMatching(Aligner):
    """Git Re-Basin weight matching (Ainsworth et al., Algorithm 1).

    For one permutation at a time (the others fixed), maximising the summed inner products
    <W_ref, permuted W_other> over all weights it touches is a linear assignment problem on
    the matrix sum_w W_ref(axis) W_other(axis)^T. Permutations are swept in random order until a
    full sweep improves nothing (coordinate ascent: the objective never decreases).
    """

    name = "weight-matching"

    def __init__(self, spec: PermutationSpec, max_iter: int = 100, seed: int = 0):
        super().__init__(spec)
        self.max_iter, self.seed = int(max_iter), int(seed)
        self.iterations = 0

    def find(self, ref_state: dict, other_state: dict, init: dict | None = None) -> dict:
        """``init``: permutations to start from (deep-align+wm), else the identity."""
        spec = self.spec
        a, b = float64_weights(ref_state, spec), float64_weights(other_state, spec)
        sizes = spec.sizes({n: w.shape for n, w in a.items()})
        names = sorted(sizes)
        perm = {p: np.asarray(init[p]) if init else np.arange(n) for p, n in sizes.items()}
        rng = np.random.default_rng(self.seed)
        for it in range(self.max_iter):
            improved = False
            for p in (names[i] for i in rng.permutation(len(names))):
                n = sizes[p]
                cost = matching_matrix(spec, p, n, a, b, perm)
                _, cols = linear_sum_assignment(cost, maximize=True)
                old = cost[np.arange(n), perm[p]].sum()
                new = cost[np.arange(n), cols].sum()
                if new > old + 1e-12 * max(1.0, abs(old)):
                    improved = True
                    perm[p] = cols
            self.iterations = it + 1
            if not improved:
                break
        return perm


def _permute_one(spec: PermutationSpec, perm: dict, name: str, w: np.ndarray, skip_axis: int) -> np.ndarray:
    """Entry ``name`` with every permutation applied except the one on ``skip_axis``."""
    for i, p in enumerate(spec.axes[name]):
        if p is not None and i != skip_axis:
            w = np.take(w, perm[p], axis=i)
    return w


class ActivationMatching(Aligner):
    """Match units by the correlation of their activations on data (Ainsworth et al.; Li et al. 2015).

    Both models run on the same inputs; for each permutation the outputs of the module named in
    ``spec.activations`` (channels on axis 1; spatial positions count as samples) are standardised
    and the assignment maximising the summed correlation is chosen. Units of one layer are
    functionally the same set whatever the other layers' permutations, so each permutation is
    solved on its own.
    """

    name = "activation-matching"

    def __init__(self, spec: PermutationSpec, build_model, x: torch.Tensor, batch_size: int = 1024, device="cpu"):
        super().__init__(spec)
        missing = [p for p in spec.perm_names if p not in spec.activations]
        if missing:
            raise GlobScopeError(f"activation matching: the permutation spec names no activation for {', '.join(missing)}")
        self.build_model, self.batch_size, self.device = build_model, batch_size, torch.device(device)
        self.x = x.to(self.device)

    @torch.no_grad()
    def _activations(self, state: dict) -> dict:
        model = self.build_model()
        model.load_state_dict(state, strict=False)
        model.to(self.device).eval()
        modules = dict(model.named_modules())
        feats: dict = {p: [] for p in self.spec.activations}
        hooks = []
        for p, mod_name in self.spec.activations.items():
            if mod_name not in modules:
                raise GlobScopeError(f"activation matching: the model has no module '{mod_name}'")

            def hook(_m, _inp, out, p=p):
                out = out.detach().to(torch.float64)
                feats[p].append(out.movedim(1, -1).reshape(-1, out.shape[1]) if out.ndim > 2 else out)

            hooks.append(modules[mod_name].register_forward_hook(hook))
        try:
            for s in range(0, len(self.x), self.batch_size):
                model(self.x[s : s + self.batch_size])
        finally:
            for h in hooks:
                h.remove()
        return {p: torch.cat(v).cpu().numpy() for p, v in feats.items()}

    def find(self, ref_state: dict, other_state: dict) -> dict:
        fa, fb = self._activations(ref_state), self._activations(other_state)
        perm = {}
        for p in self.spec.perm_names:
            za = (fa[p] - fa[p].mean(0)) / (fa[p].std(0) + 1e-8)  # dead units: correlation 0 with everything
            zb = (fb[p] - fb[p].mean(0)) / (fb[p].std(0) + 1e-8)
            corr = za.T @ zb / len(za)
            perm[p] = linear_sum_assignment(corr, maximize=True)[1]
        return perm
