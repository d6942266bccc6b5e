"""Held-out fidelity: how well a reducer decodes checkpoints it was NOT fitted on.

Fitted-checkpoint reconstruction measures memory; a landscape is drawn between checkpoints, so the
map must also be right there. The protocol (fixed, no randomness in the split):
  split        in every run (checkpoints in step order, positions 0..n-1) the checkpoints at positions
               3, 7, 11, ... (every 4th) are held out, never positions 0-1 nor the last one; both trajectory
               neighbours of a held-out checkpoint (positions i-1, i+1) are therefore always fitted;
  fit          the reducer is fitted on the other rows only (basis included: the held-out rows are not
               even in the span the reducer sees), with the same config and seed as the real fit;
  score        each held-out checkpoint is encoded and decoded; reconstruction MSE in raw parameters and
               standardized by the per-parameter spread of the FITTED rows (the basis' scale), and the
               relative test-loss gap |l_dec - l| / l on the fixed evaluation subset
               (``evaluation.many_models.eval_data``: ``split``, ``eval_samples``, seed 0);
  reference    "two-neighbour": each held-out checkpoint replaced by the mean of its two fitted
               trajectory neighbours in weight space: no map at all, and the floor a smooth map through
               the trajectory can reach (the SGD noise of the held-out step is in no fitted checkpoint).
The saved reducer is then refitted on every checkpoint by the caller (stages.fit.fit_study).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from .budget import held_out_group, work_rows

PROTOCOL = ("in each run (step order), checkpoints at positions 3, 7, 11, ... (every 4th) are held out, never "
            "the first two nor the last; the reducer (basis included) is fitted on the rest with its usual seed, "
            "each held-out checkpoint is encoded and decoded; standardized = divided by the fitted rows' "
            "per-parameter spread; loss gap = |l_dec - l| / l on the fixed evaluation subset; reference: the mean "
            "of the two fitted trajectory neighbours in weight space")
EVERY = 4
FIRST = 3  # positions 3, 7, 11, ...: never 0 or 1, and i % 4 == 3 keeps both neighbours fitted


def holdout_split(study, every: int = EVERY) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit_rows, held_rows, neighbours [len(held), 2]) of the study's rows (all labels, step order)."""
    held, nb = [], []
    for r in range(len(study.runs)):
        rows = study.run_rows(r, label=None)
        for i in range(FIRST, len(rows) - 1, every):
            held.append(rows[i])
            nb.append((rows[i - 1], rows[i + 1]))
    held = np.asarray(held, np.int64)
    fit = np.setdiff1d(np.arange(study.n_checkpoints), held)
    return fit, held, np.asarray(nb, np.int64).reshape(-1, 2)


MIN_RUN_CHECKPOINTS = FIRST + 2  # position 3 held out needs a checkpoint after it: 5 checkpoints


def nothing_to_hold_out(study) -> str | None:
    """Why the study has no checkpoint to hold out (no run of 5 or more checkpoints), or None when it has one."""
    if len(holdout_split(study)[1]):
        return None
    longest = max((len(study.run_rows(r, label=None)) for r in range(len(study.runs))), default=0)
    return (f"no run has {MIN_RUN_CHECKPOINTS} or more checkpoints (the longest has {longest}; held out are the "
            f"4th, 8th, ... of a run, never its last)")


class RowSubset:
    """Some rows of a study, with the streaming interface reducers fit on (basis.SpanBasis.fit)."""

    def __init__(self, study, rows):
        self.study, self.rows = study, np.asarray(rows, np.int64)
        self.n_checkpoints, self.n_params = len(self.rows), study.n_params
        self.layout = study.layout
        self.h5_path = f"{study.h5_path} (held-out split: {len(self.rows)} fitted rows)"

    def iter_params(self, block_rows=None, rows=None, reuse: bool = False):
        # the reducers index their own rows 0..n-1 (Gram matrix, basis pass): yield subset positions
        pos = np.arange(len(self.rows)) if rows is None else np.asarray(rows, np.int64)
        off = 0
        for idx, B in self.study.iter_params(block_rows, rows=self.rows[pos], reuse=reuse):
            yield pos[off : off + len(idx)], B
            off += len(idx)


def _gaps(orig, dec) -> dict:
    rel = np.abs(dec - orig) / np.maximum(orig, 1e-12)
    rel = np.where(np.isfinite(rel), rel, np.inf)
    return {"loss_gap_mean": float(rel.mean()), "loss_gap_median": float(np.median(rel)),
            "loss_gap_max": float(rel.max())}


