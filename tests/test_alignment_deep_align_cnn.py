"""DEEP-ALIGN beyond MLPs (alignment/deep_align_spec*.py, issue 21): the spec-driven encoder on a BatchNorm CNN
and a ResNet-20 -- equivariance, recovery of permuted copies, the CLI on a CNN study, refusal of an MLP aligner."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import one_line_error, random_perms, run_cli

from globscope_core import cli
from globscope_core.alignment.deep_align import load_aligner_file
from globscope_core.alignment.deep_align_spec import (
    DeepAlignSpec,
    SpecAlignNet,
    group_sizes,
    onehot,
    permute_batch,
    spec_tensors,
    state_batch,
)
from globscope_core.alignment.deep_align_spec_train import SpecPairSampler, ensure_spec_aligner, train_spec_aligner
from globscope_core.alignment.deep_align_train import train_aligner
from globscope_core.alignment.methods import make_aligner
from globscope_core.alignment.permutation import PermutationSpec, flat_index, permute_state, spec_for_model
from globscope_core.errors import GlobScopeError
from globscope_core.networks import datasets
from globscope_core.networks.models import build_model, make_spec, study_model
from globscope_core.stages.train import train_study
from globscope_core.storage.state_layout import Entry, StateLayout
from globscope_core.storage.study import Study

CNN = {"channels": [8, 16, 16], "hidden": 32, "batchnorm": True}  # 8x8 digits: 1x1 maps at the flatten
MODELS = {"cifar-cnn": ("cifar-cnn", CNN), "resnet20": ("resnet20", {"width": 4})}


def _random_model(name, kw):
    torch.manual_seed(0)
    model = build_model(make_spec(name, (1, 8, 8), 10, **kw))
    for m in model.modules():  # fresh BatchNorm layers are all ones and zeros: nothing to tell channels apart by
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.normal_()
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("case", list(MODELS))
def test_spec_encoder_is_equivariant(case):
    name, kw = MODELS[case]
    model = _random_model(name, kw)
    layout = StateLayout.from_module(model)
    spec = spec_for_model({"name": name}, layout)
    tensors = spec_tensors(spec, layout)
    net = SpecAlignNet(tensors, hidden=16, rounds=2).eval()
    perms = random_perms(spec, layout, seed=1)
    state = model.state_dict()
    a = state_batch(state, net.names)
    # the batched soft-permutation path agrees with the library's permute_state on hard permutations
    b = permute_batch(spec.axes, {p: onehot(torch.as_tensor(q)[None]) for p, q in perms.items()}, a)
    hard = permute_state(spec, perms, state)
    for n in net.names:
        torch.testing.assert_close(b[n][0], hard[n].float())
    with torch.no_grad():
        h, hp = net.encoder(a), net.encoder(b)
    assert set(h) == set(spec.perm_names)
    for g, q in perms.items():
        assert not torch.allclose(hp[g], h[g])  # the permutation did move the units
        torch.testing.assert_close(hp[g][0], h[g][0][q], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def cnn_study(tmp_path_factory):
    """3 runs of a BatchNorm CNN (8-16-16 channels, 32 hidden) on digits, trained by ``globscope train``."""
    path = tmp_path_factory.mktemp("cnn") / "study"
    rc, _, err = run_cli("train", "--dataset", "digits", "--model", "cifar-cnn",
                         *[a for k, v in CNN.items() for a in ("--model-arg", f"{k}={json.dumps(v)}")],
                         "--runs", 3, "--epochs", 3, "--eval-samples", 300, "--device", "cpu", "--out", path)
    assert rc == 0, err
    return Study.open(str(path))


@pytest.fixture(scope="module")
def resnet_study(tmp_path_factory):
    """3 runs of a ResNet-20 of width 4 on digits (17.6k parameters)."""
    return train_study(str(tmp_path_factory.mktemp("resnet") / "study"), datasets.make_spec("digits"), "resnet20",
                       {"width": 4}, runs=3, epochs=3, eval_samples=300, progress=False)


@pytest.mark.parametrize("which", ["cnn_study", "resnet_study"])
def test_permuted_copies_are_recovered_after_short_training(which, request, tmp_path):
    study = request.getfixturevalue(which)
    layout = study.layout
    spec = spec_for_model(study.model_spec, layout, study_model(study))
    net, config = train_spec_aligner(study, spec, str(tmp_path / "a.pt"), steps=40, progress=False, save_every=40)
    assert config["kind"] == "spec" and config["groups"] == sorted(spec.perm_names)
    aligner = DeepAlignSpec(spec, net, config)
    rng = np.random.default_rng(5)
    for r in range(len(study.runs)):
        ref = study.read_params([study.final_row(r)])[0]
        perms = {p: rng.permutation(n) for p, n in spec.identity(layout).items()}
        shuffled = ref[flat_index(spec, layout, perms)]
        found = aligner.find(layout.unflatten(torch.from_numpy(ref)), layout.unflatten(torch.from_numpy(shuffled)))
        for p, q in found.items():
            assert np.array_equal(perms[p][q], np.arange(len(q))), (r, p)  # the inverse of the one applied
        np.testing.assert_array_equal(shuffled[flat_index(spec, layout, found)], ref)
    # noisy near-copies (another checkpoint of the run, noise up to 0.3 RMS): nearly every unit is found
    sampler = SpecPairSampler(study, spec, config["tensors"], {**config["train"], "noise": 0.3, "near": 1},
                              torch.device("cpu"))
    a, b, targets = sampler.synthetic(np.random.default_rng(9), 8)
    with torch.no_grad():
        sims = net.similarities(a, b)
    rate = np.mean([(sims[g].argmax(2) == t).float().mean().item() for g, t in targets.items()])
    assert rate > 0.9, rate


def test_interrupted_spec_training_resumes_to_the_same_aligner(cnn_study, tmp_path):
    spec = spec_for_model(cnn_study.model_spec, cnn_study.layout)
    whole, _ = train_spec_aligner(cnn_study, spec, str(tmp_path / "whole.pt"), steps=12, progress=False, save_every=6)
    path = str(tmp_path / "part.pt")
    train_spec_aligner(cnn_study, spec, path, steps=6, progress=False, save_every=6)  # as if stopped after step 6
    resumed, config = ensure_spec_aligner(cnn_study, spec, path, steps=12, progress=False)
    assert load_aligner_file(path)["step"] == 12 and config["train"]["save_every"] == 6
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_a_saved_spec_aligner_for_another_state_layout_is_trained_again(cnn_study, tmp_path):
    """Reuse compares the spec aligner's own architecture keys (its tensors among them), not only the MLP's."""
    from globscope_core.alignment.deep_align import save_aligner

    spec = spec_for_model(cnn_study.model_spec, cnn_study.layout)
    path = str(tmp_path / "a.pt")
    net, config = train_spec_aligner(cnn_study, spec, path, steps=4, progress=False, save_every=4)
    other = {**config, "tensors": [[name, axes, [1] * len(shape)] for name, axes, shape in config["tensors"]]}
    save_aligner(path, other, net, step=4)
    _, again = ensure_spec_aligner(cnn_study, spec, path, steps=4, progress=False)
    assert again["tensors"] == config["tensors"]
    assert load_aligner_file(path)["config"]["tensors"] == config["tensors"]


def test_align_cli_on_a_cnn_study(cnn_study, tmp_path, capsys):
    src = tmp_path / "study"
    shutil.copytree(cnn_study.dir, src)
    reports = {}
    for method in ("deep-align", "deep-align+wm"):
        out = tmp_path / method
        assert cli.main(["align", str(src), "--method", method, "--out", str(out), "--alphas", "5",
                         "--eval-samples", "300", "--bn-samples", "300", "--aligner-steps", "40",
                         "--device", "cpu"]) == 0
        assert "mean:" in capsys.readouterr().out
        rep = reports[method] = json.loads((out / "report.json").read_text())["align"]
        assert rep["method"] == method and [d["run"] for d in rep["runs"]] == [1, 2]
        for d in rep["runs"]:  # the ends of the line are the same models, permuted: a symmetry, same loss
            assert d["loss_after"][-1] == pytest.approx(d["loss_before"][-1], rel=1e-4)
            assert d["loss_after"][0] == pytest.approx(d["loss_before"][0], rel=1e-4)
    blob = load_aligner_file(str(src / "aligners" / "deep-align.pt"))
    assert blob["step"] == 40 and blob["config"]["kind"] == "spec" and blob["config"]["model"] == "cifar-cnn"
    # aligned by deep-align, the line between independent runs is lower (statistics recomputed at every point)
    da = reports["deep-align"]
    assert da["mean_barrier_after_bn_recomputed"] < da["mean_barrier_before_bn_recomputed"], da
    # +wm starts weight matching from deep-align's permutations: never further from the reference
    for a, b in zip(da["runs"], reports["deep-align+wm"]["runs"]):
        assert b["distance_after"] <= a["distance_after"] + 1e-6


def test_an_aligner_of_another_kind_is_refused_in_one_line(cnn_study, tiny_study, tmp_path, capsys):
    mlp_file = tmp_path / "mlp.pt"
    train_aligner(tiny_study, str(mlp_file), steps=2, progress=False, save_every=2)
    rc = cli.main(["align", cnn_study.dir, "--method", "deep-align", "--aligner", str(mlp_file),
                   "--out", str(tmp_path / "a")])
    one_line_error(rc, capsys.readouterr().err, str(mlp_file), "MLP model 'mlp'", "'cifar-cnn'")
    assert not os.path.exists(tmp_path / "a")
    # and the other way: a CNN aligner for an MLP study
    spec = spec_for_model(cnn_study.model_spec, cnn_study.layout)
    cnn_file = tmp_path / "cnn.pt"
    train_spec_aligner(cnn_study, spec, str(cnn_file), steps=2, progress=False, save_every=2)
    rc = cli.main(["align", tiny_study.dir, "--method", "deep-align+wm", "--aligner", str(cnn_file),
                   "--out", str(tmp_path / "b")])
    one_line_error(rc, capsys.readouterr().err, str(cnn_file), "'cifar-cnn'", "'mlp'")


def test_a_spec_the_encoder_cannot_read_is_one_clear_error():
    spec = PermutationSpec({"w": ("P", "Q", "R")})  # a tensor with three permuted axes
    layout = StateLayout([Entry("w", (2, 3, 4), "float32", 0)])
    with pytest.raises(GlobScopeError, match=r"deep-align: tensor 'w' has more than two permuted axes.*resnet20"):
        spec_tensors(spec, layout)
    assert group_sizes([["w", ["P", None], [5, 2]]]) == {"P": 5}


@pytest.mark.parametrize("method", ["weight-matching+loss", "weight-matching+sinkhorn"])
def test_refinements_on_the_loss_work_on_a_batchnorm_cnn(cnn_study, method):
    """Their gradient passes through BatchNorm layers in eval mode, whose running statistics (permuted with the
    channels) torch cannot differentiate: they enter as constants (this raised torch's RuntimeError before)."""
    spec = spec_for_model(cnn_study.model_spec, cnn_study.layout, study_model(cnn_study))
    a, b = (cnn_study.layout.unflatten(torch.from_numpy(cnn_study.read_params([int(cnn_study.run_rows(r)[-1])])[0]))
            for r in (0, 1))
    options = {"loss_samples": 512} if method.endswith("+loss") else {"sinkhorn_samples": 512, "sinkhorn_steps": 5}
    found = make_aligner(method, spec, cnn_study, seed=0, **options).find(a, b)
    for p, n in spec.identity(cnn_study.layout).items():
        assert sorted(found[p].tolist()) == list(range(len(n)))
