"""Mode connectivity (connectivity/, stages/connect.py): curves, barriers, storage, latent view, BatchNorm, errors."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import make_study
from torch import nn

from globscope_core.cli import main
from globscope_core.connectivity import curves
from globscope_core.errors import GlobScopeError
from globscope_core.evaluation.one_model import evaluate_model, subset
from globscope_core.evaluation.paths import barrier
from globscope_core.networks import datasets, models
from globscope_core.networks.batchnorm import recompute_bn
from globscope_core.networks.models import study_model
from globscope_core.reducers import fit_reducer, load_reducer
from globscope_core.stages import connect as C
from globscope_core.stages import connect_views
from globscope_core.stages.train import train_study
from globscope_core.storage.study import Study
from globscope_core.storage.vtk_files import arrays_of, read_any


def _digest(study_dir):
    """Names and contents of everything in a study directory (to show nothing was written)."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(study_dir)):
        for f in sorted(files):
            if f.startswith("."):
                continue
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


# --- the curve and the barrier --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bezier", "polychain"])
@pytest.mark.parametrize("bends", [1, 3])
def test_curve_ends_fixed_and_bends_on_the_line_give_the_line(kind, bends):
    t = np.linspace(0, 1, 61)
    w = curves.curve_coefficients(kind, bends, t).numpy()
    assert w.shape == (61, bends + 2)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(w[0], np.eye(bends + 2)[0], atol=1e-12)  # phi(0) = A
    np.testing.assert_allclose(w[-1], np.eye(bends + 2)[-1], atol=1e-12)  # phi(1) = B
    a, b = np.random.default_rng(0).normal(size=(2, 50))
    control = a + np.linspace(0, 1, bends + 2)[:, None] * (b - a)  # bends initialised on the line
    np.testing.assert_allclose(w @ control, np.outer(1 - t, a) + np.outer(t, b), atol=1e-9)


def test_polychain_passes_through_its_bends_and_bezier_is_quadratic():
    w = curves.curve_coefficients("polychain", 2, [1 / 3, 2 / 3]).numpy()
    np.testing.assert_allclose(w, [[0, 1, 0, 0], [0, 0, 1, 0]], atol=1e-12)
    w = curves.curve_coefficients("bezier", 1, [0.5]).numpy()
    np.testing.assert_allclose(w, [[0.25, 0.5, 0.25]])


def test_barrier_is_the_rise_above_the_linear_mix_of_the_ends():
    b, at = barrier([1.0, 3.0, 2.0], [0.0, 0.5, 1.0])
    assert b == pytest.approx(1.5) and at == 0.5
    b, _ = barrier([2.0, 1.5, 1.0], [0.0, 0.5, 1.0])  # exactly on the mix: no barrier
    assert b == pytest.approx(0.0)


def test_lr_schedule_of_garipov():
    assert curves.lr_factor(0, 10) == 1 and curves.lr_factor(5, 10) == 1
    assert curves.lr_factor(7, 10) == pytest.approx(1 - 0.5 * 0.99)
    assert curves.lr_factor(9, 10) == pytest.approx(0.01 + 0.0, abs=0.011)


# --- end to end on a real study --------------------------------------------------------------------
@pytest.fixture(scope="module")
def connected(tmp_path_factory):
    """Two 64-16-10 MLPs trained from different seeds, connected by a quadratic Bezier curve.

    Measured: train-loss barrier 0.35 on the line, 0.10 on the curve (8 curve epochs).
    """
    d = tmp_path_factory.mktemp("connect") / "study"
    study = make_study(d, runs=2, epochs=8, widths=(16,), lrs=(0.1,))
    fit_reducer(study, "pca", 2)
    before = Study.open(str(d))
    with open(before.h5_path, "rb") as fh:
        before.digest = hashlib.sha256(fh.read()).hexdigest()
    report = C.connect(str(d), runs=(0, 1), curve="bezier", bends=1, epochs=8, batch_size=128, progress=False)
    return before, Study.open(str(d), "paths.h5"), report


