"""Landscape stage (stages/landscape.py): grid, trajectories, resume, torchrun, bf16, trust, BatchNorm studies."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import run_cli

from globscope_core import cli
from globscope_core.errors import GlobScopeError
from globscope_core.evaluation.many_models import eval_data, evaluate_flat
from globscope_core.evaluation.one_model import evaluate_model
from globscope_core.networks.models import study_model
from globscope_core.reducers import fit_reducer, load_reducer
from globscope_core.reducers.latent_grid import grid_points
from globscope_core.stages.landscape import compute_landscape
from globscope_core.storage.study import Study
from globscope_core.storage.vtk_files import arrays_of, read_any, read_vti

VENV_BIN = os.path.dirname(sys.executable)
# Every run compared bitwise runs one thread, as torchrun's workers do: another thread count may change
# the GEMMs' rounding in the last bit (a relative 4e-7 on the loss), which is checked separately.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "globscope_core.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=300, **kw)


@pytest.fixture
def pca_study(study_copy):
    fit_reducer(study_copy, "pca", 2)
    return study_copy


def _field(study, tag="2d"):
    return read_vti(os.path.join(study.dir, f"landscape-{tag}.vti"))


# --- the grid and its files ----------------------------------------------------------------------
def test_landscape_2d_field_and_trajectories(pca_study):
    info = compute_landscape(pca_study, "pca-2d", 9, eval_samples=200, chunk_points=16, progress=False)
    assert info["complete"] and info["nan_count"] == 0
    f = _field(pca_study)
    assert f.dims == (9, 9, 1) and f.active_scalars == "loss"
    assert set(f.point_arrays) >= {"loss", "accuracy", "trust"}
    assert f.field_data["reducer"] == "pca-2d" and f.field_data["split"] == "test"
    assert f.field_data["study"] == os.path.basename(pca_study.dir) and int(f.field_data["eval_samples"][0]) == 200

    # bounds: the encoded checkpoints' box (their hull's) widened by 5% on each side
    red = load_reducer(pca_study, "pca-2d")
    Z = red.transform(pca_study.read_params())
    lo, hi = Z.min(0), Z.max(0)
    np.testing.assert_allclose(f.origin[:2], lo - 0.05 * (hi - lo), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(f.origin[:2]) + 8 * np.asarray(f.spacing[:2]), hi + 0.05 * (hi - lo), rtol=1e-6)

    # extrapolation: 0 exactly inside the hull of the encoded checkpoints, > 0 outside; trusted covers the hull
    from scipy.spatial import Delaunay

    inside = Delaunay(Z).find_simplex(f.point_coordinates()[:, :2]) >= 0
    ex, tr = f.point_arrays["extrapolation"], f.point_arrays["trusted"]
    assert inside.any() and (~inside).any()
    assert np.all(ex[inside] < 1e-6) and np.all(ex[~inside] > 0) and np.all(tr[inside] == 1)
    assert set(np.unique(tr)) == {0.0, 1.0} and info["trusted_fraction"] == pytest.approx(tr.mean())
    assert info["extrapolated"]["points"] == int((tr == 0).sum()) and info["spikes"]["all"] >= 0

    # grid values: decode a few points and evaluate them one model at a time
    x, y = eval_data(pca_study, "test", 200)
    model = study_model(pca_study)
    pts = f.point_coordinates()[:, :2]
    from globscope_core.reducers.latent_grid import HullClamp

    clamp = HullClamp(Z)  # points outside the hull are evaluated on its boundary (the default)
    assert not np.allclose(clamp(pts[:1]), pts[:1]) and np.allclose(clamp(pts[40:41]), pts[40:41])
    for i in (0, 40, 80, 17):
        vec = red.inverse_transform(clamp(pts[i : i + 1]))[0]
        l, a = evaluate_model(pca_study.layout.load_into(model, vec), x, y)
        assert abs(f.point_arrays["loss"][i] - l) < 1e-4 * max(1, l)
        assert abs(f.point_arrays["accuracy"][i] - a) < 1e-6
        assert abs(f.point_arrays["trust"][i] - np.linalg.norm(Z - pts[i], axis=1).min()) < 1e-4
    assert f.point_arrays["trust"].min() < f.point_arrays["trust"].max()

    # trajectories: a polyline per run, the final checkpoints as vertices
    tr = read_any(os.path.join(pca_study.dir, "trajectories-2d.vtp"))
    n_runs = len(pca_study.runs)
    assert tr.GetNumberOfLines() == n_runs and tr.GetNumberOfVerts() == n_runs
    assert tr.GetNumberOfPoints() == pca_study.n_checkpoints
    arr = arrays_of(tr)
    rows = np.concatenate([pca_study.run_rows(r, None) for r in range(n_runs)])
    np.testing.assert_array_equal(arr["run"], pca_study.run[rows])
    np.testing.assert_array_equal(arr["step"], pca_study.step[rows])
    np.testing.assert_allclose(arr["loss"], pca_study.metrics["test_loss"][rows])
    dec, _ = evaluate_flat(pca_study, red.inverse_transform(Z[rows]), x, y)
    np.testing.assert_allclose(arr["loss_decoded"], dec, rtol=1e-5)
    pts_tr = np.array([tr.GetPoint(i) for i in range(tr.GetNumberOfPoints())])
    np.testing.assert_allclose(pts_tr[:, :2], Z[rows], rtol=1e-5, atol=1e-6)
    assert np.all(pts_tr[:, 2] == 0)

    report = json.load(open(pca_study.report_path))["landscape-2d"]
    assert report["resolution"] == 9 and report["eval_samples"] == 200 and report["nan_count"] == 0
    assert report["points_per_second"] > 0
    assert not os.path.exists(os.path.join(pca_study.dir, ".landscape-2d.partial"))


def test_landscape_3d_and_train_split(study_copy):
    fit_reducer(study_copy, "pca", 3)
    info = compute_landscape(study_copy, "pca-3d", 4, split="train", eval_samples=None, progress=False)
    f = _field(study_copy, "3d")
    assert f.dims == (4, 4, 4) and info["split"] == "train"
    assert int(f.field_data["eval_samples"][0]) == 1797 - 359
    assert np.all(np.isfinite(f.point_arrays["loss"]))
    assert os.path.exists(os.path.join(study_copy.dir, "trajectories-3d.vtp"))


def test_interrupted_run_resumes_to_the_same_field(pca_study):
    kw = dict(eval_samples=128, chunk_points=10, progress=False)
    info = compute_landscape(pca_study, "pca-2d", 9, max_chunks=3, **kw)
    assert not info["complete"] and info["chunks_done"] == 3
    assert not os.path.exists(os.path.join(pca_study.dir, "landscape-2d.vti"))
    partial = os.path.join(pca_study.dir, ".landscape-2d.partial")
    assert len([p for p in os.listdir(partial) if p.startswith("chunk-")]) == 3
    # other settings are refused while unfinished work is there
    with pytest.raises(GlobScopeError, match="other settings.*split"):
        compute_landscape(pca_study, "pca-2d", 9, split="train", **kw)
    info = compute_landscape(pca_study, "pca-2d", 9, **kw)
    assert info["complete"] and info["points_computed_now"] == 81 - 30
    resumed = _field(pca_study).point_arrays
    compute_landscape(pca_study, "pca-2d", 9, fresh=True, **kw)
    full = _field(pca_study).point_arrays
    for name in ("loss", "accuracy", "trust"):
        np.testing.assert_array_equal(resumed[name], full[name])


def test_killed_process_resumes_and_disk_full_keeps_partial(pca_study, tmp_path):
    args = ["landscape", pca_study.dir, "--reducer", "pca-2d", "--resolution", "65", "--chunk-points", "8",
            "--eval-samples", "64", "--no-progress", "--no-trajectories"]
    partial = os.path.join(pca_study.dir, ".landscape-2d.partial")
    # finished chunks (a kill mid-write leaves a chunk-N.npz.tmp-PID, which the next write of chunk N removes)
    chunks = lambda: [p for p in os.listdir(partial) if p.startswith("chunk-") and ".tmp-" not in p] if os.path.isdir(partial) else []  # noqa
    proc = subprocess.Popen([sys.executable, "-m", "globscope_core.cli", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(chunks()) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(chunks())
    assert 5 <= killed_at < 529, "the run should have been killed mid-way"

    # a file-size limit makes the next chunk write fail like a full disk: clear error, partial kept
    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))

    r = subprocess.run([sys.executable, "-m", "globscope_core.cli", *args], env=ENV, capture_output=True,
                       text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    assert "cannot write" in r.stderr and "resume" in r.stderr and "Traceback" not in r.stderr
    assert len(chunks()) == killed_at

    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    resumed = _field(pca_study).point_arrays["loss"].copy()
    r = _cli(*args, "--fresh")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(resumed, _field(pca_study).point_arrays["loss"])
    # in this process (two threads): the same field up to float32 rounding
    compute_landscape(pca_study, "pca-2d", 65, chunk_points=8, eval_samples=64, progress=False,
                      trajectories=False, fresh=True)
    np.testing.assert_allclose(resumed, _field(pca_study).point_arrays["loss"], rtol=2e-6)


def test_landscape_in_bf16_records_its_precision_and_resumes_only_in_it(study_copy):
    from globscope_core.reducers import fit_reducer
    from globscope_core.stages.landscape import compute_landscape
    from globscope_core.storage.vtk_files import read_vti

    fit_reducer(study_copy, "pca", 2)
    kw = dict(eval_samples=64, chunk_points=8, progress=False, trajectories=False, device="cpu")
    part = compute_landscape(study_copy, "pca-2d", 5, precision="bf16", max_chunks=1, **kw)
    assert not part["complete"]
    with pytest.raises(GlobScopeError, match="differs in: precision"):  # no fp32 chunk joins bf16 ones
        compute_landscape(study_copy, "pca-2d", 5, **kw)
    info = compute_landscape(study_copy, "pca-2d", 5, precision="bf16", **kw)
    assert info["complete"] and info["evaluation"] == {"path": "mlp", "precision": "bf16", "compile": False,
                                                       "compile_seconds": None}
    low = read_vti(f"{study_copy.dir}/landscape-2d.vti")
    assert low.field_data["precision"] == "bf16"
    ref = compute_landscape(study_copy, "pca-2d", 5, fresh=True, **kw)
    assert ref["evaluation"]["precision"] == "fp32"
    f32 = read_vti(f"{study_copy.dir}/landscape-2d.vti").point_arrays["loss"]
    rel = np.abs(low.point_arrays["loss"] - f32) / f32
    assert 0 < rel.max() < 2e-2



def test_torchrun_two_processes_give_the_single_process_field(pca_study):
    args = ["landscape", pca_study.dir, "--reducer", "pca-2d", "--resolution", "11", "--chunk-points", "7",
            "--eval-samples", "100", "--no-progress"]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    single = _field(pca_study)
    tr_single = arrays_of(read_any(os.path.join(pca_study.dir, "trajectories-2d.vtp")))
    r = subprocess.run([os.path.join(VENV_BIN, "torchrun"), "--nproc-per-node", "2", "--master-port", "29531",
                        "-m", "globscope_core.cli", *args, "--fresh"], capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    multi = _field(pca_study)
    report = json.load(open(pca_study.report_path))["landscape-2d"]
    assert report["processes"] == 2 and report["complete"]
    for name in ("loss", "accuracy", "trust"):
        np.testing.assert_array_equal(multi.point_arrays[name], single.point_arrays[name])
    np.testing.assert_allclose(arrays_of(read_any(os.path.join(pca_study.dir, "trajectories-2d.vtp")))["loss_decoded"],
                               tr_single["loss_decoded"], rtol=1e-6)


# --- bad input -----------------------------------------------------------------------------------
def test_nan_losses_are_kept_counted_and_reported(pca_study, capsys):
    # decoded where they are, a huge margin sends most grid points to absurd weights: their losses overflow
    info = compute_landscape(pca_study, "pca-2d", 3, margin=1e20, eval_samples=64, progress=False,
                             beyond_hull="extrapolate")
    f = _field(pca_study)
    loss = f.point_arrays["loss"]
    assert info["nan_count"] == int(np.isnan(loss).sum()) > 0
    assert np.isfinite(loss[4]), "the centre of the grid lies among the checkpoints"
    assert int(f.field_data["nan_count"][0]) == info["nan_count"]
    assert json.load(open(pca_study.report_path))["landscape-2d"]["nan_count"] == info["nan_count"]
    assert info["extrapolated"]["above_2x_worst_checkpoint"] == 8  # every point but the centre, said loudly
    rc = cli.main(["landscape", pca_study.dir, "--reducer", "pca-2d", "--resolution", "3", "--margin", "1e20",
                   "--eval-samples", "64", "--no-progress", "--no-trajectories", "--beyond-hull", "extrapolate"])
    out = capsys.readouterr().out
    assert rc == 0 and f"{info['nan_count']} grid points gave a non-finite loss" in out
    assert "warning: 8 of 8 untrusted points (outside the hull of the encoded checkpoints, decoded where" in out
    # the default evaluates them at the hull's boundary instead: the same grid stays finite
    tame = compute_landscape(pca_study, "pca-2d", 3, margin=1e20, eval_samples=64, progress=False, fresh=True)
    assert tame["beyond_hull"] == "clamp" and tame["nan_count"] == 0
    assert np.isfinite(_field(pca_study).point_arrays["loss"]).all()


def test_bad_input_errors(pca_study, capsys):
    args = ["landscape", pca_study.dir, "--reducer", "pca-3d", "--resolution", "100000", "--no-progress"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "no such reducer" in err and len(err.strip().splitlines()) == 1
    fit_reducer(pca_study, "pca", 3)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "1,000,000,000,000,000 grid points" in err and "more than a landscape may have" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(GlobScopeError, match="at least 2"):
        compute_landscape(pca_study, "pca-2d", 1, progress=False)
    # the study changes (a new run): the reducer belongs to another checkpoint set now
    with pca_study.transaction() as w:
        run = w.add_run(seed=99)
        w.append(run, [0], pca_study.read_params([0]), train_loss=1.0)
    with pytest.raises(GlobScopeError, match="different study"):
        compute_landscape(pca_study, "pca-2d", 5, progress=False)


def test_grid_points_are_in_vtk_order():
    pts = grid_points(np.arange(12), (3, 2, 2), (0.0, 10.0, 100.0), (1.0, 2.0, 5.0), 3)
    assert pts[1].tolist() == [1.0, 10.0, 100.0] and pts[3].tolist() == [0.0, 12.0, 100.0]
    assert pts[6].tolist() == [0.0, 10.0, 105.0]


# --- trust: spikes and extrapolation (the merge tree on the trusted part: test_topology.py) --------
def test_find_spikes_2d_and_3d():
    from globscope_core.reducers.latent_grid import find_spikes

    for dims in [(9, 7, 1), (7, 6, 5)]:
        nx, ny, nz = dims
        g = np.stack(np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij"))
        f = (0.1 * g.sum(0)).astype(np.float64).ravel()  # a smooth ramp: no spike
        assert len(find_spikes(f, dims)) == 0
        inner = (nz // 2) * nx * ny + 3 * nx + 3
        f1 = f.copy()
        f1[inner] += 0.75  # 0.5 decades above its highest neighbour (+0.1): a spike
        assert find_spikes(f1, dims).tolist() == [inner]
        f1[inner] -= 0.3  # 0.35 above: not one
        assert len(find_spikes(f1, dims)) == 0
        f2 = f.copy()
        f2[inner] += 5
        f2[inner + 1] = np.nan  # a NaN neighbour counts as +inf: not isolated
        assert len(find_spikes(f2, dims)) == 0
        f3 = f.copy()
        f3[0] += 5  # grid-boundary points have fewer neighbours and are not tested
        assert len(find_spikes(f3, dims)) == 0


def test_hull_clamp_and_extrapolation_2d_3d():
    from globscope_core.reducers.latent_grid import HullClamp, hull_extrapolation

    rng = np.random.default_rng(0)
    for dim in (2, 3):
        Z = rng.normal(size=(40, dim))
        pts = rng.normal(size=(500, dim)) * 3
        ex = hull_extrapolation(Z, pts)
        c = HullClamp(Z)(pts)
        inside = ex == 0
        assert inside.any() and (~inside).any()
        np.testing.assert_array_equal(c[inside], pts[inside])  # inside: untouched
        assert np.abs(hull_extrapolation(Z, c[~inside])).max() < 1e-9  # outside: onto the hull ...
        center = Z.mean(0)  # ... along the ray from the centroid
        u, v = pts[~inside] - center, c[~inside] - center
        cos = (u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
        assert np.allclose(cos, 1) and np.all(np.linalg.norm(v, axis=1) < np.linalg.norm(u, axis=1))
        # the facet-plane distance is a lower bound of the true distance to the hull, exact on a facet's normal
        assert np.all(ex <= np.linalg.norm(pts[:, None] - Z[None], axis=2).min(1) + 1e-12)


# --- BatchNorm models through every stage ---------------------------------------------------------------
def write_cifar10(directory, n_train=64, n_test=32, seed=0):
    """Tiny CIFAR-10 python batches in the standard format (uint8 [N, 3072], b'labels')."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(10, 3072))

    def batch(n):
        y = rng.integers(0, 10, n)
        x = np.clip(128 + 50 * patterns[y] + 40 * rng.normal(size=(n, 3072)), 0, 255).astype(np.uint8)
        return {b"data": x, b"labels": [int(v) for v in y]}

    per = n_train // 5
    for i in range(5):
        with open(os.path.join(directory, f"data_batch_{i + 1}"), "wb") as f:
            pickle.dump(batch(per), f, protocol=2)
    with open(os.path.join(directory, "test_batch"), "wb") as f:
        pickle.dump(batch(n_test), f, protocol=2)


