"""An aligner trained on one study aligns another of the same MLP (issue 21, part 3): `align --aligner FILE`."""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import make_study, one_line_error

from globscope_core import cli
from globscope_core.alignment.deep_align import build_net, load_aligner_file, save_aligner
from globscope_core.alignment.permutation import flat_index, spec_for_model
from globscope_core.evaluation.many_models import eval_data
from globscope_core.networks.models import study_model
from globscope_core.stages.align import load_permutations
from globscope_core.storage.study import Study


@pytest.fixture(scope="module")
def study_b(tmp_path_factory):
    """The tiny study's MLP (64-32-10) trained again from other seeds: runs the aligner never saw."""
    return make_study(tmp_path_factory.mktemp("b") / "study", seed=100)


@pytest.fixture
def aligner_a(study_copy, tmp_path, capsys):
    """`align A --method deep-align` trains and saves A's aligner: its file."""
    assert cli.main(["align", study_copy.dir, "--method", "deep-align", "--out", str(tmp_path / "a-aligned"),
                     "--alphas", "5", "--aligner-steps", "30"]) == 0
    capsys.readouterr()
    path = os.path.join(study_copy.dir, "aligners", "deep-align.pt")
    blob = load_aligner_file(path)
    assert blob["step"] == 30 and blob["config"]["trained_on"]["study"] == study_copy.dir
    assert blob["config"]["trained_on"]["run_seeds"] == [r.get("seed") for r in study_copy.runs]
    return path


def test_aligner_of_a_aligns_b_without_training(study_copy, study_b, aligner_a, tmp_path, capsys):
    out = tmp_path / "b-aligned"
    seeds_a = [r.get("seed") for r in study_copy.runs]
    seeds_b = [r.get("seed") for r in study_b.runs]
    assert not set(seeds_a) & set(seeds_b), (seeds_a, seeds_b)  # B's runs are not A's
    mtime = os.path.getmtime(aligner_a)
    assert cli.main(["align", study_b.dir, "--method", "deep-align", "--aligner", aligner_a, "--out", str(out),
                     "--alphas", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"trained on {study_copy.dir}" in printed and "30 steps" in printed and "training here 0.0 s" in printed
    assert os.path.getmtime(aligner_a) == mtime  # used as it is
    assert not os.path.exists(os.path.join(study_b.dir, "aligners"))  # nothing trained for B
    rep = json.loads((out / "report.json").read_text())["align"]
    al = rep["aligner"]
    assert al["given"] and not al["in_ensemble"] and al["trained_on"] == study_copy.dir
    assert al["steps"] == 30 and al["train_seconds_here"] == 0.0 and al["trained_on_seeds"] == seeds_a
    assert np.isfinite(rep["mean_barrier_after"]) and rep["seconds_per_pair"] > 0
    assert all(np.isfinite(d["barrier_after"]) and d["seconds"] > 0 for d in rep["runs"])

    # valid permutations that keep each model's function
    perms = load_permutations(str(out))
    spec = spec_for_model(study_b.model_spec, study_b.layout)
    x, y = eval_data(study_b, "train", 500, seed=1)
    model = study_model(study_b).eval()
    aligned = Study.open(str(out))
    moved = 0
    for r in range(len(study_b.runs)):
        for q in perms[r].values():
            assert np.array_equal(np.sort(q), np.arange(len(q)))
            moved += int((q != np.arange(len(q))).sum())
        final = study_b.read_params([study_b.final_row(r)])[0]
        permuted = final[flat_index(spec, study_b.layout, perms[r])]
        np.testing.assert_array_equal(aligned.read_params([aligned.final_row(r)])[0], permuted)
        with torch.no_grad():
            study_b.layout.load_into(model, torch.from_numpy(final))
            before = model(x)
            study_b.layout.load_into(model, torch.from_numpy(permuted))
            torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert moved > 0  # independent runs: the aligner did permute units
    for d in rep["runs"]:  # alpha 0 is the run's own model, permuted or not: the same loss
        assert d["loss_after"][0] == pytest.approx(d["loss_before"][0], rel=1e-4)

    # another aligner file is another plan: the same --out refuses it in one line
    shutil.copy(aligner_a, tmp_path / "copy.pt")
    assert cli.main(["align", study_b.dir, "--method", "deep-align", "--aligner", str(tmp_path / "copy.pt"),
                     "--out", str(out), "--alphas", "5"]) == 2
    one_line_error(2, capsys.readouterr().err, "already aligned with --aligner " + aligner_a)
    assert cli.main(["align", study_b.dir, "--method", "deep-align", "--aligner", aligner_a, "--out", str(out),
                     "--alphas", "5"]) == 0  # the same command: done before
    assert "done before" in capsys.readouterr().out


def test_refusals_are_one_line(study_copy, aligner_a, tmp_path, capsys):
    def refused(path, *needles, study=study_copy.dir, method="deep-align", extra=()):
        rc = cli.main(["align", study, "--method", method, "--aligner", str(path), "--out",
                       str(tmp_path / f"out-{len(os.listdir(tmp_path))}"), "--alphas", "3", *extra])
        one_line_error(rc, capsys.readouterr().err, *needles)

    other = make_study(tmp_path / "wide", runs=2, epochs=1, widths=(16,))  # another architecture
    capsys.readouterr()
    refused(aligner_a, "trained for model 'mlp' 64-32-10", "64-16-10", study=other.dir)

    blob = load_aligner_file(aligner_a)  # same widths, other parameter names
    config = blob["config"]
    config["trained_on"]["layers"][0][0] = "body.0.weight"
    net = build_net(config)
    net.load_state_dict(blob["model"])
    save_aligner(str(tmp_path / "layout.pt"), config, net)
    refused(tmp_path / "layout.pt", "another state layout")

    blob = torch.load(aligner_a, weights_only=True)  # a weight changed under an intact archive
    next(iter(blob["model"].values())).view(-1)[0] += 1.0
    torch.save(blob, tmp_path / "flipped.pt")
    refused(tmp_path / "flipped.pt", "damaged deep-align aligner (checksum mismatch)")
    data = open(aligner_a, "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    refused(tmp_path / "cut.pt", "cannot read the deep-align aligner: not a torch file")
    torch.save(study_model(study_copy).state_dict(), tmp_path / "state.pt")  # a model, not an aligner
    refused(tmp_path / "state.pt", "not a deep-align aligner")
    torch.save({"x": argparse.Namespace(a=1)}, tmp_path / "pickled.pt")  # objects weights_only does not load
    refused(tmp_path / "pickled.pt", "pickled objects that a weights-only load refuses")
    (tmp_path / "text.pt").write_text("hello\n")
    refused(tmp_path / "text.pt", "not a torch file")

    refused(aligner_a, "--aligner is for the deep-align methods", method="weight-matching")
    refused(aligner_a, "--aligner-steps would train it", extra=("--aligner-steps", "10"))