def test_connect_stores_curve_and_line_points_apart_from_the_ensemble(connected):
    before, study, report = connected  # study: STUDY/paths.h5, connect's own store
    assert report["points_file"] == "paths.h5" and study.n_checkpoints == 2 * 61
    # the ensemble is untouched: fit, info, align and the views see the trained runs only
    ensemble = Study.open(before.dir)
    assert ensemble.n_checkpoints == before.n_checkpoints and len(ensemble.runs) == len(before.runs)
    with open(ensemble.h5_path, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == before.digest
    curve_rows = study.run_rows(report["curve_run"], label="curve")
    line_rows = study.run_rows(report["line_run"], label="line")
    assert len(curve_rows) == 61 and len(line_rows) == 61
    final = before.final_rows()
    ends = before.read_params([final[0], final[1]])
    curve = study.read_params(curve_rows)
    line = study.read_params(line_rows)
    # ends fixed to the final checkpoints; the middle of the trained curve left the line
    np.testing.assert_array_equal(curve[0], ends[0])
    np.testing.assert_array_equal(curve[-1], ends[1])
    np.testing.assert_allclose(line[30], 0.5 * (ends[0] + ends[1]), atol=1e-6)
    assert np.linalg.norm(curve[30] - line[30]) > 1e-3 * np.linalg.norm(ends[1] - ends[0])
    assert study.runs[report["curve_run"]]["label"] == "curve"
    # the control points are kept and rebuild the stored curve
    control, cfg = C.load_control_points(os.path.join(study.dir, "connect-0-1.pt"))
    assert cfg["curve"] == "bezier" and control.shape == (3, study.n_params)
    np.testing.assert_allclose(curves.curve_coefficients("bezier", 1, np.linspace(0, 1, 61)).numpy() @ control, curve,
                               atol=1e-5)
    assert not os.path.exists(os.path.join(study.dir, "connect-0-1.partial.pt"))


def test_connect_metrics_are_true_evaluations_and_barriers_follow_them(connected):
    before, study, report = connected
    final = before.final_rows()
    # t=0 is run 0's final checkpoint: same model, same evaluation subset as at training time
    along = report["along"]
    assert along["curve"]["train_loss"][0] == pytest.approx(before.metrics["train_loss"][final[0]], rel=1e-5)
    assert along["line"]["test_acc"][-1] == pytest.approx(before.metrics["test_acc"][final[1]])
    # a stored point, rebuilt and evaluated again, gives its stored metric
    ds = datasets.load_dataset(study.dataset_spec)
    row = study.run_rows(report["curve_run"], label="curve")[20]
    model = study.layout.load_into(study_model(study), torch.from_numpy(study.read_params([row])[0]))
    loss, _ = evaluate_model(model, *subset(ds.test_x, ds.test_y, 10000, seed=2))
    assert loss == pytest.approx(study.metrics["test_loss"][row], rel=1e-5)
    # barriers recomputed from the stored curves
    t = np.linspace(0, 1, 61)
    for path, key in (("curve", "curve_summary"), ("line", "line_summary")):
        b, _ = barrier(along[path]["train_loss"], t)
        assert report[key]["train_loss_barrier"] == pytest.approx(b)
    on_disk = Study.open(study.dir).read_report()["connect-0-1"]
    assert on_disk["curve_summary"] == report["curve_summary"]


def test_trained_curve_has_a_much_lower_barrier_than_the_line(connected):
    _, _, report = connected
    line_b = report["line_summary"]["train_loss_barrier"]
    curve_b = report["curve_summary"]["train_loss_barrier"]
    assert line_b > 0.1  # two seeds of a narrow MLP: a clear ridge on the straight line
    assert curve_b < 0.5 * line_b


def test_connect_writes_the_plot_and_the_latent_polylines(connected):
    _, study, report = connected
    with open(os.path.join(study.dir, report["plot"]), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    lat = report["latent"]["2d"]
    assert lat["reducer"] == "pca-2d" and lat["landscape"] is None
    pd = read_any(os.path.join(study.dir, lat["file"]))
    assert pd.GetNumberOfPoints() == 122 and pd.GetNumberOfLines() == 2 and pd.GetNumberOfVerts() == 2
    arr = arrays_of(pd)
    assert {"t", "path", "loss", "loss_decoded"} <= set(arr)
    np.testing.assert_array_equal(arr["path"], [0] * 61 + [1] * 61)
    np.testing.assert_allclose(arr["loss"][61:], report["along"]["curve"]["test_loss"])
    # the points are the PCA coordinates of the stored checkpoints (z = 0 in 2D)
    red = load_reducer(Study.open(study.dir), "pca-2d")  # still usable: the ensemble did not change
    rows = study.read_params(study.run_rows(report["line_run"], label="line"))
    pts = np.array([pd.GetPoint(i) for i in range(pd.GetNumberOfPoints())])
    np.testing.assert_allclose(pts[:61, :2], red.transform(rows), rtol=1e-4, atol=1e-4)
    assert np.all(pts[:, 2] == 0)
    gap = np.mean(np.abs(arr["loss"][61:] - arr["loss_decoded"][61:]))
    assert lat["curve_decoded_gap"] == pytest.approx(gap, rel=1e-6)


def test_landscape_loss_is_interpolated_at_the_encoded_points(tmp_path):
    from globscope_core.storage.vtk_files import ImageField, write_vti

    # a linear field is reproduced exactly by linear interpolation
    nx, ny = 5, 4
    xs, ys = np.meshgrid(np.arange(nx) * 0.5 - 1, np.arange(ny) * 2.0, indexing="xy")
    write_vti(str(tmp_path / "l.vti"), ImageField((nx, ny, 1), (-1, 0, 0), (0.5, 2.0, 1), {"loss": 3 * xs + ys},
                                                  {"reducer": "pca-2d"}, "loss"))
    z = np.array([[0.3, 1.0], [-0.9, 5.5], [5.0, 0.0]])
    vals, fd = connect_views._landscape_loss(str(tmp_path / "l.vti"), z)
    np.testing.assert_allclose(vals[:2], 3 * z[:2, 0] + z[:2, 1])
    assert np.isnan(vals[2]) and fd["reducer"] == "pca-2d"  # outside the grid: no value, not a guess


# --- BatchNorm ----------------------------------------------------------------------------------
@models.register("test-bn-mlp")
def _bn_mlp(input_shape, num_classes, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), width), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Linear(width, num_classes))