@pytest.fixture(scope="module")
def bn_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("bn")
    write_cifar10(str(root / "cifar"), n_train=40)
    rc, out, err = run_cli("train", "--dataset", "cifar10", "--data-dir", root / "cifar", "--model", "resnet20",
                           "--model-arg", "width=8", "--runs", "2", "--epochs", "2", "--batch-size", "20",
                           "--every", "1", "--eval-samples", "32", "--out", root / "s", "--device", "cpu")
    assert rc == 0, err
    return Study.open(str(root / "s"))


def test_resnet_study_stores_batchnorm_statistics(bn_study):
    names = [e.name for e in bn_study.layout.entries]
    assert "bn.running_mean" in names and "bn.running_var" in names
    assert not any(n.endswith("num_batches_tracked") for n in names)
    assert bn_study.n_checkpoints == 2 * 5  # steps 0..4 (40 samples / 20 a batch, 2 epochs)
    X = bn_study.read_params()
    e = next(e for e in bn_study.layout.entries if e.name == "bn.running_var")
    var = X[:, e.offset : e.offset + e.numel]
    assert np.allclose(var[0], 1.0) and not np.allclose(var[-1], 1.0)  # trained statistics are stored


def test_resnet_fit_and_landscape_match_one_model_loop(bn_study):
    from globscope_core.evaluation.many_models import eval_data, evaluate_flat
    from globscope_core.reducers import load_reducer
    from globscope_core.storage.vtk_files import arrays_of, read_any

    d = bn_study.dir
    rc, _, err = run_cli("fit", d, "--reducer", "pca", "--no-eval", "--device", "cpu")
    assert rc == 0, err
    rc, out, err = run_cli("landscape", d, "--reducer", "pca-2d", "--resolution", "3", "--eval-samples", "16",
                           "--device", "cpu", "--no-progress", "--beyond-hull", "extrapolate", "--bn", "decoded")
    assert rc == 0, err
    field = read_any(os.path.join(d, "landscape-2d.vti"))
    loss = arrays_of(field)["loss"]
    assert loss.shape == (9,) and np.isfinite(loss).all()

    # the same grid points, decoded and evaluated one model at a time in eval mode
    import json

    report = json.load(open(os.path.join(d, "report.json")))["landscape-2d"]
    lo, hi = np.asarray(report["bounds"][0::2]), np.asarray(report["bounds"][1::2])
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 3), np.linspace(lo[1], hi[1], 3))
    Z = np.stack([gx.ravel(), gy.ravel()], 1)  # VTK order: x fastest
    reducer = load_reducer(bn_study, "pca-2d")
    W = reducer.inverse_transform(Z)
    x, y = eval_data(bn_study, "test", 16)
    model = study_model(bn_study)
    loop = []
    for w in W:
        bn_study.layout.load_into(model, torch.from_numpy(np.ascontiguousarray(w)))
        loop.append(evaluate_model(model, x, y)[0])
    np.testing.assert_allclose(loss, np.array(loop), rtol=2e-4)
    # batched evaluation of the stored checkpoints equals the loop too, and it uses the decoded
    # running statistics: the same weights with fresh statistics give another loss
    last = bn_study.read_params([bn_study.n_checkpoints - 1])
    bl, _ = evaluate_flat(bn_study, torch.from_numpy(last), x, y, device="cpu")
    bn_study.layout.load_into(model, torch.from_numpy(last[0]))
    assert bl[0] == pytest.approx(evaluate_model(model, x, y)[0], rel=1e-4)
    fresh = last.copy()
    for e in bn_study.layout.entries:
        if e.name.endswith("running_mean"):
            fresh[0, e.offset : e.offset + e.numel] = 0.0
        elif e.name.endswith("running_var"):
            fresh[0, e.offset : e.offset + e.numel] = 1.0
    fl, _ = evaluate_flat(bn_study, torch.from_numpy(fresh), x, y, device="cpu")
    assert abs(fl[0] - bl[0]) > 1e-3
