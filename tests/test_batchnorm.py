"""BatchNorm reset (issue 21, part 4): align and connect report barriers with the models' own (interpolated)
statistics and with statistics recomputed on a fixed training subset; ``landscape --bn recompute`` re-estimates
every decoded model's statistics, keeps its setting when resumed and refuses another one in one line; a model
without BatchNorm is unaffected.

Real training: a ResNet-20 of width 4 (BatchNorm after every convolution) on digits, 3 runs of 2 epochs.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import random_perms, run_cli

from globscope_core.evaluation.many_models import BatchedEvaluator, bn_data, eval_data
from globscope_core.evaluation.one_model import evaluate_model
from globscope_core.networks import datasets
from globscope_core.networks.batchnorm import BN_SAMPLES, BN_SEED, BatchNormReset, bn_subset, recompute_bn
from globscope_core.networks.models import study_model
from globscope_core.reducers import fit_reducer, load_reducer
from globscope_core.stages.landscape import compute_landscape
from globscope_core.stages.train import train_study
from globscope_core.storage import study_files
from globscope_core.storage.study import Study
from globscope_core.storage.vtk_files import read_vti


@pytest.fixture(scope="module")
def bn_study(tmp_path_factory) -> Study:
    """3 ResNet-20 (width 4, 19 BatchNorm layers) on digits, 2 epochs each, with a 2D PCA fitted."""
    d = str(tmp_path_factory.mktemp("bn") / "study")
    study = train_study(d, datasets.make_spec("digits"), "resnet20", {"width": 4}, runs=3, epochs=2, batch_size=64,
                        eval_samples=128, device="cpu", progress=False)
    fit_reducer(study, "pca", 2)
    return study


def _copy(study: Study, dst) -> Study:
    shutil.copytree(study.dir, dst)
    return Study.open(str(dst))


def _field(study: Study):
    return read_vti(study_files.landscape_vti(study.dir, 2))


# --- the reset itself -----------------------------------------------------------------------------
def test_reset_recomputes_each_model_and_leaves_the_caller_rows(bn_study):
    rows = torch.from_numpy(bn_study.read_params([bn_study.final_row(0), bn_study.final_row(1)]))
    before = rows.clone()
    bn_x = bn_data(bn_study, 300)
    assert len(bn_x) == 300 and torch.equal(bn_x, bn_data(bn_study, 300))  # a fixed, seeded subset
    reset = BatchNormReset(study_model(bn_study), bn_study.layout, bn_x)
    assert reset.layers == 19
    out = reset(rows)
    assert torch.equal(rows, before)  # a copy: the caller's rows are untouched
    changed = np.flatnonzero((out != rows).any(0).numpy())
    stats = [e for e in bn_study.layout.entries if e.name.endswith(("running_mean", "running_var"))]
    in_stats = np.zeros(bn_study.n_params, bool)
    for e in stats:
        in_stats[e.offset : e.offset + e.numel] = True
    assert len(changed) and in_stats[changed].all()  # only running statistics change
    # each row's statistics are those recompute_bn gives that model on the subset
    model = bn_study.layout.load_into(study_model(bn_study), rows[1])
    recompute_bn(model, bn_x)
    e = next(e for e in stats if e.name == "blocks.3.bn2.running_var")
    np.testing.assert_allclose(out[1, e.offset : e.offset + e.numel].numpy(), model.blocks[3].bn2.running_var.numpy(),
                               rtol=1e-5, atol=1e-7)
    assert reset.models == 2 and reset.seconds > 0


def test_evaluator_with_bn_x_matches_a_one_model_loop_on_both_paths(bn_study):
    x, y = eval_data(bn_study, "test", 64)
    bn_x = bn_data(bn_study, 256)
    rows = torch.from_numpy(bn_study.read_params(list(bn_study.final_rows().values())))
    loop = []
    for r in rows:
        model = bn_study.layout.load_into(study_model(bn_study), r)
        recompute_bn(model, bn_x)
        loop.append(evaluate_model(model, x, y)[0])
    for path in ("per-model", "vmap"):
        ev = BatchedEvaluator(bn_study.model_spec, x, y, device="cpu", layout=bn_study.layout, path=path, bn_x=bn_x)
        np.testing.assert_allclose(ev.evaluate(rows)[0], loop, rtol=1e-4)
    own = BatchedEvaluator(bn_study.model_spec, x, y, device="cpu", layout=bn_study.layout).evaluate(rows)[0]
    assert np.abs(own - np.asarray(loop)).max() > 1e-3  # the models' own statistics give other numbers


def test_a_model_without_batchnorm_is_unaffected(tiny_study):
    x, y = eval_data(tiny_study, "test", 200)
    rows = torch.from_numpy(tiny_study.read_params(list(range(8))))
    plain = BatchedEvaluator(tiny_study.model_spec, x, y, device="cpu", layout=tiny_study.layout, fast=False)
    with_bn = BatchedEvaluator(tiny_study.model_spec, x, y, device="cpu", layout=tiny_study.layout, fast=False,
                               bn_x=bn_data(tiny_study, 100))
    assert with_bn.bn_reset is None  # no copy, no forward passes
    assert np.array_equal(plain.evaluate(rows)[0], with_bn.evaluate(rows)[0])
    reset = BatchNormReset(study_model(tiny_study), tiny_study.layout, bn_data(tiny_study, 100))
    assert reset.layers == 0 and reset(rows) is rows


def test_bn_subset_is_fixed_and_whole_when_small():
    x = torch.arange(50.0)
    assert torch.equal(bn_subset(x, 100), x) and torch.equal(bn_subset(x, None), x)
    a, b = bn_subset(x, 10), bn_subset(x, 10)
    assert torch.equal(a, b) and len(a) == 10 and not torch.equal(a, bn_subset(x, 10, seed=BN_SEED + 1))


# --- align and connect ------------------------------------------------------------------------------
def test_resnet_block_permutations_keep_the_function(bn_study):
    from globscope_core.alignment.permutation import permute_flat, spec_for_model

    spec = spec_for_model(bn_study.model_spec, bn_study.layout)
    assert len(spec.perm_names) == 9  # one per basic block
    w = bn_study.read_params([bn_study.final_row(1)])[0]
    perms = random_perms(spec, bn_study.layout, 0)
    v = permute_flat(spec, bn_study.layout, perms, w)
    assert not np.array_equal(v, w)
    x, y = eval_data(bn_study, "test", 128)
    loss = BatchedEvaluator(bn_study.model_spec, x, y, device="cpu", layout=bn_study.layout).evaluate(
        torch.from_numpy(np.stack([w, v])))[0]
    assert loss[0] == pytest.approx(loss[1], rel=1e-5)


def test_align_reports_barriers_with_own_and_recomputed_statistics(bn_study, tmp_path):
    from globscope_core.stages.align import align_study

    rep = align_study(bn_study.dir, str(tmp_path / "aligned"), alphas=5, eval_samples=256, bn_samples=400,
                      progress=False, plot=False, device="cpu")
    assert rep["batchnorm"]["samples"] == 400 and rep["batchnorm"]["seconds"] > 0
    for d in rep["runs"]:
        for key in ("before", "after"):
            own, again = d[f"barrier_{key}"], d[f"barrier_{key}_bn_recomputed"]
            assert np.isfinite([own, again]).all() and abs(own - again) > 1e-3
            # the ends are the models themselves: recomputing changes them far less than the middle
            assert len(d[f"loss_{key}_bn_recomputed"]) == 5
    assert rep["mean_barrier_before_bn_recomputed"] != rep["mean_barrier_before"]
    assert Study.open(str(tmp_path / "aligned")).plan["bn_samples"] == 400
    # --bn-samples 0: only the models' own statistics
    rep0 = align_study(bn_study.dir, str(tmp_path / "aligned0"), alphas=3, eval_samples=128, bn_samples=0,
                       progress=False, plot=False, device="cpu")
    assert rep0["batchnorm"]["samples"] == 0 and "barrier_after_bn_recomputed" not in rep0["runs"][0]
    assert rep0["runs"][0]["barrier_after"] == pytest.approx(rep["runs"][0]["barrier_after"], abs=0.5)


def test_align_of_a_model_without_batchnorm_has_no_batchnorm_part(tiny_study, tmp_path):
    from globscope_core.stages.align import align_study

    rep = align_study(tiny_study.dir, str(tmp_path / "aligned"), alphas=3, eval_samples=128, progress=False,
                      plot=False, device="cpu")
    assert "batchnorm" not in rep and "barrier_after_bn_recomputed" not in rep["runs"][0]
    assert "bn_samples" not in Study.open(str(tmp_path / "aligned")).plan


def test_connect_reports_barriers_with_own_and_recomputed_statistics(bn_study, tmp_path):
    from globscope_core.stages.connect import connect

    s = _copy(bn_study, tmp_path / "s")
    r = connect(s.dir, runs=(0, 1), epochs=1, points=5, eval_samples=256, plane_resolution=0, bn_samples=500,
                progress=False, device="cpu")
    bn = r["batchnorm"]
    assert bn["samples"] == 500 and bn["seconds"] >= 0
    from globscope_core.evaluation.one_model import subset

    ds = datasets.load_dataset(s.dataset_spec)
    end = s.layout.load_into(study_model(s), torch.from_numpy(s.read_params([s.final_row(0)])[0]))
    end_loss = evaluate_model(end, *subset(ds.train_x, ds.train_y, 256, seed=1))[0]
    for path in ("curve", "line"):
        own, again = bn["own_statistics"][f"{path}_summary"], r[f"{path}_summary"]
        assert abs(own["train_loss_barrier"] - again["train_loss_barrier"]) > 1e-3
        # with their own statistics the ends are the trained models as stored
        own_along = bn["own_statistics"]["along"][path]["train_loss"]
        assert len(own_along) == 5 and own_along[0] == pytest.approx(end_loss, rel=1e-4)
    assert r["batchnorm_recomputed"] is True
    paths = Study.open(s.dir, "paths.h5")
    assert paths.runs[r["curve_run"]]["bn_samples"] == 500


# --- landscape --bn ---------------------------------------------------------------------------------
def test_landscape_bn_recompute_gives_each_decoded_model_its_own_statistics(bn_study, tmp_path):
    s = _copy(bn_study, tmp_path / "s")
    dec = compute_landscape(s, "pca-2d", 3, eval_samples=64, device="cpu", progress=False, trajectories=False,
                            bn="decoded")
    loss_dec = _field(s).point_arrays["loss"].copy()
    assert dec["batchnorm"] == {"setting": "decoded", "layers": 19}
    assert _field(s).field_data["batchnorm"] == "decoded"
    rec = compute_landscape(s, "pca-2d", 3, eval_samples=64, device="cpu", progress=False, trajectories=False,
                            bn="recompute", bn_samples=300)
    f = _field(s)
    loss_rec = f.point_arrays["loss"]
    assert rec["batchnorm"]["setting"] == "recompute" and rec["batchnorm"]["samples"] == 300
    assert rec["batchnorm"]["seconds"] > 0 and 0 < rec["batchnorm"]["fraction_of_evaluation"] <= 1
    assert f.field_data["batchnorm"] == "recompute" and int(np.ravel(f.field_data["bn_samples"])[0]) == 300
    assert np.abs(loss_rec - loss_dec).max() > 1e-2
    # one grid point by hand: decoded, statistics recomputed on the same subset, evaluated in eval mode
    lo, hi = np.asarray(rec["bounds"][0::2]), np.asarray(rec["bounds"][1::2])
    z = np.array([[lo[0], (lo[1] + hi[1]) / 2]])  # grid point 3 (x fastest), inside the box
    from globscope_core.reducers.latent_grid import HullClamp
    from globscope_core.stages.landscape import encode_checkpoints

    reducer = load_reducer(s, "pca-2d")
    w = reducer.inverse_transform(HullClamp(encode_checkpoints(s, reducer))(z))[0]
    model = s.layout.load_into(study_model(s), torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
    recompute_bn(model, bn_subset(datasets.load_dataset(s.dataset_spec).train_x, 300, BN_SEED))
    assert loss_rec[3] == pytest.approx(evaluate_model(model, *eval_data(s, "test", 64))[0], rel=1e-3)

    # decode uses the landscape's rule: its model file holds the recomputed statistics
    from globscope_core.stages.decode import PointDecoder

    info, flat = PointDecoder(s.dir, 2, device="cpu").decode(z[0], force=True)
    assert info["loss"] == pytest.approx(float(loss_rec[3]), rel=1e-3)
    e = next(e for e in s.layout.entries if e.name == "bn.running_mean")
    np.testing.assert_allclose(flat[e.offset : e.offset + e.numel].numpy(), model.bn.running_mean.numpy(), rtol=1e-3,
                               atol=1e-5)


def test_landscape_bn_recompute_on_a_model_without_batchnorm_is_a_noted_no_op(study_copy):
    fit_reducer(study_copy, "pca", 2)
    compute_landscape(study_copy, "pca-2d", 5, eval_samples=128, device="cpu", progress=False, trajectories=False)
    plain = _field(study_copy).point_arrays["loss"].copy()
    rc, out, err = run_cli("landscape", study_copy.dir, "--reducer", "pca-2d", "--resolution", "5", "--eval-samples",
                           "128", "--device", "cpu", "--no-progress", "--no-trajectories", "--bn", "recompute")
    assert rc == 0, err
    assert "--bn recompute: the model has no BatchNorm layers, nothing was recomputed" in out
    f = _field(study_copy)
    assert np.array_equal(f.point_arrays["loss"], plain)  # bitwise
    assert f.field_data["batchnorm"] == "none" and "bn_samples" not in f.field_data
    rep = json.load(open(os.path.join(study_copy.dir, "report.json")))["landscape-2d"]["batchnorm"]
    assert rep["setting"] == "none" and rep["layers"] == 0 and "seconds" not in rep


def test_a_resumed_landscape_keeps_its_bn_setting_and_refuses_another(bn_study, tmp_path):
    s = _copy(bn_study, tmp_path / "s")
    common = ["landscape", s.dir, "--reducer", "pca-2d", "--resolution", "4", "--eval-samples", "64", "--device",
              "cpu", "--no-progress", "--no-trajectories", "--chunk-points", "4"]
    # no --bn: recompute, the default for a BatchNorm network
    rc, out, err = run_cli(*common, "--bn-samples", "300", "--max-chunks", "1")
    assert rc == 0 and "stopped after 1 of 4 chunks" in out, err
    partial = study_files.landscape_partial_dir(s.dir, 2)
    config = json.load(open(os.path.join(partial, study_files.PARTIAL_CONFIG)))
    assert config["bn"] == "recompute" and config["bn_samples"] == 300
    for other in (["--bn", "decoded"], ["--bn", "recompute", "--bn-samples", "200"]):
        rc, out, err = run_cli(*common, *other)
        # one line after the stage's memory line, naming what differs
        assert rc == 2 and "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("memory:"), err
        assert "unfinished landscape with other settings" in lines[1] and "differs in: bn" in lines[1], err
    rc, out, err = run_cli(*common, "--max-chunks", "1")  # no --bn: the unfinished landscape's setting
    assert rc == 0 and "stopped after 2 of 4 chunks" in out, err
    rc, out, err = run_cli(*common)
    assert rc == 0, err
    assert "BatchNorm statistics recomputed for every decoded model on 300 train samples" in out
    resumed = _field(s)
    assert resumed.field_data["batchnorm"] == "recompute"
    # the same field as one uninterrupted call (in this process: another thread count than the CLI's, which moves
    # the convolutions' last bits, and the statistics with them, by a few 1e-6)
    whole = _copy(bn_study, tmp_path / "whole")
    compute_landscape(whole, "pca-2d", 4, eval_samples=64, device="cpu", progress=False, trajectories=False,
                      chunk_points=4, bn="recompute", bn_samples=300)
    np.testing.assert_allclose(resumed.point_arrays["loss"], _field(whole).point_arrays["loss"], rtol=1e-4)

    # an unfinished decoded landscape (as an earlier version leaves it: no "bn" in its config) resumes decoded
    rc, out, err = run_cli(*common, "--bn", "decoded", "--max-chunks", "1")
    assert rc == 0 and "bn" not in json.load(open(os.path.join(partial, study_files.PARTIAL_CONFIG))), err
    rc, out, err = run_cli(*common)
    assert rc == 0 and "BatchNorm: decoded running statistics as they are" in out, err
    assert _field(s).field_data["batchnorm"] == "decoded"


def test_bn_options_are_checked(bn_study):
    with pytest.raises(Exception, match="--bn must be one of decoded, recompute"):
        compute_landscape(bn_study, "pca-2d", 3, bn="reset", progress=False)
    rc, out, err = run_cli("landscape", bn_study.dir, "--reducer", "pca-2d", "--bn-samples", "0")
    assert rc == 2 and "--bn-samples" in err
    assert BN_SAMPLES == 2000
