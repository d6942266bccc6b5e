"""Reducers: map flattened checkpoints to a 2D/3D latent space and back (see base.py).

Kinds: ``ae`` (the autoencoder), ``pca``, ``kpca``, ``umap`` (baselines). Other stages use only
``load_reducer(study, "ae-2d")`` and the reducer's ``transform`` / ``inverse_transform`` /
``inverse_transform_torch``.
"""
from __future__ import annotations

import os

from ..storage.study_files import reducer_file
from . import ae, kpca, pca, umap_  # noqa: F401  (register the kinds)
from .base import REDUCER_KINDS, Reducer, SpanReducer, load_reducer, study_id


def fit_reducer(study, kind: str, dim: int, save: bool = True, progress: bool = False, plan=None,
                **config) -> Reducer:
    """Fit a reducer of ``kind`` on every checkpoint of ``study`` and save it to STUDY/reducers/.

    Nothing is written unless the fit succeeds (the file is written by temporary name + rename). ``plan``: the
    span basis' plan (budget.basis_plan) the caller printed; None: decided here, once, for the check and the fit.
    """
    from ..errors import GlobScopeError

    if kind not in REDUCER_KINDS:
        raise GlobScopeError(f"unknown reducer '{kind}'; choose one of {', '.join(sorted(REDUCER_KINDS))}")
    r = REDUCER_KINDS[kind](dim=dim, **config)
    if save:  # a read-only study directory is refused before the fit, not after it
        from ..storage.safe_write import check_writable

        check_writable(os.path.dirname(reducer_file(study.dir, r.name)), what=f"fit {r.name}")
    if isinstance(r, SpanReducer) and hasattr(study, "n_params"):
        plan = _check_memory(r, study, config, plan)
    r.fit(study, progress=progress, plan=plan) if isinstance(r, SpanReducer) else r.fit(study)
    r.study_id = study_id(study)
    if save:
        r.save(reducer_file(study.dir, r.name))
    return r


def _check_memory(r, study, config, plan=None):
    """Refuse, before any work, a fit that would not fit in memory (resources.py); returns the basis plan the
    estimate was made for, which the fit then follows."""
    from ..resources import require
    from .base import _variance_mask
    from .budget import basis_plan, estimate_fit

    rank, floor = config.get("max_rank"), _variance_mask(study) is not None
    plan = plan or basis_plan(study.n_params, study.n_checkpoints, rank, config.get("basis"), r.kind, floor)
    require(estimate_fit(study.n_params, study.n_checkpoints, config.get("block_rows"), rank, kind=r.kind,
                         floor=floor, streamed=plan.streamed, panel_bytes=plan.panel_bytes),
            f"fit {r.name} on {getattr(study, 'h5_path', 'the checkpoints')} ({study.n_checkpoints} checkpoints x "
            f"{study.n_params:,} parameters)", hint="keep fewer basis directions (--max-rank K)")
    return plan


__all__ = ["REDUCER_KINDS", "Reducer", "SpanReducer", "fit_reducer", "load_reducer", "study_id"]
