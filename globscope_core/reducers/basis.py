"""An exact linear basis of the checkpoints' span, built by streaming the checkpoint matrix.

Every reducer works on the coordinates of the checkpoints in this basis, so none of them needs the
[N, P] matrix in memory, and the autoencoder's input is N-dimensional (N checkpoints), not P:

  standardized   s = (x - mean) / scale       per-coordinate standardization across checkpoints
  coordinates    c = s @ V.T                  V: [k, P], orthonormal rows spanning the standardized rows
  decoding       x = mean + (c @ V) * scale, then x >= lower where a lower bound is set (see ``fit``)

Because V is orthonormal, ``||c - c'||^2 / P`` is exactly the mean squared error in standardized
parameter space, so reducers can be trained and scored on c alone.

Passes over the study (each reads blocks of rows; memory stays ~ block + O(P + N^2 + k P)):
  1. mean and scale (sums of x and x^2 in float64, shifted by the first row for accuracy),
  2. Gram matrix G = S S^T, block pair by block pair (one block is held, the others stream past),
  3. V = W S with W = L^-1/2 U^T and G = U L U^T, accumulated block by block.

Streamed (``streamed=True``, when V [k, P] does not fit in memory: budget.py ``basis_plan``): pass 3 is skipped
and V is never formed. V = W S, so decoding is ``(c W) S`` and encoding ``(s S^T) W^T``: one pass over the
checkpoints themselves (the source the basis was fitted on, re-attached when a saved reducer is loaded) per
call, holding a row block and the [n, P] result, never [k, P]. Both equal the in-memory path up to float32
rounding (the reducer's coordinates C and everything fitted on them are the same numbers).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ..errors import GlobScopeError

# eigenvalues of the Gram matrix below this fraction of the largest are float32 noise, not span
RANK_RTOL = 1e-10
SLICE = 1 << 16  # columns per step of the first pass (a float64 buffer of a few MB per block row)


def describe(source) -> str:
    return getattr(source, "h5_path", None) or "checkpoint matrix"


class ArraySource:
    """A numpy [N, P] matrix with the Study's streaming interface (for tests and small inputs)."""

    def __init__(self, X):
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise GlobScopeError(f"checkpoint matrix must be 2-D [N, P], got shape {X.shape}")
        self.X = X
        self.n_checkpoints, self.n_params = X.shape

    def iter_params(self, block_rows=None, rows=None, reuse: bool = False):
        """Blocks are copies (``reuse``: the caller may overwrite them, as with a Study)."""
        rows = np.arange(self.n_checkpoints) if rows is None else np.asarray(rows)
        block_rows = block_rows or len(rows) or 1
        for s in range(0, len(rows), block_rows):
            idx = rows[s : s + block_rows]
            yield idx, self.X[idx]  # an index array: a copy


def as_source(X):
    return X if hasattr(X, "iter_params") and hasattr(X, "n_checkpoints") else ArraySource(X)


