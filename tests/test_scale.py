"""Scale: memory checks before work, checkpoints of any precision, BatchNorm models end to end."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from globscope_core import resources
from globscope_core.errors import GlobScopeError
from globscope_core.evaluation.one_model import evaluate_model
from globscope_core.networks.models import study_model
from globscope_core.reducers import budget
from globscope_core.stages.import_ import import_checkpoints
from globscope_core.storage.study import Study


def run_cli(*args, env=None):
    exe = os.path.join(os.path.dirname(sys.executable), "globscope")
    p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    return p.returncode, p.stdout, p.stderr


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


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


# --- memory: say what is needed before starting ------------------------------------------------------
def test_sizes_and_limits(monkeypatch):
    assert resources.parse_size("4G") == 4 << 30 and resources.parse_size("512MiB") == 512 << 20
    assert resources.parse_size("1000") == 1000
    monkeypatch.setenv("GLOBSCOPE_MEMORY_LIMIT", "lots")
    with pytest.raises(GlobScopeError, match="GLOBSCOPE_MEMORY_LIMIT='lots': not a size"):
        resources.host_memory()
    monkeypatch.setenv("GLOBSCOPE_MEMORY_LIMIT", "1G")
    have, source = resources.host_memory()
    assert have == 1 << 30 and source == "GLOBSCOPE_MEMORY_LIMIT"
    # the paper's CNN with 500 checkpoints and an exact basis: the basis alone is 9.5 GB
    parts = budget.estimate_fit(4_718_118, 500, block_rows=8)
    assert 9.4e9 < parts["basis V [k, P]"] < 9.5e9
    with pytest.raises(GlobScopeError, match=r"fit x: needs about 10\.\d\d GiB of memory \(basis V \[k, P\] 8\.79 GiB"):
        resources.require(parts, "fit x")
    # a truncated basis is what makes it fit
    k = budget.default_max_rank(4_718_118)
    assert 100 < k and k * 4_718_118 * 4 <= 2 << 30
    small = budget.estimate_fit(4_718_118, 500, max_rank=k)
    assert sum(small.values()) < 4.5e9  # the target
    assert resources.require({"a": 1 << 20}, "ok")["host_bytes"] == 1 << 20


def test_train_refuses_before_starting(tmp_path):
    out = tmp_path / "s"
    rc, _, err = run_cli("train", "--dataset", "digits", "--model", "mlp", "--runs", "1", "--epochs", "3",
                         "--every", "1", "--out", out, env={"GLOBSCOPE_MEMORY_LIMIT": "200M"})
    one_line_error(rc, err, "needs about", "checkpoints of one run", "only 200 MiB is there (GLOBSCOPE_MEMORY_LIMIT)",
                   "--every")
    assert not os.path.exists(out / "study.h5")  # nothing was trained, and no empty study blocks the rerun


def test_device_cuda_without_gpu_is_a_clear_error_everywhere(tiny_study, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    s = str(tiny_study.dir)
    ckpt = tmp_path / "c.pt"
    torch.save(tiny_study.layout.unflatten(torch.from_numpy(tiny_study.read_params([0])[0])), ckpt)
    cases = [
        ("train", "--dataset", "digits", "--model", "mlp", "--out", tmp_path / "t"),
        ("import", tmp_path / "i", ckpt, "--dataset", "digits", "--model", "mlp", "--model-arg", "widths=[32]"),
        ("fit", s, "--reducer", "pca"),
        ("landscape", s, "--reducer", "pca-2d"),
        ("align", s, "--out", tmp_path / "a"),
    ]
    for args in cases:
        rc, _, err = run_cli(*args, "--device", "cuda")
        one_line_error(rc, err, "no CUDA GPU is available")
    assert not os.path.exists(os.path.join(s, "reducers", "pca-2d.pt"))
    assert not os.path.exists(tmp_path / "a")


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


# --- checkpoints of any floating precision -------------------------------------------------------------
def test_import_mixed_precision_checkpoints(tiny_study, tmp_path):
    row = tiny_study.run_rows(0)[-1]
    ref = torch.from_numpy(tiny_study.read_params([row])[0])
    state = tiny_study.layout.unflatten(ref)
    names = list(state)
    files, expect = [], []
    for dtype in (torch.float16, torch.bfloat16, torch.float64, "mixed"):
        if dtype == "mixed":  # weights in half precision, biases in double
            st = {k: v.to(torch.float16 if k.endswith("weight") else torch.float64) for k, v in state.items()}
        else:
            st = {k: v.to(dtype) for k, v in state.items()}
        path = tmp_path / f"{str(dtype).replace('torch.', '')}.pt"
        torch.save(st, path)
        files.append(str(path))
        expect.append(torch.cat([st[k].reshape(-1).float() for k in names]).numpy())
    dst = tmp_path / "study"
    shutil.copytree(tiny_study.dir, dst)
    rc, out, err = run_cli("import", dst, *files)
    assert rc == 0, err
    s = Study.open(str(dst))
    rows = s.run_rows(len(s.runs) - 1, label=None)
    got = s.read_params(rows)
    assert got.dtype == np.float32 and got.shape == (4, s.n_params)
    for g, e in zip(got, expect):
        np.testing.assert_array_equal(g, e)  # exact: every format widens losslessly (float64 rounds once)
    np.testing.assert_allclose(got[2], ref.numpy())  # float64 of float32 values comes back exactly
    # half precision changes the loss a little, not much
    loss32 = tiny_study.metrics["test_loss"][row]
    assert abs(s.metrics["test_loss"][rows[0]] - loss32) < 0.02 * loss32
    assert not np.array_equal(got[0], ref.numpy())


def test_import_refuses_integer_and_overflowing_checkpoints(tiny_study, tmp_path):
    state = tiny_study.layout.unflatten(torch.from_numpy(tiny_study.read_params([0])[0]))
    first = next(iter(state))
    quant = dict(state, **{first: (state[first] * 100).to(torch.int8)})
    torch.save(quant, tmp_path / "q.pt")
    big = {k: v.double() for k, v in state.items()}
    big[first] = big[first].clone()
    big[first][0] = 1e300
    torch.save(big, tmp_path / "big.pt")
    dst = tmp_path / "study"
    shutil.copytree(tiny_study.dir, dst)
    before = open(dst / "study.h5", "rb").read()
    with pytest.raises(GlobScopeError, match=rf"q.pt: '{first}' is int8, the model expects a floating tensor"):
        import_checkpoints(str(dst), [str(tmp_path / "q.pt")])
    rc, _, err = run_cli("import", dst, tmp_path / "big.pt")
    one_line_error(rc, err, f"big.pt: '{first}' has values that are NaN or Inf in float32")
    assert open(dst / "study.h5", "rb").read() == before


# --- BatchNorm models through every stage ---------------------------------------------------------------
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
                           "--device", "cpu", "--no-progress", "--beyond-hull", "extrapolate")
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


def test_fit_and_landscape_refuse_before_starting(study_copy):
    d = study_copy.dir
    limit = {"GLOBSCOPE_MEMORY_LIMIT": "100M"}
    rc, _, err = run_cli("fit", d, "--reducer", "pca", "--no-eval", env=limit)
    one_line_error(rc, err, "fit pca-2d", "21 checkpoints x 2,410 parameters", "needs about", "only 100 MiB is there",
                   "--max-rank")
    assert not os.path.exists(os.path.join(d, "reducers", "pca-2d.pt"))
    rc, _, err = run_cli("fit", d, "--reducer", "pca", "--no-eval")
    assert rc == 0, err
    rc, _, err = run_cli("landscape", d, "--reducer", "pca-2d", "--resolution", "5", env=limit)
    one_line_error(rc, err, "landscape", "needs about", "activations", "only 100 MiB is there")
    assert not os.path.exists(os.path.join(d, "landscape-2d.vti"))


def test_truncated_basis_keeps_memory_and_reports_its_error(study_copy):
    """--max-rank: the basis holds k rows of P, and the variance it leaves out is the error floor."""
    from globscope_core.reducers import fit_reducer
    from globscope_core.reducers.metrics import reconstruction

    exact = fit_reducer(study_copy, "pca", 2, save=False)
    small = fit_reducer(study_copy, "pca", 2, save=False, max_rank=4)
    assert small.basis.V.shape == (4, study_copy.n_params) and exact.basis.rank > 4
    np.testing.assert_allclose(small.transform(study_copy), exact.transform(study_copy), rtol=1e-4, atol=1e-6)
    e_small = reconstruction(small, study_copy)["mse_std"]
    e_exact = reconstruction(exact, study_copy)["mse_std"]
    assert e_small == pytest.approx(e_exact, rel=1e-3)  # PCA-2d decodes from 2 directions either way
    ae = fit_reducer(study_copy, "ae", 2, save=False, max_rank=6, epochs=200, device="cpu")
    left_out = 1.0 - float(ae.basis.explained.sum())
    assert 0 < left_out < 0.05
    assert reconstruction(ae, study_copy)["mse_std"] >= 0.5 * left_out
