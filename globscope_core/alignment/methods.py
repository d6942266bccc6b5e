"""The alignment methods by name: ``make_aligner(method, spec, study, **options) -> Aligner``.

A new method registers a factory ``(spec, study, **options) -> Aligner`` in ``ALIGNERS``.
"""
from __future__ import annotations

from ..errors import GlobScopeError
from ..networks.models import study_model
from .matching import ActivationMatching, Aligner, WeightMatching
from .permutation import PermutationSpec


def _make_weight_matching(spec, study, max_iter=100, seed=0, **_):
    return WeightMatching(spec, max_iter=max_iter, seed=seed)


def _make_activation_matching(spec, study, act_samples=1024, seed=0, device="cpu", **_):
    from ..evaluation.one_model import subset
    from ..networks.datasets import load_dataset

    ds = load_dataset(study.dataset_spec)
    x, _ = subset(ds.train_x, ds.train_y, act_samples, seed=seed)
    return ActivationMatching(spec, lambda: study_model(study), x, device=device)


def _make_deep_align(spec, study, **options):
    from .deep_align_make import make_deep_align  # torch training code, only when asked for

    return make_deep_align(spec, study, **options)


def _make_sinkhorn(spec, study, seed=0, device="cpu", start=None, sinkhorn_samples=4096, sinkhorn_steps=300, **_):
    from ..evaluation.one_model import subset
    from ..networks.datasets import load_dataset
    from .sinkhorn import SinkhornRefinement

    ds = load_dataset(study.dataset_spec)
    x, y = subset(ds.train_x, ds.train_y, sinkhorn_samples, seed=seed)
    return SinkhornRefinement(spec, lambda: study_model(study), x, y, start=start, steps=sinkhorn_steps, seed=seed,
                              device=device)


def _make_loss_guided(spec, study, start, seed=0, device="cpu", loss_samples=2048, **_):
    from ..evaluation.one_model import subset
    from ..networks.datasets import load_dataset
    from .loss_guided import LossGuidedMatching

    ds = load_dataset(study.dataset_spec)
    x, y = subset(ds.train_x, ds.train_y, loss_samples, seed=seed)
    return LossGuidedMatching(spec, lambda: study_model(study), x, y, start=start, device=device)


ALIGNERS = {"weight-matching": _make_weight_matching, "activation-matching": _make_activation_matching,
            "deep-align": _make_deep_align,
            "deep-align+wm": lambda spec, study, **o: _make_deep_align(spec, study, refine=True, **o),
            "sinkhorn": _make_sinkhorn,  # from the identity, as Pena et al.
            "deep-align+sinkhorn": lambda spec, study, **o: _make_sinkhorn(
                spec, study, start=_make_deep_align(spec, study, **o), **o),
            "weight-matching+sinkhorn": lambda spec, study, **o: _make_sinkhorn(
                spec, study, start=_make_weight_matching(spec, study, **o), **o),
            # refined by a descent of the loss between the models (loss_guided.py)
            "deep-align+loss": lambda spec, study, **o: _make_loss_guided(
                spec, study, start=_make_deep_align(spec, study, **o), **o),
            "weight-matching+loss": lambda spec, study, **o: _make_loss_guided(
                spec, study, start=_make_weight_matching(spec, study, **o), **o)}


def make_aligner(method: str, spec: PermutationSpec, study, **options) -> Aligner:
    if method not in ALIGNERS:
        raise GlobScopeError(f"unknown alignment method '{method}'; choose one of {', '.join(ALIGNERS)}")
    return ALIGNERS[method](spec, study, **options)