def test_batchnorm_statistics_are_recomputed_at_each_point(tmp_path):
    d = str(tmp_path / "bn")
    train_study(d, datasets.make_spec("digits"), "test-bn-mlp", {}, runs=2, epochs=2, progress=False)
    report = C.connect(d, runs=(0, 1), curve="polychain", bends=2, epochs=1, batch_size=256, points=5,
                       progress=False)
    study = Study.open(d, "paths.h5")
    assert report["batchnorm_recomputed"] is True
    control, _ = C.load_control_points(os.path.join(d, "connect-0-1.pt"))
    assert control.shape == (4, study.n_params)
    row = study.run_rows(report["curve_run"], label="curve")[2]
    vec = study.read_params([row])[0]
    model = study.layout.load_into(study_model(study), torch.from_numpy(vec))
    # the stored running statistics are those of the point itself on the training set
    ds = datasets.load_dataset(study.dataset_spec)
    with torch.no_grad():
        h = model[1](model[0](ds.train_x))
    bn = model[2]
    np.testing.assert_allclose(bn.running_mean.numpy(), h.mean(0).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), h.var(0).numpy(), rtol=2e-2, atol=1e-4)
    # and the stored metrics are those of that model
    loss, _ = evaluate_model(model, *subset(ds.train_x, ds.train_y, 10000, seed=1))
    assert loss == pytest.approx(study.metrics["train_loss"][row], rel=1e-5)
    # a model without BatchNorm is left alone
    assert recompute_bn(models.build_model(models.make_spec("mlp", (1, 8, 8), 10)), ds.train_x) is False


# --- resume -----------------------------------------------------------------------------------------
def test_curve_training_resumes_from_its_partial_file(tiny_study, tmp_path):
    ds = datasets.load_dataset(tiny_study.dataset_spec)
    final = tiny_study.final_rows()
    wa, wb = tiny_study.read_params([final[0], final[1]])
    model = study_model(tiny_study)
    part = str(tmp_path / "c.partial.pt")
    kw = dict(epochs=2, lr=0.05, batch_size=256, partial_path=part, progress=False, config_key="k")
    first = curves.train_curve(model, tiny_study.layout, wa, wb, "polychain", 1, ds, **kw)
    st = torch.load(part, weights_only=True)
    assert st["epoch"] == 2
    # a rerun with the same configuration finds all epochs done and returns the same curve
    again = curves.train_curve(model, tiny_study.layout, wa, wb, "polychain", 1, ds, **kw)
    np.testing.assert_array_equal(first, again)
    # another configuration starts afresh
    fresh = curves.train_curve(model, tiny_study.layout, wa, wb, "polychain", 1, ds, **dict(kw, epochs=1, config_key="j"))
    assert not np.array_equal(first[1], fresh[1])


