"""Learned alignment (alignment/deep_align*.py, issue 15): equivariance, recovery, saved aligner, supervision, CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import random_perms

from globscope_core import cli
from globscope_core.alignment.deep_align import (
    DeepAlign,
    DeepAlignNet,
    NeuronEncoder,
    load_aligner_file,
    mlp_layers,
    permute_weights,
    weights_from_state,
)
from globscope_core.alignment.deep_align_train import PairSampler, ensure_aligner, supervised_loss, train_aligner
from globscope_core.alignment.permutation import flat_index, spec_for_model
from globscope_core.errors import GlobScopeError
from globscope_core.evaluation.many_models import eval_data
from globscope_core.evaluation.paths import barrier, interpolation_curve
from globscope_core.networks.models import build_model, make_spec, study_model
from globscope_core.storage.state_layout import StateLayout

FAST = {"save_every": 10}


def _final(study, run):
    return study.read_params([int(study.run_rows(run)[-1])])[0]


def test_encoder_is_equivariant_to_hidden_permutations():
    torch.manual_seed(0)
    model = build_model(make_spec("mlp", (1, 4, 4), 5, widths=[12, 9, 7]))
    layout = StateLayout.from_module(model)
    layers = mlp_layers({"name": "mlp"}, layout)
    enc = NeuronEncoder([16, 12, 9, 7, 5], hidden=16, rounds=2).eval()
    ws = weights_from_state(model.state_dict(), layers)
    perms = [torch.as_tensor(np.random.default_rng(k).permutation(n))[None] for k, n in enumerate((12, 9, 7))]
    with torch.no_grad():
        h = enc(ws)
        hp = enc(permute_weights(ws, perms))
    for k in range(3):
        assert not torch.allclose(h[k], hp[k])  # the permutation did move the neurons
        torch.testing.assert_close(hp[k][0], h[k][0][perms[k][0]], atol=1e-5, rtol=1e-5)


def test_similarities_with_their_sweeps_are_equivariant():
    """Permuting B's hidden units permutes the columns of every layer's similarity, A's its rows, and nothing else:
    the weight-matching sweeps (through soft permutations) keep the encoder's equivariance."""
    torch.manual_seed(0)
    model_a = build_model(make_spec("mlp", (1, 4, 4), 5, widths=[12, 9, 7]))
    model_b = build_model(make_spec("mlp", (1, 4, 4), 5, widths=[12, 9, 7]))
    layers = mlp_layers({"name": "mlp"}, StateLayout.from_module(model_a))
    net = DeepAlignNet([16, 12, 9, 7, 5], hidden=16, rounds=2).eval()
    wa, wb = weights_from_state(model_a.state_dict(), layers), weights_from_state(model_b.state_dict(), layers)
    pa = [torch.as_tensor(np.random.default_rng(k).permutation(n))[None] for k, n in enumerate((12, 9, 7))]
    pb = [torch.as_tensor(np.random.default_rng(10 + k).permutation(n))[None] for k, n in enumerate((12, 9, 7))]
    with torch.no_grad():
        s = net.similarities(wa, wb)
        sp = net.similarities(permute_weights(wa, pa), permute_weights(wb, pb))
    for k in range(3):
        torch.testing.assert_close(sp[k][0], s[k][0][pa[k][0]][:, pb[k][0]], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def trained(tiny_study, tmp_path_factory):
    """A small aligner trained on the tiny study (3 runs of 64-32-10), saved where the test can see it."""
    path = str(tmp_path_factory.mktemp("aligner") / "deep-align.pt")
    net, config = train_aligner(tiny_study, path, steps=40, progress=False, **FAST)
    spec = spec_for_model(tiny_study.model_spec, tiny_study.layout)
    return path, DeepAlign(spec, net, mlp_layers(tiny_study.model_spec, tiny_study.layout), config), spec


def test_exactly_permuted_copy_is_recovered(tiny_study, trained):
    _, aligner, spec = trained
    layout = tiny_study.layout
    ref = _final(tiny_study, 1)
    perms = random_perms(spec, layout, seed=3)
    shuffled = ref[flat_index(spec, layout, perms)]
    assert not np.array_equal(shuffled, ref)
    found = aligner.find(layout.unflatten(torch.from_numpy(ref)), layout.unflatten(torch.from_numpy(shuffled)))
    for p, q in found.items():
        assert np.array_equal(np.sort(q), np.arange(len(q)))  # a valid permutation
        assert np.array_equal(perms[p][q], np.arange(len(q))), p  # the inverse of the one applied
    aligned = shuffled[flat_index(spec, layout, found)]
    np.testing.assert_array_equal(aligned, ref)
    # the same function, and a flat line between the two (identity barrier)
    x, y = eval_data(tiny_study, "train", 500, seed=1)
    model = study_model(tiny_study).eval()
    layout.load_into(model, torch.from_numpy(shuffled))
    out_shuffled = model(x)
    layout.load_into(model, torch.from_numpy(ref))
    torch.testing.assert_close(out_shuffled, model(x), atol=1e-5, rtol=1e-5)
    al = np.linspace(0, 1, 5)
    assert barrier(interpolation_curve(tiny_study, aligned, ref, al, x, y), al)[0] == pytest.approx(0.0, abs=1e-6)


def test_independent_runs_give_valid_permutations_and_reload_gives_the_same(tiny_study, trained):
    path, aligner, spec = trained
    layout = tiny_study.layout
    ref, other = (layout.unflatten(torch.from_numpy(_final(tiny_study, r))) for r in (0, 2))
    found = aligner.find(ref, other)
    assert set(found) == set(spec.perm_names)
    for q in found.values():
        assert q.dtype == np.int64 and np.array_equal(np.sort(q), np.arange(len(q)))
    blob = load_aligner_file(path)
    assert blob["step"] == 40 and blob["config"]["dims"] == [64, 32, 10]
    assert all(torch.is_tensor(v) for v in blob["model"].values())
    mtime = os.path.getmtime(path)
    net, config = ensure_aligner(tiny_study, path, steps=40, progress=False)  # reused, not retrained
    assert os.path.getmtime(path) == mtime
    again = DeepAlign(spec, net, aligner.layers, config).find(ref, other)
    for p in found:
        np.testing.assert_array_equal(again[p], found[p])


def test_synthetic_targets_are_the_known_permutation(tiny_study):
    layers = mlp_layers(tiny_study.model_spec, tiny_study.layout)
    sampler = PairSampler(tiny_study, layers, {"max_rows": 64, "near": 0, "noise": 0.0}, torch.device("cpu"))
    ws_a, ws_b, targets = sampler.synthetic(np.random.default_rng(0), 3)
    (wa, ba), (wb, bb) = ws_a[0], ws_b[0]
    t = targets[0]
    assert not torch.equal(wa, wb)
    # B's unit targets[a] is A's unit a: incoming rows and biases agree
    torch.testing.assert_close(torch.gather(wb, 1, t[:, :, None].expand_as(wb)), wa)
    torch.testing.assert_close(torch.gather(bb, 1, t), ba)
    (wa1, _), (wb1, _) = ws_a[1], ws_b[1]  # and the next layer's columns
    torch.testing.assert_close(torch.gather(wb1, 2, t[:, None, :].expand_as(wb1)), wa1)


def _held_out(net, study, seed=11):
    """Supervised loss and hit rate on new pairs (a checkpoint, a permuted noisy copy of a nearby one of its run)."""
    layers = mlp_layers(study.model_spec, study.layout)
    sampler = PairSampler(study, layers, {"max_rows": 64, "near": 2, "noise": 0.6}, torch.device("cpu"))
    ws_a, ws_b, targets = sampler.synthetic(np.random.default_rng(seed), 16)
    with torch.no_grad():
        loss = supervised_loss(net, ws_a, ws_b, targets).item()
        sims = net.similarities(ws_a, ws_b)
    return loss, float(np.mean([(s.argmax(2) == t).float().mean().item() for s, t in zip(sims, targets)]))


def test_supervision_uses_the_known_permutation(tiny_study, tmp_path, monkeypatch):
    """Trained on the true targets the aligner predicts them confidently; on shuffled targets it cannot."""
    kw = dict(steps=60, progress=False, lmc_weight=0.0, noise=0.6, synthetic_pairs=8, save_every=60)
    net, _ = train_aligner(tiny_study, str(tmp_path / "true.pt"), **kw)
    true_loss, true_rate = _held_out(net, tiny_study)

    original = PairSampler.synthetic

    def shuffled(self, rng, n):
        a, b, targets = original(self, rng, n)
        return a, b, [t[:, torch.randperm(t.shape[1])] for t in targets]

    monkeypatch.setattr(PairSampler, "synthetic", shuffled)
    net, _ = train_aligner(tiny_study, str(tmp_path / "shuffled.pt"), **kw)
    monkeypatch.undo()
    shuffled_loss, shuffled_rate = _held_out(net, tiny_study)
    # shuffled targets teach "any unit": the loss stays near log(32) = 3.5, far above the true-target loss
    assert true_loss < 0.5 and shuffled_loss > 4 * true_loss, (true_loss, shuffled_loss)
    assert true_rate > 0.9 and true_rate >= shuffled_rate, (true_rate, shuffled_rate)


def test_interrupted_training_resumes_to_the_same_aligner(tiny_study, tmp_path):
    whole, _ = train_aligner(tiny_study, str(tmp_path / "whole.pt"), steps=20, progress=False, **FAST)
    path = str(tmp_path / "part.pt")
    train_aligner(tiny_study, path, steps=10, progress=False, **FAST)  # as if stopped after step 10
    resumed, config = ensure_aligner(tiny_study, path, steps=20, progress=False)
    assert load_aligner_file(path)["step"] == 20
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_a_saved_aligner_with_damaged_weights_is_one_line(tiny_study, trained, tmp_path):
    """Weights that do not fit the file's own config (a damaged file): reused as the study's aligner or given
    with ``--aligner``, the same one line (reusing it raised torch's RuntimeError)."""
    from globscope_core.alignment.deep_align import save_aligner
    from globscope_core.alignment.deep_align_train import load_trained_aligner

    path, aligner, _ = trained
    blob = load_aligner_file(path)
    state = dict(aligner.net.state_dict())
    state[next(iter(state))] = torch.zeros(3, 3)
    bad = str(tmp_path / "bad.pt")
    save_aligner(bad, blob["config"], type("Damaged", (), {"state_dict": lambda self: state})(), step=blob["step"])
    for load in (lambda: ensure_aligner(tiny_study, bad, progress=False), lambda: load_trained_aligner(tiny_study, bad)):
        with pytest.raises(GlobScopeError, match=r"bad\.pt: the aligner's weights do not fit its config"):
            load()


def test_an_aligner_file_of_the_format_before_the_sweeps_is_retrained_or_refused(tiny_study, trained, tmp_path):
    """Version 1 files (the similarity without weight-matching sweeps) have other weights: reused as the study's
    aligner they are retrained; given with ``--aligner``, one line says to train a new one."""
    from globscope_core.alignment.deep_align import save_aligner
    from globscope_core.alignment.deep_align_train import load_trained_aligner

    path, aligner, _ = trained
    blob = load_aligner_file(path)
    old = str(tmp_path / "v1.pt")
    state = {k: v for k, v in aligner.net.state_dict().items() if k not in ("log_in", "log_out")}
    save_aligner(old, {**blob["config"], "version": 1}, type("V1", (), {"state_dict": lambda self: state})(),
                 step=blob["step"])
    with pytest.raises(GlobScopeError, match=r"v1\.pt: deep-align aligner of format version 1, .*train a new one"):
        load_trained_aligner(tiny_study, old)
    net, config = ensure_aligner(tiny_study, old, steps=2, progress=False, save_every=2)
    assert config["version"] == 2 and load_aligner_file(old)["config"]["version"] == 2


def test_align_cli_deep_align_and_refined(study_copy, tmp_path, capsys):
    for method in ("deep-align", "deep-align+wm", "deep-align+loss"):
        out = tmp_path / method
        assert cli.main(["align", study_copy.dir, "--method", method, "--out", str(out), "--alphas", "5",
                         "--aligner-steps", "20"]) == 0
        said = capsys.readouterr()
        assert "mean:" in said.out
        # the memory line counts what a refinement on the loss holds (autograd of a chunk at three points)
        assert ("refinement on the loss" in said.err) == method.endswith("+loss"), said.err
        rep = json.loads((out / "report.json").read_text())["align"]
        assert rep["method"] == method and [d["run"] for d in rep["runs"]] == [1, 2]
        assert rep["aligner"]["steps"] == 20  # a refined aligner reports the learned one it started from
        assert os.path.getsize(out / rep["plot"]) > 1000
        for d in rep["runs"]:
            assert d["loss_after"][0] == pytest.approx(d["loss_before"][0], rel=1e-4)  # same model, permuted
    assert load_aligner_file(os.path.join(study_copy.dir, "aligners", "deep-align.pt"))["step"] == 20
    # +wm starts weight matching from deep-align's output: never further from the reference than deep-align
    da = json.loads((tmp_path / "deep-align" / "report.json").read_text())["align"]["runs"]
    wm = json.loads((tmp_path / "deep-align+wm" / "report.json").read_text())["align"]["runs"]
    for a, b in zip(da, wm):
        assert b["distance_after"] <= a["distance_after"] + 1e-6
    # +loss descends the loss between the models from deep-align's output: here it lowers every barrier
    lg = json.loads((tmp_path / "deep-align+loss" / "report.json").read_text())["align"]["runs"]
    for a, b in zip(da, lg):
        assert b["barrier_after"] < a["barrier_after"], (a["barrier_after"], b["barrier_after"])
    assert cli.main(["align", study_copy.dir, "--method", "deep-align", "--out", str(tmp_path / "z"),
                     "--aligner-steps", "0"]) == 2
    assert "--aligner-steps" in capsys.readouterr().err


def test_other_models_are_refused_with_one_line():
    model = build_model(make_spec("resnet20", (3, 8, 8), 10))
    with pytest.raises(GlobScopeError, match=r"deep-align: model 'resnet20' is not supported.*mlp, mnist-mlp"):
        mlp_layers({"name": "resnet20"}, StateLayout.from_module(model))
