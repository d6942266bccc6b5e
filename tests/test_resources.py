"""Resources (resources.py, reducers/budget.py): memory limits, refusals before starting, --device cuda, truncation."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import one_line_error, run_cli

from globscope_core import resources
from globscope_core.errors import GlobScopeError
from globscope_core.reducers import budget


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
    with pytest.raises(GlobScopeError, match=r"fit x: needs about (9|10)\.\d\d GiB of memory \(basis V \[k, P\] 8\.79"):
        resources.require(parts, "fit x")
    # the exact basis streamed from the checkpoints is what makes it fit (a truncated one would too)
    plan = budget.basis_plan(4_718_118, 500)
    assert plan.streamed and "more than GLOBSCOPE_BASIS_BYTES (2.00 GiB)" in plan.why, plan.why
    streamed = budget.estimate_fit(4_718_118, 500, streamed=True)
    assert "basis V [k, P]" not in streamed and sum(streamed.values()) < 4.5e9  # the target
    assert sum(budget.estimate_fit(4_718_118, 500, max_rank=113).values()) < 4.5e9
    assert resources.require({"a": 1 << 20}, "ok")["host_bytes"] == 1 << 20


def test_train_refuses_before_starting(tmp_path):
    out = tmp_path / "s"
    rc, _, err = run_cli("train", "--dataset", "digits", "--model", "mlp", "--runs", "1", "--epochs", "3",
                         "--every", "1", "--out", out, env={"GLOBSCOPE_MEMORY_LIMIT": "400M"})  # > the interpreter
    one_line_error(rc, err, "needs about", "checkpoints of one run", "only 400 MiB is there (GLOBSCOPE_MEMORY_LIMIT)",
                   "--every")
    assert not os.path.exists(out / "study.h5")  # nothing was trained, and no empty study blocks the rerun


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
    one_line_error(rc, err, "landscape", "needs about", "held now", "only 100 MiB is there")
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



# --- devices --------------------------------------------------------------------------------------
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
