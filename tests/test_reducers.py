"""Reducers (reducers/, issue 3): span basis, streamed Gram matrix, AE and baselines, save/load, metrics, CLI."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from globscope_core.cli import main
from globscope_core.errors import GlobScopeError
from globscope_core.reducers import fit_reducer, load_reducer
from globscope_core.reducers.basis import SpanBasis
from globscope_core.reducers.metrics import finals_apart, reconstruction, structure
from globscope_core.storage.study import Study

FAST_AE = {"epochs": 300, "width": 64}


def test_span_basis_is_exact_and_streams(tiny_study):
    X = tiny_study.read_params()
    b1, b2 = SpanBasis(), SpanBasis()
    C1 = b1.fit(tiny_study)
    C2 = b2.fit(tiny_study, block_rows=4)  # many blocks: the block-pair Gram must agree
    assert b1.rank <= tiny_study.n_checkpoints - 1
    np.testing.assert_allclose(b1.V @ b1.V.T, np.eye(b1.rank), atol=1e-4)
    np.testing.assert_allclose(np.abs(C1), np.abs(C2), rtol=1e-3, atol=1e-3 * np.abs(C1).max())
    back = b1.from_coords_torch(torch.as_tensor(b1.to_coords(X))).numpy()
    assert ((back - X) ** 2).mean() < 1e-10 * max(1.0, (X**2).mean())


def test_decoded_batchnorm_variances_keep_a_floor(tmp_path):
    """Variances decode to no less than the smallest a checkpoint had; other coordinates are free."""
    from globscope_core.networks import models
    from globscope_core.networks.datasets import make_spec
    from globscope_core.storage.state_layout import StateLayout

    spec = models.make_spec("resnet20", (1, 8, 8), 10)
    layout = StateLayout.from_module(models.build_model(spec))
    var = np.zeros(layout.size, bool)
    for e in layout.entries:
        var[e.offset : e.offset + e.numel] = e.name.endswith("running_var")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(8, layout.size)).astype(np.float32)
    X[:, var] = 0.5 + rng.random((8, int(var.sum()))).astype(np.float32)
    study = Study.create(str(tmp_path / "s"), spec, make_spec("digits"), layout)
    with study.transaction() as w:
        run = w.add_run(seed=0)
        for i, row in enumerate(X):
            w.append(run, i, row, train_loss=1.0)
    red = fit_reducer(Study.open(study.dir), "pca", 2)
    lower = red.basis.lower
    np.testing.assert_array_equal(lower[var], X[:, var].min(0))
    assert np.all(np.isneginf(lower[~var]))
    # far out in the latent space the linear decoder would give negative variances
    far = torch.as_tensor(100 * np.abs(red.embedding_).max() * np.array([[1.0, -1.0], [-1.0, 1.0]]),
                          dtype=torch.float32)
    raw = red.basis.mean + (red.decode_coords(far.numpy()) @ red.basis.V) * red.basis.scale
    assert (raw[:, var] < 0).any() and (raw[:, ~var] < X[:, ~var].min(0)).any()
    out = load_reducer(Study.open(study.dir), "pca-2d").inverse_transform_torch(far).numpy()
    assert np.all(out[:, var] >= X[:, var].min(0))
    np.testing.assert_allclose(out[:, ~var], raw[:, ~var], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", ["pca", "kpca", "ae"])
def test_fit_save_load_roundtrip(study_copy, kind):
    cfg = FAST_AE if kind == "ae" else {}
    r = fit_reducer(study_copy, kind, 2, **cfg)
    path = os.path.join(study_copy.dir, "reducers", f"{kind}-2d.pt")
    assert os.path.exists(path)
    torch.load(path, weights_only=True)  # plain tensors, no pickled code
    r2 = load_reducer(study_copy, f"{kind}-2d")
    X = study_copy.read_params()
    Z = r.transform(X)
    assert Z.shape == (len(X), 2)
    np.testing.assert_allclose(r2.transform(X), Z, rtol=1e-5, atol=1e-6 * np.abs(Z).max())
    np.testing.assert_allclose(r.embedding_, Z, rtol=1e-4, atol=1e-5 * np.abs(Z).max())
    Xr = r2.inverse_transform(Z)
    np.testing.assert_allclose(Xr, r.inverse_transform(Z), rtol=1e-5, atol=1e-6)
    xt = r2.inverse_transform_torch(torch.as_tensor(Z, dtype=torch.float32))
    assert xt.dtype == torch.float32 and xt.shape == X.shape


def test_ae_beats_baselines_and_decoded_models_work(study_copy):
    ae = fit_reducer(study_copy, "ae", 2, save=False, epochs=800, width=64)
    kp = fit_reducer(study_copy, "kpca", 2, save=False)
    pca = fit_reducer(study_copy, "pca", 2, save=False)
    e_ae, e_kp, e_pca = (reconstruction(r, study_copy) for r in (ae, kp, pca))
    assert e_ae["mse_std"] * 20 < e_kp["mse_std"]
    assert e_ae["mse_raw"] * 20 < e_kp["mse_raw"]
    assert e_ae["mse_std"] < e_pca["mse_std"]
    from globscope_core.reducers.metrics import function_space

    fs = function_space(ae, study_copy, eval_samples=300)
    assert fs["loss_gap_max"] < 0.05, fs["loss_gap_max"]


def test_kpca_matches_sklearn(study_copy):
    from sklearn.decomposition import KernelPCA

    r = fit_reducer(study_copy, "kpca", 3, save=False, alpha=0.1)
    C = r.coords_ / r.unit_
    kp = KernelPCA(n_components=3, kernel="rbf", gamma=1.0, fit_inverse_transform=True, alpha=0.1,
                   eigen_solver="dense").fit(C)
    Z = r._encode(r.coords_)
    np.testing.assert_allclose(np.abs(Z), np.abs(kp.transform(C)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(r.decode_coords(Z) / r.unit_, kp.inverse_transform(Z), rtol=1e-4, atol=1e-6)


def test_umap_fit_and_saved_inverse(study_copy):
    r = fit_reducer(study_copy, "umap", 2, check_inverse=False)
    r2 = load_reducer(study_copy, "umap-2d")
    X = study_copy.read_params()
    np.testing.assert_allclose(r2.transform(X), r.embedding_, atol=1e-6)
    Xr = r2.inverse_transform(r.embedding_)
    assert Xr.shape == X.shape and np.isfinite(Xr).all()
    rec = reconstruction(r2, study_copy)
    assert 0 < rec["mse_std"] < 2.0  # a weighted average of checkpoints: bounded, not exact


def test_structure_metrics_are_sensitive():
    rng = np.random.default_rng(0)
    C = rng.normal(size=(40, 6))
    good = structure(C, C[:, :2] * 3)
    bad = structure(C, rng.normal(size=(40, 2)))
    assert good["trustworthiness"] > bad["trustworthiness"] + 0.1
    assert good["distance_spearman"] > bad["distance_spearman"] + 0.3


def test_finals_apart(tiny_study):
    Z = np.zeros((tiny_study.n_checkpoints, 2))
    assert finals_apart(tiny_study, Z) == 0.0  # everything collapsed: no run kept apart
    for r in range(len(tiny_study.runs)):
        rows = tiny_study.run_rows(r)
        Z[rows, 0] = 10.0 * r + np.linspace(0, 1, len(rows))
    assert finals_apart(tiny_study, Z) == 1.0


def test_cli_fit_and_compare(study_copy, capsys):
    d = study_copy.dir
    assert main(["fit", d, "--reducer", "ae", "--dim", "3", "--epochs", "200", "--width", "32",
                 "--eval-samples", "200"]) == 0
    assert os.path.exists(os.path.join(d, "reducers", "ae-3d.pt"))
    rep = json.load(open(os.path.join(d, "report.json")))
    assert rep["fit-ae-3d"]["reconstruction"]["mse_raw"] > 0
    assert main(["compare", d, "--dim", "2", "--reducers", "ae,pca,kpca", "--epochs", "200", "--width", "32",
                 "--eval-samples", "200"]) == 0
    out = capsys.readouterr().out
    assert "kpca-2d" in out and "ae-2d" in out
    rep = json.load(open(os.path.join(d, "report.json")))
    rows = rep["compare-2d"]
    assert [r["reducer"] for r in rows] == ["ae-2d", "pca-2d", "kpca-2d", "two-neighbour"]
    assert all(r["peak_rss_mb"] > 0 and 0 <= r["trustworthiness"] <= 1 for r in rows[:-1])
    # held-out columns for every reducer, and the reference row has only those
    assert all(r["ho_mse_std"] > 0 and r["ho_loss_gap_median"] >= 0 for r in rows[:-1])
    assert rows[0]["ho_mse_std"] > 10 * rows[0]["mse_std"]  # the AE's memory is not its held-out fidelity
    assert rows[-1]["mse_raw"] is None and rows[-1]["ho_mse_raw"] > 0
    assert rep["fit-ae-3d"]["held_out"]["two_neighbour"]["mse_raw"] == rows[-1]["ho_mse_raw"]
    assert "held-out" in out and "two-neighbour" in out
    # compare fits in memory: the saved reducers and their report sections are fit's alone
    assert os.listdir(os.path.join(d, "reducers")) == ["ae-3d.pt"]
    assert not any(k.startswith("fit-") and k != "fit-ae-3d" for k in rep)
    with open(os.path.join(d, "compare-2d.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _study_with(tmp_path, tiny_study, transform, n=None):
    """A copy of tiny_study whose parameter rows are transformed (written through the store API)."""
    dst = tmp_path / "bad"
    shutil.copytree(tiny_study.dir, dst)
    os.remove(dst / "study.h5")
    s = Study.create(str(dst), tiny_study.model_spec, tiny_study.dataset_spec, tiny_study.layout)
    X = transform(tiny_study.read_params()[: n or tiny_study.n_checkpoints])
    with s.transaction() as w:
        r = w.add_run(seed=0)
        w.append(r, np.arange(len(X)), X, train_loss=1.0)
    return s


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, tiny_study, capsys):
    def nan(X):
        X = X.copy()
        X[3, 7] = np.nan
        return X

    cases = [
        (lambda X: X, 2, "checkpoints, the reducer needs"),
        (lambda X: np.repeat(X[:1], len(X), 0), None, "identical"),
        (nan, None, "NaN or Inf"),
    ]
    for i, (fn, n, msg) in enumerate(cases):
        s = _study_with(tmp_path / str(i), tiny_study, fn, n)
        with pytest.raises(GlobScopeError, match=msg) as ei:
            fit_reducer(s, "ae", 2, epochs=5)
        assert s.h5_path in str(ei.value)
        assert not os.path.exists(os.path.join(s.dir, "reducers", "ae-2d.pt"))
    s = _study_with(tmp_path / "dim", tiny_study, lambda X: X)
    assert main(["fit", s.dir, "--dim", "4"]) == 2
    assert "argument --dim: invalid choice: 4 (choose from 2, 3)" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(s.dir, "reducers"))
    with pytest.raises(GlobScopeError, match="latent dimension"):
        fit_reducer(s, "pca", 5)


def test_held_out_rows_are_excluded_from_the_fit(tiny_study):
    from globscope_core.reducers.holdout import HeldOutScorer, RowSubset, fit_held_out, holdout_split

    fit_rows, held, nb = holdout_split(tiny_study)
    # the rule: positions 3, 7, ... of each run, never the first two nor the last; neighbours are fitted
    for r in range(len(tiny_study.runs)):
        rows = list(tiny_study.run_rows(r, label=None))
        pos = sorted(rows.index(h) for h in held if h in rows)
        assert pos and all(p % 4 == 3 and 2 <= p < len(rows) - 1 for p in pos)
    assert len(np.intersect1d(fit_rows, held)) == 0 and len(fit_rows) + len(held) == tiny_study.n_checkpoints
    assert np.isin(nb, fit_rows).all()
    # the streamed rows the reducer is fitted on are exactly the fitted rows
    seen = [b for _, b in RowSubset(tiny_study, fit_rows).iter_params(4)]
    np.testing.assert_array_equal(np.concatenate(seen), tiny_study.read_params(fit_rows))
    r = fit_held_out(tiny_study, "pca", 2)
    np.testing.assert_array_equal(r.fit_rows_, fit_rows)
    assert r.embedding_.shape[0] == len(fit_rows)
    # held-out rows are not in the fitted span: PCA with the full span keeps more of them than one without
    X = tiny_study.read_params(held)
    C = r.basis.to_coords(X)
    resid = np.linalg.norm(r.basis.standardize(X)) ** 2 - np.linalg.norm(C) ** 2
    assert resid > 1e-3 * np.linalg.norm(C) ** 2
    # the two-neighbour reference scores what it says: a held-out row scored against its own value is 0
    sc = HeldOutScorer(tiny_study, eval_samples=100)
    assert sc.score(lambda k, B: B, r.basis.scale)["mse_raw"] == 0
    two = sc.score_two_neighbour(r.basis.scale)
    mean = 0.5 * (tiny_study.read_params(nb[:, 0]).astype(np.float64) + tiny_study.read_params(nb[:, 1]))
    assert np.isclose(two["mse_raw"], ((mean - X) ** 2).mean(), rtol=1e-5)


def test_ae_spline_residual_interpolates_between_checkpoints(tiny_study):
    """The default residual (polyharmonic spline) keeps every fitted checkpoint and decodes held-out ones
    about as well as the mean of their two trajectory neighbours; the earlier Gaussian kernel does worse."""
    from globscope_core.reducers.holdout import HeldOutScorer, fit_held_out

    sc = HeldOutScorer(tiny_study, eval_samples=200)
    cfg = {"epochs": 200, "width": 32}
    spline = fit_held_out(tiny_study, "ae", 2, **cfg)
    gauss = fit_held_out(tiny_study, "ae", 2, residual="gaussian", **cfg)
    C = spline.coords_
    fitted = ((spline.decode_coords(spline.embedding_) - C) ** 2).sum(1).mean() / spline.basis.n_params
    assert fitted < 1e-8
    s, g = sc.score_reducer(spline), sc.score_reducer(gauss)
    ref = sc.score_two_neighbour(spline.basis.scale)
    assert s["mse_std"] < g["mse_std"] and s["mse_std"] < 1.5 * ref["mse_std"], (s, g, ref)
    # saved and loaded, the spline decodes the same
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        spline.save(os.path.join(d, "ae.pt"))
        from globscope_core.reducers import Reducer

        back = Reducer.load(os.path.join(d, "ae.pt"))
    z = spline.embedding_[:5] + 0.1
    np.testing.assert_allclose(back.inverse_transform(z), spline.inverse_transform(z), rtol=1e-6, atol=1e-7)


# --- the streamed Gram matrix -----------------------------------------------------------------------
def test_streamed_gram_matrix_equals_the_whole_product(tiny_study):
    """Panels held against streamed blocks (sized in bytes) give S S^T exactly, in float64."""
    from globscope_core.reducers.gram import gram_matrix

    X = tiny_study.read_params()
    mean = X.mean(0)
    S = (X - mean).astype(np.float64)
    P = tiny_study.n_params
    for panel, block in ((5, 2), (7, 7), (100, 3), (1, 1)):  # rows; uneven splits on purpose
        G = gram_matrix(tiny_study, lambda B: B - mean, panel_bytes=panel * 8 * P, block_bytes=block * 4 * P)
        np.testing.assert_allclose(G, S @ S.T, rtol=1e-12, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU path of the Gram pass)")
def test_streamed_gram_matrix_on_gpu_equals_the_host_one(tiny_study):
    from globscope_core.reducers.gram import gram_matrix

    X = tiny_study.read_params()
    mean = X.mean(0)
    P = tiny_study.n_params
    host = gram_matrix(tiny_study, lambda B: B - mean)
    for panel, block in ((None, 3), (5, 2), (1, 1)):
        G = gram_matrix(tiny_study, lambda B: B - mean, panel_bytes=panel and panel * 8 * P,
                        block_bytes=block * 4 * P, device=torch.device("cuda"))
        np.testing.assert_allclose(G, host, rtol=1e-12, atol=1e-9)
