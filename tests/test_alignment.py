"""Alignment (alignment/, stages/align.py): permutation specs, weight/activation matching, aligned studies (issue 8)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import random_perms
from torch import nn

from globscope_core import cli
from globscope_core.alignment.matching import ActivationMatching, WeightMatching
from globscope_core.alignment.permutation import (
    PermutationSpec,
    conv,
    dense,
    flat_index,
    norm,
    permute_state,
    spec_for_model,
)
from globscope_core.evaluation.one_model import evaluate_model, subset
from globscope_core.evaluation.paths import barrier
from globscope_core.networks.datasets import load_dataset
from globscope_core.networks.models import build_model, make_spec, study_model
from globscope_core.stages.align import align_study, load_permutations
from globscope_core.storage.state_layout import StateLayout
from globscope_core.storage.study import Study


class ResCNN(nn.Module):
    """Conv + BatchNorm + one residual block + linear head: proves the spec format beyond MLPs.

    The residual stream (stem output, block output, skip) shares one permutation ``P_res``.
    """

    def __init__(self, c=6, classes=10):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c + 2, 3, padding=1, bias=False), nn.BatchNorm2d(c + 2)
        self.conv2, self.bn2 = nn.Conv2d(c + 2, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu0, self.relu1, self.relu2 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        h = self.relu0(self.bn0(self.conv0(x)))
        h = self.relu2(h + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(h))))))
        return self.fc(h.mean((2, 3)))

    def permutation_spec(self) -> PermutationSpec:
        axes = {**conv("conv0", None, "P_res"), **norm("bn0", "P_res"),
                **conv("conv1", "P_res", "P_b"), **norm("bn1", "P_b"),
                **conv("conv2", "P_b", "P_res"), **norm("bn2", "P_res"), **dense("fc", "P_res", None)}
        return PermutationSpec(axes, {"P_res": "relu2", "P_b": "relu1"})


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


def _models():
    """(name, model, spec, input batch) for every architecture with a permutation spec."""
    torch.manual_seed(0)
    out = []
    for name, kw, shape in (("mlp", {"widths": [32, 16, 24]}, (1, 8, 8)), ("mnist-mlp", {}, (1, 28, 28))):
        spec_json = make_spec(name, shape, 10, **kw)
        model = build_model(spec_json)
        out.append((name, model, spec_for_model(spec_json, StateLayout.from_module(model)), torch.randn(64, *shape)))
    model = _randomize_bn(ResCNN())
    spec = spec_for_model({"name": "tests:ResCNN"}, StateLayout.from_module(model), model)
    out.append(("rescnn", model, spec, torch.randn(16, 1, 8, 8)))
    return out


@pytest.mark.parametrize("case", _models(), ids=lambda c: c[0])
def test_permuted_model_computes_the_same_outputs(case):
    _, model, spec, x = case
    model.eval()
    layout = StateLayout.from_module(model)
    perms = random_perms(spec, layout, seed=1)
    assert all((q != np.arange(len(q))).any() for q in perms.values())
    with torch.no_grad():
        ref = model(x)
        flat = layout.flatten(model.state_dict())
        permuted_flat = torch.from_numpy(flat.numpy()[flat_index(spec, layout, perms)])
        assert not torch.equal(permuted_flat, flat)  # the weights did move
        twin = build_like(model)
        layout.load_into(twin, permuted_flat)
        out = twin.eval()(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()
    # the state-dict path agrees with the flat gather
    state = permute_state(spec, perms, model.state_dict())
    assert torch.equal(layout.flatten(state), permuted_flat)


def build_like(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("case", _models(), ids=lambda c: c[0])
def test_weight_matching_recovers_a_known_permutation(case):
    _, model, spec, _ = case
    layout = StateLayout.from_module(model)
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    perms = random_perms(spec, layout, seed=2)
    shuffled = permute_state(spec, perms, state)
    found = WeightMatching(spec, seed=3).find(state, shuffled)
    for p, q in perms.items():
        # unit i of the aligned model is unit found[i] of the shuffled one = unit q[found[i]] of the original
        assert np.array_equal(q[found[p]], np.arange(len(q))), p
    restored = permute_state(spec, found, shuffled)
    assert all(torch.equal(restored[k], state[k]) for k in state)


def test_activation_matching_recovers_a_known_permutation():
    _, model, spec, x = _models()[2]  # the conv + BN + residual model
    layout = StateLayout.from_module(model)
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    perms = random_perms(spec, layout, seed=4)
    found = ActivationMatching(spec, lambda: build_like(model), x).find(state, permute_state(spec, perms, state))
    for p, q in perms.items():
        assert np.array_equal(q[found[p]], np.arange(len(q))), p


def test_barrier_definition():
    al = np.linspace(0, 1, 5)
    assert barrier(np.array([1.0, 2.0, 3.0, 2.5, 2.0]), al)[0] == pytest.approx(3.0 - 1.5)
    assert barrier(np.array([1.0, 1.25, 1.5, 1.75, 2.0]), al)[0] == pytest.approx(0.0)


@pytest.mark.parametrize("method", ["weight-matching", "activation-matching", "weight-matching+sinkhorn"])
def test_align_study_keeps_losses_and_trajectories(tiny_study, tmp_path, method):
    out = tmp_path / "aligned"
    rep = align_study(tiny_study.dir, str(out), reference=1, method=method, alphas=9, progress=False)
    al = Study.open(str(out))
    assert len(al.runs) == len(tiny_study.runs) and al.n_checkpoints == tiny_study.n_checkpoints
    assert al.runs[0]["aligned_to"] == 1 and al.runs[0]["seed"] == tiny_study.runs[0]["seed"]

    # alignment never changes a run's loss: re-evaluate every aligned checkpoint
    ds = load_dataset(al.dataset_spec)
    ev = {"train": subset(ds.train_x, ds.train_y, 10000, seed=1), "test": subset(ds.test_x, ds.test_y, 10000, seed=2)}
    model = study_model(al)
    params = al.read_params()
    for row in range(al.n_checkpoints):
        al.layout.load_into(model, torch.from_numpy(params[row]))
        for split, (x, y) in ev.items():
            loss, acc = evaluate_model(model, x, y)
            assert loss == pytest.approx(tiny_study.metrics[f"{split}_loss"][row], rel=1e-5, abs=1e-6)
            assert acc == tiny_study.metrics[f"{split}_acc"][row]
    assert np.array_equal(al.metrics["train_loss"], tiny_study.metrics["train_loss"])

    # one permutation per run, applied to all its checkpoints; the reference is untouched
    raw = tiny_study.read_params()
    spec = spec_for_model(al.model_spec, al.layout)
    perms = load_permutations(str(out))
    for r in range(len(al.runs)):
        rows = al.run_rows(r)
        np.testing.assert_array_equal(params[rows], raw[rows][:, flat_index(spec, al.layout, perms[r])])
    assert np.array_equal(params[al.run_rows(1)], raw[tiny_study.run_rows(1)])

    # the report: runs other than the reference, aligned ones closer to it with a lower barrier
    saved = json.loads((out / "report.json").read_text())["align"]
    assert saved["method"] == method and [d["run"] for d in saved["runs"]] == [0, 2]
    assert os.path.getsize(out / saved["plot"]) > 1000
    for d in rep["runs"]:
        assert len(d["loss_before"]) == 9
        assert d["loss_after"][0] == pytest.approx(d["loss_before"][0], rel=1e-4)  # same model, permuted
        if method == "weight-matching":
            assert d["distance_after"] <= d["distance_before"] + 1e-6
    assert rep["mean_barrier_after"] < rep["mean_barrier_before"]


def test_align_cli_and_errors(tiny_study, tmp_path, capsys):
    out = tmp_path / "aligned"
    assert cli.main(["align", tiny_study.dir, "--reference", "0", "--out", str(out), "--alphas", "5"]) == 0
    assert "mean:" in capsys.readouterr().out
    before = open(out / "study.h5", "rb").read()
    # the same command again finds its finished work and redoes nothing
    assert cli.main(["align", tiny_study.dir, "--reference", "0", "--out", str(out), "--alphas", "5"]) == 0
    assert "done before, nothing redone" in capsys.readouterr().out
    # other settings into the same output: refused, one line, naming what differs
    assert cli.main(["align", tiny_study.dir, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already aligned with --alphas 5" in err and err.count("\n") == 1
    # a study that is not this source's alignment: refused
    assert cli.main(["align", str(out), "--out", str(out / "again")]) == 0
    capsys.readouterr()
    assert cli.main(["align", tiny_study.dir, "--out", str(out / "again")]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1
    assert open(out / "study.h5", "rb").read() == before
    assert cli.main(["align", tiny_study.dir, "--reference", "7", "--out", str(tmp_path / "x")]) == 2
    assert "--reference 7 is not a run" in capsys.readouterr().err
    assert cli.main(["align", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_model_without_spec_is_a_clear_error():
    from globscope_core.errors import GlobScopeError

    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(GlobScopeError, match="no permutation spec"):
        spec_for_model({"name": "somewhere:model"}, StateLayout.from_module(model))
    two = StateLayout.from_module(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
    bad = PermutationSpec({"0.weight": ("P", None), "1.weight": (None, "P"), "1.bias": ("P",)})  # 3 vs 2 units
    with pytest.raises(GlobScopeError, match="sizes 3 and 2"):
        bad.check(two)
    with pytest.raises(GlobScopeError, match="not a permutation"):
        good = PermutationSpec({"0.weight": ("P", None), "0.bias": ("P",), "1.weight": (None, "P")})
        flat_index(good, two, {"P": np.array([0, 0, 1])})


def test_compare_basins_before_and_after(study_copy, tmp_path, capsys):
    """The whole global view on both studies: fit, landscape, topology basins, side-by-side PNG."""
    out = tmp_path / "aligned"
    assert cli.main(["align", study_copy.dir, "--out", str(out), "--alphas", "5", "--compare-basins",
                     "--reducer", "pca", "--resolution", "9"]) == 0
    assert "basins of the final models" in capsys.readouterr().out
    sec = json.loads((out / "report.json").read_text())["align-basins-2d"]
    for key, d in (("raw", study_copy.dir), ("aligned", str(out))):
        assert 1 <= sec[key]["n_basins"] <= len(study_copy.runs)
        assert sorted(r for b in sec[key]["basins"] for r in b["runs"]) == list(range(len(study_copy.runs)))
        assert os.path.exists(os.path.join(d, "landscape-2d.vti"))
        assert os.path.exists(os.path.join(d, "topology-2d", "segmentation.vti"))
    assert sec["aligned"]["threshold"] == sec["raw"]["threshold"]  # one absolute threshold for both
    assert os.path.getsize(out / sec["image"]) > 5000
