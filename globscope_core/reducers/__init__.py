"""Reducers: map flattened checkpoints to a 2D/3D latent space and back (see base.py).

Kinds: ``ae`` (the autoencoder), ``pca``, ``kpca``, ``umap`` (baselines). Other stages use only
``load_reducer(study, "ae-2d")`` and the reducer's ``transform`` / ``inverse_transform`` /
``inverse_transform_torch``.
"""
from __future__ import annotations

from .base import REDUCER_KINDS, Reducer, SpanReducer, load_reducer, reducer_path, study_id
from . import ae, kpca, pca, umap_  # noqa: F401  (register the kinds)


def fit_reducer(study, kind: str, dim: int, save: bool = True, progress: bool = False, **config) -> Reducer:
    """Fit a reducer of ``kind`` on every checkpoint of ``study`` and save it to STUDY/reducers/.

    Nothing is written unless the fit succeeds (the file is written by temporary name + rename).
    """
    from ..errors import GlobScopeError

    if kind not in REDUCER_KINDS:
        raise GlobScopeError(f"unknown reducer '{kind}'; choose one of {', '.join(sorted(REDUCER_KINDS))}")
    r = REDUCER_KINDS[kind](dim=dim, **config)
    r.fit(study, progress=progress) if isinstance(r, SpanReducer) else r.fit(study)
    r.study_id = study_id(study)
    if save:
        r.save(reducer_path(study.dir, r.name))
    return r


__all__ = ["REDUCER_KINDS", "Reducer", "SpanReducer", "fit_reducer", "load_reducer", "reducer_path", "study_id"]