def default_block_rows(n_params: int, budget_bytes: int = 64 << 20) -> int:
    return max(1, budget_bytes // max(1, 4 * n_params))


class SpanBasis:
    """mean, scale [P] and an orthonormal basis V [k, P] of the standardized checkpoints; streamed: V = W S
    with W [k, N] and the N checkpoints S read from ``source`` whenever V is needed."""

    def __init__(self, mean=None, scale=None, V=None, lower=None, W=None):
        self.mean, self.scale, self.V, self.lower, self.W = mean, scale, V, lower, W
        self.source = None  # streamed: the checkpoints V is made of (attach)

    @property
    def streamed(self) -> bool:
        return self.V is None and self.W is not None

    @property
    def rank(self) -> int:
        return (self.W if self.streamed else self.V).shape[0]

    @property
    def n_params(self) -> int:
        return len(self.mean)

    def attach(self, source) -> None:
        """The checkpoints a streamed basis was fitted on (a saved reducer is loaded without them)."""
        src = as_source(source)
        if (src.n_checkpoints, src.n_params) != (self.W.shape[1], self.n_params):
            raise GlobScopeError(f"{describe(src)}: {src.n_checkpoints} checkpoints x {src.n_params:,} parameters, the "
                                 f"streamed basis was fitted on {self.W.shape[1]} x {self.n_params:,}; refit it")
        self.source = src

    def _rows(self, reuse: bool = True):
        """The basis' checkpoints, standardized, block by block: (positions, S [b, P] float32); ``reuse``: every
        S is the buffer the rows were read into, overwritten by the next block (not for autograd, which keeps S)."""
        if self.source is None:
            raise GlobScopeError("this reducer's basis is streamed from its study's checkpoints: load it with its "
                                 "study (reducers.load_reducer)")
        for idx, B in self.source.iter_params(default_block_rows(self.n_params), reuse=reuse):
            yield idx, self.standardize(B, B if reuse else None)  # reused: standardized in the read buffer

    # --- fitting --------------------------------------------------------------------------
    def fit(self, source, min_checkpoints: int = 3, block_rows: int | None = None, progress: bool = False,
            max_rank: int | None = None, device=None, floor_mask=None, streamed: bool = False,
            panel_bytes: int | None = None):
        """Returns the coordinates C [N, k] (float64) of every checkpoint, in row order.

        ``max_rank`` keeps only the leading directions (a truncated basis: k x P memory instead of
        N x P, at the cost of the variance left out, see ``explained``). ``device``: a CUDA device
        computes the Gram matrix there (fewer passes over the study); everything else runs on the host.
        ``floor_mask`` [P] bool: coordinates (BatchNorm variances) whose decoded value is kept at or
        above the smallest value any checkpoint had there. A decoder between or beyond checkpoints can
        give a negative variance, and a variance near 0 blows the activations up layer after layer
        (a ResNet-56 landscape was 76% NaN without this floor). ``streamed``: keep W and the source instead of
        V (module docstring). ``panel_bytes``: the Gram pass's panel on the host (budget.basis_plan fits it to
        the memory there)."""
        src = as_source(source)
        name = describe(src)
        N, P = src.n_checkpoints, src.n_params
        if N < min_checkpoints:
            raise GlobScopeError(f"{name}: {N} checkpoints, the reducer needs at least {min_checkpoints}")
        block_rows = block_rows or default_block_rows(P)
        nb = -(-N // block_rows)

        # pass 1: mean and scale; also rejects NaN/Inf before anything is computed with them. It holds float64
        # sums and squares of P and the first row (the shift); everything else is made in column slices (through
        # one small buffer) or in their place: at 1.2e8 parameters each vector of P is 0.5-1 GB, and whole-vector
        # temporaries made this the fit's largest phase (17 float32 vectors of P, 8 GB)
        lowest = None
        if floor_mask is not None and np.any(floor_mask):
            lowest = np.full(P, np.inf, np.float32)
        shift = total = sq = None
        for idx, B in tqdm(src.iter_params(block_rows, reuse=True), total=nb, desc="basis 1/3 mean",
                           disable=not progress):
            if shift is None:
                shift = B[0].copy()  # float32; cast exactly to float64 in the differences
                total, sq = np.zeros(P), np.zeros(P)
                D = np.empty((len(B), min(P, SLICE)))
            if len(B) > len(D):
                D = np.empty((len(B), D.shape[1]))
            for c in range(0, P, SLICE):
                sl = slice(c, c + SLICE)
                if not np.isfinite(B[:, sl]).all():
                    r, col = np.argwhere(~np.isfinite(B[:, sl]))[0]
                    raise GlobScopeError(f"{name}: checkpoint row {idx[r]} has a non-finite value (NaN or Inf) "
                                         f"at parameter {c + col}")
                d = np.subtract(B[:, sl], shift[sl], out=D[: len(B), : len(shift[sl])], dtype=np.float64)
                total[sl] += d.sum(0)
                sq[sl] += np.einsum("ij,ij->j", d, d)
                if lowest is not None:
                    np.minimum(lowest[sl], B[:, sl].min(0), out=lowest[sl])
        del B, D
        mean = np.empty(P, np.float32)
        std = sq  # the spread takes the squares' place, slice by slice
        for c in range(0, P, SLICE):
            sl = slice(c, c + SLICE)
            mean_d = total[sl] / N
            mean[sl] = shift[sl] + mean_d
            std[sl] = np.sqrt(np.maximum(sq[sl] / N - mean_d**2, 0.0))
        del shift, total, sq
        positive = std > 0
        if not positive.any():
            raise GlobScopeError(f"{name}: all {N} checkpoints are identical (zero variance in every parameter); "
                                 "there is nothing to reduce")
        # constant coordinates carry no information: scale 1 keeps them finite (their s is always 0);
        # tiny but non-zero spreads are floored so float32 rounding noise is not blown up
        floor = 1e-6 * float(np.median(std[positive], overwrite_input=True))
        del positive
        scale = std.astype(np.float32)
        scale[~(std > floor)] = 1.0
        del std
        self.mean, self.scale = mean, scale
        self.lower = None if lowest is None else np.where(floor_mask, lowest, -np.inf).astype(np.float32)
        del lowest

        # pass 2: Gram matrix of the standardized rows, a held panel against streamed blocks
        # (gram.py: the study is read ~N/panel times, products in float64)
        from .gram import gram_matrix

        on_gpu = getattr(device, "type", None) == "cuda"  # the GPU path sizes its panel to the GPU's memory
        G = gram_matrix(src, self.standardize, panel_bytes=None if on_gpu else panel_bytes, progress=progress,
                        desc="basis 2/3 Gram", device=device)

        evals, U = np.linalg.eigh(G)
        order = np.argsort(evals)[::-1]
        evals, U = evals[order], U[:, order]
        keep = evals > RANK_RTOL * evals[0]
        evals, U = evals[keep], U[:, keep]
        total_var = evals.sum()
        if max_rank:
            evals, U = evals[: max(int(max_rank), 1)], U[:, : max(int(max_rank), 1)]
        k = len(evals)
        W = (U / np.sqrt(evals)).T.astype(np.float32)  # [k, N]: V = W @ S
        self.explained = evals / total_var  # fraction of the standardized variance per direction
        if streamed:
            self.V, self.W, self.source = None, W, src
            return U * np.sqrt(evals)

        # pass 3: the basis itself, V += W[:, rows] @ S[rows], in column slices: a whole [k, P]
        # product would be a second V in memory (2 GB for a 4.7e6-parameter CNN)
        V = np.zeros((k, P), np.float32)
        cols = max(1, (64 << 20) // (4 * k))
        for idx, B in tqdm(src.iter_params(block_rows, reuse=True), total=nb, desc="basis 3/3 span",
                           disable=not progress):
            S = self.standardize(B, B)  # in the read buffer
            for c in range(0, P, cols):
                V[:, c : c + cols] += W[:, idx] @ S[:, c : c + cols]
        self.V, self.W = V, None
        return U * np.sqrt(evals)  # C = S V^T = U L^1/2

    # --- mapping -------------------------------------------------------------------------
    def standardize(self, X, out: np.ndarray | None = None) -> np.ndarray:
        S = np.subtract(X, self.mean, out=out, dtype=np.float32)
        S /= self.scale  # in place: one temporary of the block, not two (the memory estimate counts one)
        return S

    def to_coords(self, X) -> np.ndarray:
        """Flattened checkpoints [n, P] -> basis coordinates [n, k] (float64)."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim == 1:
            X = X[None]
        if X.ndim != 2 or X.shape[1] != self.n_params:
            raise GlobScopeError(f"checkpoints have shape {X.shape}, the reducer expects (n, {self.n_params})")
        if not np.isfinite(X).all():
            raise GlobScopeError("checkpoints to transform contain NaN or Inf")
        if not self.streamed:
            return (self.standardize(X) @ self.V.T).astype(np.float64)
        s = self.standardize(X)
        g = np.zeros((len(s), self.W.shape[1]), np.float64)  # s S^T: products with every basis checkpoint
        for idx, S in self._rows():
            g[:, idx] = s @ S.T
        return g @ self.W.T.astype(np.float64)

    def from_coords_torch(self, c: torch.Tensor) -> torch.Tensor:
        """Basis coordinates [n, k] -> flattened checkpoints [n, P] (float32, on c's device)."""
        dev = c.device
        if self.streamed:  # (c W) S, the checkpoints streamed past once
            a = c.to(torch.float32) @ self._cached("W", dev)
            x = None if a.requires_grad else torch.zeros((len(a), self.n_params), device=dev)
            for idx, S in self._rows(reuse=not a.requires_grad):
                a_b, S_b = a[:, torch.as_tensor(idx, device=dev)], torch.from_numpy(S).to(dev)
                if x is None or x.requires_grad:  # out of place, for autograd
                    x = a_b @ S_b if x is None else x + a_b @ S_b
                else:  # in place: no second [n, P]
                    x.addmm_(a_b, S_b)
        else:
            x = c.to(torch.float32) @ self._cached("V", dev)
        if x.requires_grad:  # out of place, for autograd
            x = x * self._cached("scale", dev) + self._cached("mean", dev)
            return x if self.lower is None else torch.maximum(x, self._cached("lower", dev))
        # in place: a decoded chunk is ~256 MiB, every temporary copy would be another one
        x.mul_(self._cached("scale", dev)).add_(self._cached("mean", dev))
        return x if self.lower is None else x.clamp_(min=self._cached("lower", dev))

    def _cached(self, name, device):
        cache = self.__dict__.setdefault("_torch_cache", {})
        key = (name, str(device))
        if key not in cache:
            cache[key] = torch.as_tensor(getattr(self, name)).to(device)
        return cache[key]

    # --- persistence ---------------------------------------------------------------------
    def state(self) -> dict:
        st = {"basis_mean": torch.from_numpy(self.mean), "basis_scale": torch.from_numpy(self.scale)}
        if self.streamed:
            st["basis_W"] = torch.from_numpy(self.W)
        else:
            st["basis_V"] = torch.from_numpy(self.V)
        if self.lower is not None:
            st["basis_lower"] = torch.from_numpy(self.lower)
        return st

    @classmethod
    def from_state(cls, state: dict) -> "SpanBasis":
        lower, V, W = state.get("basis_lower"), state.get("basis_V"), state.get("basis_W")
        if V is None and W is None:
            raise KeyError("basis_V")
        return cls(state["basis_mean"].numpy(), state["basis_scale"].numpy(), None if V is None else V.numpy(),
                   None if lower is None else lower.numpy(), None if W is None else W.numpy())
