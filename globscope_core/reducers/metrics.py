"""How well a fitted reducer keeps the checkpoints: reconstruction, function space, structure.

All on the study it was fitted on, streamed in row blocks:
  reconstruction  mean squared error of decode(encode(x)) - x, in raw parameters and in standardized
                  coordinates (each parameter divided by its spread across checkpoints: the poster's
                  "normalized parameter space"), mean over all checkpoints and worst checkpoint;
  function space  loss and accuracy of every decoded checkpoint vs. the original, on the same
                  evaluation subset: relative loss gap |l_dec - l| / l (mean, max, fraction within 1%);
  structure       trustworthiness (are latent neighbours true neighbours) and continuity (are true
                  neighbours kept as latent neighbours) with k neighbours, Spearman rank correlation of
                  all pairwise distances (standardized space vs latent), and ``finals_apart``: the
                  fraction of pairs of runs whose final checkpoints stay apart in the latent space,
                  i.e. are farther from each other than either is from its own run's previous
                  checkpoint (runs that ended in different places must not be merged by the map).
"""
from __future__ import annotations

import numpy as np
import torch

from ..networks.models import study_model
from .budget import decode_rows, work_rows


def _decoded_blocks(reducer, study, block_rows):
    """(rows, X, decode(encode(X))) block by block. A streamed basis reads the whole study for every decode, so it
    decodes ``decode_rows`` checkpoints per pass (budget.py) and hands them out in the usual small blocks."""
    block_rows = block_rows or work_rows(study.n_params)
    known = reducer.fitted_latent(study) if hasattr(reducer, "fitted_latent") else None
    if known is None:
        for idx, X in study.iter_params(block_rows):
            yield idx, X, reducer.inverse_transform(reducer.transform(X))
        return
    group = decode_rows(study.n_params, study.n_checkpoints)
    for g in range(0, study.n_checkpoints, group):
        rows = np.arange(g, min(study.n_checkpoints, g + group))
        decoded = reducer.inverse_transform(known[rows])  # one pass over the study for the whole group
        for s in range(0, len(rows), block_rows):
            idx = rows[s : s + block_rows]
            yield idx, study.read_params(idx), decoded[idx - g]
        del decoded  # before the next group is decoded: never two groups at once


class _Reconstruction:
    def __init__(self, reducer, study, **_):
        self.scale = reducer.basis.scale
        self.sum_raw = self.sum_std = self.worst_raw = self.worst_std = 0.0
        self.n = 0

    def add(self, X, Xr):
        d = (Xr.astype(np.float64) - X)
        raw = (d**2).mean(1)
        std = ((d / self.scale) ** 2).mean(1)
        self.sum_raw += raw.sum()
        self.sum_std += std.sum()
        self.worst_raw, self.worst_std = max(self.worst_raw, raw.max()), max(self.worst_std, std.max())
        self.n += len(X)

    def result(self) -> dict:
        return {"mse_raw": self.sum_raw / self.n, "mse_std": self.sum_std / self.n, "max_mse_raw": self.worst_raw,
                "max_mse_std": self.worst_std}


class _FunctionSpace:
    """Loss/accuracy of every original and decoded checkpoint on the same fixed evaluation subset."""

    def __init__(self, reducer, study, split="test", eval_samples=2000, device="cpu"):
        from ..evaluation.one_model import subset
        from ..networks.datasets import load_dataset
        from ..networks.device import resolve_device

        self.dev = resolve_device(device)
        x, y = subset(*load_dataset(study.dataset_spec).split(split), eval_samples)
        self.x, self.y, self.split = x.to(self.dev), y.to(self.dev), split
        self.model, self.layout = study_model(study).to(self.dev), study.layout
        self.orig, self.dec = [], []

    def add(self, X, Xr):
        from ..evaluation.one_model import evaluate_model

        for a, b in zip(X, Xr):
            for w, out in ((a, self.orig), (np.ascontiguousarray(b), self.dec)):
                self.layout.load_into(self.model, torch.from_numpy(w).to(self.dev))
                out.append(evaluate_model(self.model, self.x, self.y, device=self.dev))

    def result(self) -> dict:
        orig, dec = np.array(self.orig), np.array(self.dec)
        rel = np.abs(dec[:, 0] - orig[:, 0]) / np.maximum(orig[:, 0], 1e-12)
        return {"split": self.split, "eval_samples": int(len(self.x)), "loss_gap_mean": float(rel.mean()),
                "loss_gap_median": float(np.median(rel)), "loss_gap_max": float(rel.max()),
                "within_1pct": float((rel <= 0.01).mean()), "acc_gap_max": float(np.abs(dec[:, 1] - orig[:, 1]).max()),
                "loss_original": orig[:, 0].tolist(), "loss_decoded": dec[:, 0].tolist()}


