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


def reconstruction(reducer, study, block_rows=None) -> dict:
    sum_raw = sum_std = 0.0
    worst_raw = worst_std = 0.0
    n = 0
    for _, X, Xr in _decoded_blocks(reducer, study, block_rows):
        d = (Xr.astype(np.float64) - X)
        raw = (d**2).mean(1)
        std = ((d / reducer.basis.scale) ** 2).mean(1)
        sum_raw += raw.sum()
        sum_std += std.sum()
        worst_raw, worst_std = max(worst_raw, raw.max()), max(worst_std, std.max())
        n += len(X)
    return {"mse_raw": sum_raw / n, "mse_std": sum_std / n, "max_mse_raw": worst_raw, "max_mse_std": worst_std}


def function_space(reducer, study, split="test", eval_samples=2000, device="cpu", block_rows=None) -> dict:
    """Loss/accuracy of every original and decoded checkpoint on the same fixed evaluation subset."""
    from ..evaluation.one_model import evaluate_model, subset
    from ..networks.datasets import load_dataset
    from ..networks.device import resolve_device

    dev = resolve_device(device)
    x, y = subset(*load_dataset(study.dataset_spec).split(split), eval_samples)
    x, y = x.to(dev), y.to(dev)
    model = study_model(study).to(dev)
    orig, dec = [], []
    for _, X, Xr in _decoded_blocks(reducer, study, block_rows):
        for a, b in zip(X, Xr):
            study.layout.load_into(model, torch.from_numpy(a).to(dev))
            orig.append(evaluate_model(model, x, y, device=dev))
            study.layout.load_into(model, torch.from_numpy(np.ascontiguousarray(b)).to(dev))
            dec.append(evaluate_model(model, x, y, device=dev))
    orig, dec = np.array(orig), np.array(dec)
    rel = np.abs(dec[:, 0] - orig[:, 0]) / np.maximum(orig[:, 0], 1e-12)
    return {"split": split, "eval_samples": int(len(x)), "loss_gap_mean": float(rel.mean()),
            "loss_gap_median": float(np.median(rel)), "loss_gap_max": float(rel.max()), "within_1pct": float((rel <= 0.01).mean()),
            "acc_gap_max": float(np.abs(dec[:, 1] - orig[:, 1]).max()),
            "loss_original": orig[:, 0].tolist(), "loss_decoded": dec[:, 0].tolist()}


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
    out = {"reconstruction": reconstruction(reducer, study)}
    if function:
        fs = function_space(reducer, study, split=split, eval_samples=eval_samples, device=device)
        out["function"] = {k: v for k, v in fs.items() if k not in ("loss_original", "loss_decoded")}
    C = getattr(reducer, "coords_", None)
    if C is None:
        C = np.concatenate([reducer.basis.to_coords(B) for _, B in study.iter_params()])
    out["structure"] = structure(C, reducer.transform(study), study)
    return out