class HeldOutScorer:
    """Scores decoded held-out rows against the originals (one instance per study and split)."""

    def __init__(self, study, split="test", eval_samples=2000, device="cpu", every=EVERY, block_rows=None):
        from ..evaluation.many_models import BatchedEvaluator, eval_data
        from ..networks.device import resolve_device

        self.study = study
        self.fit_rows, self.held_rows, self.neighbours = holdout_split(study, every)
        x, y = eval_data(study, split, eval_samples, seed=0)
        self.ev = BatchedEvaluator(study.model_spec, x, y, device=resolve_device(device), layout=study.layout)
        self.block_rows = block_rows or work_rows(study.n_params)  # float64 differences: ~8x a block
        self._two_neighbour = {}  # two-neighbour scores by standardization (see score_two_neighbour)
        self.protocol = {"rule": PROTOCOL, "every": every, "first_position": FIRST,
                         "held_out": int(len(self.held_rows)), "fitted": int(len(self.fit_rows)),
                         "split": split, "eval_samples": int(len(x)), "eval_seed": 0}
        self.orig_loss = np.concatenate([self.ev.evaluate(torch.from_numpy(B))[0]
                                         for _, B in self._blocks(self.held_rows)]) if len(self.held_rows) else None

    def _blocks(self, rows, block_rows=None):
        """(positions in ``rows``, the rows) ``block_rows`` at a time."""
        block_rows = block_rows or self.block_rows
        for s in range(0, len(rows), block_rows):
            yield slice(s, s + block_rows), self.study.read_params(rows[s : s + block_rows])

    def score(self, decode, scale, group_rows=None) -> dict:
        """``decode(positions, X_held) -> decoded [b, P]`` for ``group_rows`` held-out rows at a time (default: a
        work block; a streamed basis reads the whole study per decode, so it takes as many rows as it can);
        ``scale`` [P] standardizes."""
        raw = std = 0.0
        dec_loss = []
        for sl, G in self._blocks(self.held_rows, group_rows):
            D = np.asarray(decode(sl, G), np.float32)
            for s in range(0, len(G), self.block_rows):  # float64 differences a work block at a time
                d = D[s : s + self.block_rows].astype(np.float64) - G[s : s + self.block_rows]
                raw += (d**2).mean(1).sum()
                std += ((d / scale) ** 2).mean(1).sum()
                del d
                dec_loss.append(self.ev.evaluate(torch.from_numpy(np.ascontiguousarray(D[s : s + self.block_rows])))[0])
            del D, G  # before the next group is read: one group and its decoded copy at a time
        n = len(self.held_rows)
        return {"mse_raw": raw / n, "mse_std": std / n, **_gaps(self.orig_loss, np.concatenate(dec_loss))}

    def score_reducer(self, reducer) -> dict:
        group = None
        if getattr(getattr(reducer, "basis", None), "streamed", False):
            group = held_out_group(self.study.n_params, len(self.held_rows))
        return self.score(lambda sl, X: reducer.inverse_transform(reducer.transform(X)), reducer.basis.scale, group)

    def score_two_neighbour(self, scale) -> dict:
        # compare asks once per reducer; with the same standardization the reference is the same: read it once
        key = hashlib.sha1(np.ascontiguousarray(scale, dtype=np.float64)).hexdigest()
        if key not in self._two_neighbour:
            self._two_neighbour[key] = self._score_two_neighbour(scale)
        return dict(self._two_neighbour[key])

    def _score_two_neighbour(self, scale) -> dict:
        nb = self.neighbours

        def mean_of_neighbours(sl, X):
            return 0.5 * (self.study.read_params(nb[sl, 0]).astype(np.float64) + self.study.read_params(nb[sl, 1]))

        return self.score(mean_of_neighbours, scale)


def fit_held_out(study, kind, dim, progress=False, **config):
    """A reducer of ``kind`` fitted on the split's fitted rows only (not saved)."""
    from ..errors import GlobScopeError
    from .base import REDUCER_KINDS

    fit_rows, held, _ = holdout_split(study)
    if len(held) == 0:
        raise GlobScopeError(f"{study.h5_path}: nothing to hold out: {nothing_to_hold_out(study)}")
    r = REDUCER_KINDS[kind](dim=dim, **config)
    r.fit(RowSubset(study, fit_rows), progress=progress)
    r.fit_rows_ = fit_rows  # which study rows it saw (tests check the held-out rows are not among them)
    return r