def _scored(reducer, study, scores, block_rows=None, **kw) -> list:
    """Every score of ``scores`` (the classes above) from one decoding of the study: with a streamed basis that is
    a pass over the study per group of checkpoints, so the scores share it."""
    accs = [cls(reducer, study, **kw) for cls in scores]
    for _, X, Xr in _decoded_blocks(reducer, study, block_rows):
        for acc in accs:
            acc.add(X, Xr)
    return [acc.result() for acc in accs]


def reconstruction(reducer, study, block_rows=None) -> dict:
    return _scored(reducer, study, [_Reconstruction], block_rows)[0]


def function_space(reducer, study, split="test", eval_samples=2000, device="cpu", block_rows=None) -> dict:
    return _scored(reducer, study, [_FunctionSpace], block_rows, split=split, eval_samples=eval_samples,
                   device=device)[0]


def continuity(X, Z, n_neighbors=5) -> float:
    from sklearn.manifold import trustworthiness

    return float(trustworthiness(Z, X, n_neighbors=n_neighbors))


def structure(C, Z, study=None, n_neighbors=None) -> dict:
    """C: the checkpoints in span-basis coordinates (distances = standardized distances), Z: latent."""
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr
    from sklearn.manifold import trustworthiness

    N = len(C)
    k = n_neighbors or max(1, min(10, N // 2 - 1))
    out = {"n_neighbors": k, "trustworthiness": float(trustworthiness(C, Z, n_neighbors=k)),
           "continuity": continuity(C, Z, k),
           "distance_spearman": float(spearmanr(pdist(C), pdist(Z)).statistic)}
    if study is not None:
        out["finals_apart"] = finals_apart(study, Z)
    return out


def finals_apart(study, Z):
    finals, prev = {}, {}
    for r in range(len(study.runs)):
        rows = study.run_rows(r)
        if len(rows) >= 2:
            finals[r], prev[r] = rows[-1], rows[-2]
    runs = sorted(finals)
    if len(runs) < 2:
        return None
    step = {r: np.linalg.norm(Z[finals[r]] - Z[prev[r]]) for r in runs}
    pairs = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]]
    apart = [np.linalg.norm(Z[finals[a]] - Z[finals[b]]) > max(step[a], step[b]) for a, b in pairs]
    return float(np.mean(apart))


def evaluate_reducer(reducer, study, function=True, split="test", eval_samples=2000, device="cpu") -> dict:
    """Every metric of a reducer just fitted on ``study`` (uses its in-memory coordinates)."""
    if function:  # one decoding for both
        rec, fs = _scored(reducer, study, [_Reconstruction, _FunctionSpace], split=split, eval_samples=eval_samples,
                          device=device)
        out = {"reconstruction": rec,
               "function": {k: v for k, v in fs.items() if k not in ("loss_original", "loss_decoded")}}
    else:
        out = {"reconstruction": reconstruction(reducer, study)}
    C = getattr(reducer, "coords_", None)
    if C is None:
        C = np.concatenate([reducer.basis.to_coords(B) for _, B in study.iter_params()])
    out["structure"] = structure(C, reducer.transform(study), study)
    return out