# --- bad input: a clear error, nothing stored ---------------------------------------------------------
def test_bad_runs_are_clear_errors_and_store_nothing(study_copy, tmp_path, capsys):
    d = study_copy.dir
    digest = _digest(d)
    with pytest.raises(GlobScopeError, match="same run twice"):
        C.connect(d, runs=(1, 1), epochs=1, progress=False)
    with pytest.raises(GlobScopeError, match="no run 7"):
        C.connect(d, runs=(0, 7), epochs=1, progress=False)
    with pytest.raises(GlobScopeError, match="not a run number"):
        C.connect(d, runs=(0, "x"), epochs=1, progress=False)
    other = make_study(tmp_path / "other", runs=1, epochs=1, widths=(8,))
    with pytest.raises(GlobScopeError, match="runs of different models"):
        C.connect(d, runs=(0, f"{other.dir}:0"), epochs=1, progress=False)
    with pytest.raises(GlobScopeError, match="--curve"):
        C.connect(d, runs=(0, 1), curve="spline", epochs=1, progress=False)
    capsys.readouterr()  # what make_study's training said (its memory line)
    assert main(["connect", d, "--runs", "2", "2", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "same run twice" in err[0]
    assert _digest(d) == digest


def test_study_without_final_checkpoints_is_refused(tiny_study, tmp_path):
    d = str(tmp_path / "empty")
    Study.create(d, tiny_study.model_spec, tiny_study.dataset_spec, tiny_study.layout)
    digest = _digest(d)
    with pytest.raises(GlobScopeError, match="no final checkpoints"):
        C.connect(d, runs=(0, 1), epochs=1, progress=False)
    assert _digest(d) == digest


def test_diverging_curve_is_an_error_and_stores_nothing(study_copy):
    d = study_copy.dir
    digest = _digest(d)
    with pytest.raises(GlobScopeError, match="diverged"):
        C.connect(d, runs=(0, 2), epochs=2, lr=1e30, progress=False)
    # nothing stored; only the resume file of the last finished epoch may remain (none here)
    assert _digest(d) == digest
    assert Study.open(d).n_checkpoints == study_copy.n_checkpoints
    assert "connect-0-2" not in Study.open(d).read_report()


def test_a_stored_curve_is_not_an_end_point(connected, tmp_path):
    _, study, report = connected
    d = str(tmp_path / "copy")
    shutil.copytree(study.dir, d)
    # the curve is not a run of the ensemble: the next run number does not exist
    with pytest.raises(GlobScopeError, match="no run 2"):
        C.connect(d, runs=(0, 2), epochs=1, progress=False)
    report_json = json.load(open(os.path.join(d, "report.json")))
    assert list(report_json) == ["connect-0-1"]


def test_plane_of_the_curve_shows_the_valley_and_the_ridge(connected):
    _, study, report = connected
    plane = report["latent"]["plane"]
    # a quadratic Bezier curve and the line lie in the plane through A, B and the bend: exact decoding
    assert plane["curve_decoded_gap"] < 1e-4 and plane["line_decoded_gap"] < 1e-4
    # the grid's loss, read along the drawn paths, agrees with the true loss and shows both barriers
    assert plane["curve_landscape_gap"] < 0.1 * report["line_summary"]["test_loss_barrier"]
    assert plane["line_landscape_barrier"] > 2 * max(plane["curve_landscape_barrier"], 0.01)
    assert plane["line_landscape_barrier"] == pytest.approx(report["line_summary"]["test_loss_barrier"], rel=0.2)
    pd = read_any(os.path.join(study.dir, plane["file"]))
    assert pd.GetNumberOfPoints() == 122 and "loss_landscape" in arrays_of(pd)
    from globscope_core.storage.vtk_files import read_vti

    f = read_vti(os.path.join(study.dir, plane["landscape"]))
    assert f.dims == (41, 41, 1) and np.isfinite(f.point_arrays["loss"]).all()


def test_refit_puts_the_curve_into_the_reducer_and_recomputes_the_landscape(study_copy):
    from globscope_core.stages.landscape import compute_landscape

    d = study_copy.dir
    fit_reducer(study_copy, "pca", 2)
    from globscope_core.stages.topology import study_topology

    compute_landscape(study_copy, "pca-2d", 9, eval_samples=64, progress=False)
    study_topology(d, dim=2, verbose=False)
    seg = os.path.join(d, "topology-2d", "segmentation.vti")
    before = os.stat(seg).st_mtime_ns
    report = C.connect(d, runs=(0, 1), epochs=1, batch_size=256, points=5, refit=True, plane_resolution=0,
                       progress=False)
    lat = report["latent"]["2d"]
    assert "refitted" in lat["note"] and "landscape and merge tree recomputed" in lat["note"]
    assert os.stat(seg).st_mtime_ns > before  # the merge tree of the new field, not the old one
    assert lat["landscape"] == "landscape-2d.vti" and np.isfinite(lat["curve_landscape_gap"])
    study = Study.open(d)
    assert study.n_checkpoints == study_copy.n_checkpoints  # the curve rows live in paths.h5
    red = load_reducer(study, "pca-2d")  # refitted with the curve rows, and still the study's
    assert red.basis.rank > fit_reducer(study, "pca", 2, save=False).basis.rank  # the curve left the span
    from globscope_core.reducers import study_id
    from globscope_core.storage.vtk_files import read_vti

    assert read_vti(os.path.join(d, "landscape-2d.vti")).field_data["study_id"] == study_id(study)
