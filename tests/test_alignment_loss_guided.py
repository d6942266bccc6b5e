"""Loss-guided weight matching (alignment/loss_guided.py; issue 21.1): a descent of the loss between two models
over hard permutations, refining weight matching or DEEP-ALIGN."""
from __future__ import annotations

import numpy as np
import torch

from globscope_core.alignment.loss_guided import POINTS
from globscope_core.alignment.matching import WeightMatching
from globscope_core.alignment.methods import make_aligner
from globscope_core.alignment.permutation import flat_index, permute_state, spec_for_model
from globscope_core.alignment.sinkhorn import segment_loss
from globscope_core.evaluation.many_models import eval_data
from globscope_core.evaluation.paths import barrier, interpolation_curve
from globscope_core.networks.models import study_model


def _state(study, row):
    return study.layout.unflatten(torch.from_numpy(study.read_params([row])[0]))


def test_refinement_lowers_weight_matchings_loss_and_barrier(wide_pair):
    wide, spec, (ra, A), (rb, B) = wide_pair
    wm = WeightMatching(spec).find(A, B)
    refiner = make_aligner("weight-matching+loss", spec, wide, seed=0)
    assert refiner.name == "weight-matching+loss"
    perms = refiner.find(A, B)
    for p, v in perms.items():  # permutations, of the right size
        assert sorted(v.tolist()) == list(range(len(wm[p])))
    assert refiner.moves > 0
    # what it descends: the loss at POINTS of the segment, on its own batch -- lower than weight matching's
    model = study_model(wide).eval()
    with torch.no_grad():
        def objective(pm):
            return float(segment_loss(model, A, permute_state(spec, pm, B), POINTS, refiner.x, refiner.y))

        assert objective(perms) < objective(wm)
    # and the barrier, on train samples and on test samples it never saw
    t = np.linspace(0, 1, 11)
    a, b = wide.read_params([ra])[0], wide.read_params([rb])[0]

    def barrier_of(pm, split):
        x, y = eval_data(wide, split, 2000, seed=1)
        return barrier(interpolation_curve(wide, a, b[flat_index(spec, wide.layout, pm)], t, x, y), t)[0]

    assert barrier_of(perms, "train") < 0.8 * barrier_of(wm, "train")
    assert barrier_of(perms, "test") < barrier_of(wm, "test")
    # deterministic: the same permutations again
    again = make_aligner("weight-matching+loss", spec, wide, seed=0).find(A, B)
    for p in perms:
        np.testing.assert_array_equal(again[p], perms[p])


def test_a_start_that_cannot_be_improved_is_returned(tiny_study):
    """An exactly permuted copy: the start (weight matching) finds the inverse, where the segment is one model and
    its loss the lowest the pair can have along it; no candidate lowers it, and the start comes back."""
    spec = spec_for_model(tiny_study.model_spec, tiny_study.layout)
    A = _state(tiny_study, tiny_study.run_rows(0)[-1])
    rng = np.random.default_rng(0)
    perms = {p: rng.permutation(n) for p, n in spec.identity(tiny_study.layout).items()}
    B = permute_state(spec, perms, A)
    refiner = make_aligner("weight-matching+loss", spec, tiny_study, seed=0)
    found = refiner.find(A, B)
    assert refiner.moves == 0
    for p in found:
        assert np.array_equal(perms[p][found[p]], np.arange(len(found[p])))
