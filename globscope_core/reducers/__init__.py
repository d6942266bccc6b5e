"""Reducers: map flattened checkpoints to a 2D/3D latent space and back (see base.py)."""
from __future__ import annotations

from .base import REDUCER_KINDS, Reducer, load_reducer, reducer_path, study_id
from . import pca  # noqa: F401  (registers "pca")


def fit_reducer(study, kind: str, dim: int, save: bool = True, **config) -> Reducer:
    """Fit a reducer of ``kind`` on every checkpoint of ``study`` and save it to STUDY/reducers/."""
    from ..errors import GlobScopeError

    if kind not in REDUCER_KINDS:
        raise GlobScopeError(f"unknown reducer '{kind}'; choose one of {', '.join(sorted(REDUCER_KINDS))}")
    r = REDUCER_KINDS[kind](dim=dim, **config)
    r.fit(study)
    r.study_id = study_id(study)
    if save:
        r.save(reducer_path(study.dir, r.name))
    return r


__all__ = ["REDUCER_KINDS", "Reducer", "fit_reducer", "load_reducer", "reducer_path", "study_id"]
