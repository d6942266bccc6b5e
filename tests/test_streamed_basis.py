"""Issue 20.2 and 20.6: an exact basis without V [k, P] in memory. When V does not fit, the basis is streamed from
the checkpoints (reducers/basis.py); fit and landscape then stay under the memory limit and give the same reducer
and the same field (to float32 rounding) as the in-memory path."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from globscope_core.errors import GlobScopeError
from globscope_core.reducers import basis as basis_mod
from globscope_core.reducers import gram
from globscope_core.reducers.budget import basis_plan

CLI = [sys.executable, "-m", "globscope_core.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _matrix(n=40, p=5000, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, p)) * np.linspace(0.1, 2, p) + rng.standard_normal(p)).astype(np.float32)


def test_the_gram_matrix_is_the_same_to_the_last_bit_whatever_the_panel():
    X = _matrix()
    src = basis_mod.ArraySource(X)
    assert gram.tile_rows(X.shape[1]) == 16 and len(X) % 16  # several tiles and a partial one
    ref = gram.gram_matrix(src, np.asarray, panel_bytes=1 << 30)
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(ref, X64 @ X64.T, rtol=1e-12)
    row = 8 * X.shape[1]
    for panel, block in ((16 * row, 16 * 4 * X.shape[1]), (32 * row, 1), (1, 1 << 30)):
        G = gram.gram_matrix(src, np.asarray, panel_bytes=panel, block_bytes=block)
        assert np.array_equal(G, ref), (panel, block)
    assert np.array_equal(ref, ref.T)


def test_a_streamed_basis_is_the_in_memory_basis_without_v():
    X = _matrix(30, 3000)
    mem, st = basis_mod.SpanBasis(), basis_mod.SpanBasis()
    C_mem = mem.fit(X)
    C_st = st.fit(X, streamed=True, panel_bytes=8 * 3000)  # one row per panel: the study read 30 times
    assert np.array_equal(C_mem, C_st)  # the same Gram matrix, so the same coordinates
    assert st.streamed and st.V is None and st.W.shape == (mem.rank, 30) and st.rank == mem.rank
    new = _matrix(5, 3000, seed=1)
    np.testing.assert_allclose(st.to_coords(new), mem.to_coords(new), rtol=1e-4, atol=1e-4)
    c = torch.randn(7, mem.rank, dtype=torch.float64)
    np.testing.assert_allclose(st.from_coords_torch(c).numpy(), mem.from_coords_torch(c).numpy(), rtol=1e-4,
                               atol=1e-5)
    # a fitted checkpoint decodes to itself, exactly in standardized units (below the 1e-8 of the small studies)
    dec = st.from_coords_torch(torch.from_numpy(C_st[:4])).numpy()
    assert (((dec - X[:4]) / st.scale) ** 2).mean() < 1e-10
    # saved without V: W and the rows it needs; loaded alone it refuses to decode, attached it decodes
    state = st.state()
    assert "basis_V" not in state and state["basis_W"].shape == (mem.rank, 30)
    back = basis_mod.SpanBasis.from_state(state)
    with pytest.raises(GlobScopeError, match="streamed from its study's checkpoints: load it with its study"):
        back.from_coords_torch(c)
    with pytest.raises(GlobScopeError, match="the streamed basis was fitted on 30 x 3,000; refit it"):
        back.attach(X[:20])
    back.attach(X)
    assert torch.equal(back.from_coords_torch(c), st.from_coords_torch(c))


def test_the_plan_says_which_path_runs_and_why(monkeypatch):
    from globscope_core.reducers import budget

    monkeypatch.setattr(budget, "held_now", lambda: {"held now": 400 << 20})  # not this test process's size
    monkeypatch.delenv("GLOBSCOPE_MEMORY_LIMIT", raising=False)
    small = basis_plan(10_000, 20)
    assert small.mode == "memory" and small.why == "V [k, P] is 0.8 MiB"
    monkeypatch.setenv("GLOBSCOPE_BASIS_BYTES", "100M")
    big = basis_plan(10_000_000, 20)
    assert big.streamed and big.why == "V [k, P] would be 763 MiB, more than GLOBSCOPE_BASIS_BYTES (100 MiB)"
    monkeypatch.setenv("GLOBSCOPE_BASIS_BYTES", "100G")
    monkeypatch.setenv("GLOBSCOPE_MEMORY_LIMIT", "2G")  # below V (2.24 GiB)
    tight = basis_plan(10_000_000, 60)
    assert tight.streamed and "would need" in tight.why and "more than the 2.00 GiB there (GLOBSCOPE_MEMORY_LIMIT)" \
        in tight.why
    assert tight.panel_bytes == gram.tiled_rows(gram.PANEL_BYTES, 10_000_000, 60, 8) * 8 * 10_000_000  # room for it
    # below that the Gram panel takes the room its own phase leaves (whole tiles, at least one), and the plan says so:
    # the largest such panel, whose fit fits where one more tile would not
    monkeypatch.setenv("GLOBSCOPE_MEMORY_LIMIT", "1.6G")
    tighter = basis_plan(10_000_000, 60)
    assert tighter.streamed and tighter.why.endswith("; Gram panel 458 MiB to fit in 1.60 GiB (GLOBSCOPE_MEMORY_LIMIT)")
    row, tile = 8 * 10_000_000, gram.tile_rows(10_000_000) * 8 * 10_000_000

    def need(panel):
        return sum(budget.estimate_fit(10_000_000, 60, streamed=True, panel_bytes=panel).values())

    assert need(tighter.panel_bytes) <= 1.6 * 2**30 < need(tighter.panel_bytes + tile)
    assert tighter.panel_bytes % tile == 0 and tighter.panel_bytes < tight.panel_bytes and row < tile
    monkeypatch.setenv("GLOBSCOPE_MEMORY_LIMIT", "1.1G")  # not even one tile's room: one tile, the least there is
    assert basis_plan(10_000_000, 60).panel_bytes == tile
    assert basis_plan(10_000, 20, mode="streamed").why == "--basis streamed"


def test_the_panel_leaves_room_for_what_the_stage_holds(monkeypatch):
    """The plan sized the Gram panel with the bare fit's estimate, the stage then added the held-out scorer and
    refused the fit (GPT-2 small under 11G: an 8-row panel where 7 fit). The plan now counts the stage's parts."""
    from globscope_core.reducers import budget

    monkeypatch.setattr(budget, "held_now", lambda: {"held now": 400 << 20})
    monkeypatch.setenv("GLOBSCOPE_BASIS_BYTES", "100M")
    monkeypatch.setenv("GLOBSCOPE_MEMORY_LIMIT", "2G")
    P, N = 10_000_000, 60
    stage = dict(evaluate={"model": 8 * 4 * P, "data": 50 << 20, "eval": 10 << 20, "activations": 10 << 20},
                 holdout_rows=12)
    bare, full = basis_plan(P, N), basis_plan(P, N, **stage)
    tile = gram.tile_rows(P) * 8 * P

    def need(plan, extra=0):
        return sum(budget.estimate_fit(P, N, streamed=True, panel_bytes=plan.panel_bytes + extra, **stage).values())

    assert full.streamed and full.panel_bytes < bare.panel_bytes
    assert need(full) <= 2 * 2**30 < need(bare) and need(full, tile) > 2 * 2**30


def _run(*args, env=None):
    """A command's exit, stderr and peak resident memory (ru_maxrss of a wrapper's only child, in bytes)."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr); "
               "sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", wrapper, *CLI, *map(str, args)], env={**ENV, **(env or {})},
                       capture_output=True, text=True, timeout=900)
    return r.returncode, r.stderr, int(r.stderr.strip().splitlines()[-1])


def _field(path):
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkIOXML import vtkXMLImageDataReader

    r = vtkXMLImageDataReader()
    r.SetFileName(str(path))
    r.Update()
    return vtk_to_numpy(r.GetOutput().GetPointData().GetArray("loss"))


@pytest.mark.slow
def test_fit_and_landscape_stream_under_a_memory_limit_and_match_the_in_memory_path(tmp_path):
    """A 4.3e6-parameter study of 27 checkpoints: V is 448 MiB and the in-memory fit needs about 1.5 GiB. Under a
    1.2 GiB limit the basis is streamed and every stage stays below the limit. (At this size the interpreter alone
    takes 0.4 GB, so the limit is below what holding V needs, not below V; bench/ covers V larger than the limit.)"""
    mem, st = tmp_path / "mem", tmp_path / "streamed"
    train = ["train", "--dataset", "digits", "--model", "mlp", "--model-arg", "widths=[2048,2048]", "--runs", 3,
             "--epochs", 4, "--every", 12, "--out", mem, "--eval-samples", 128]
    r = subprocess.run([*CLI, *map(str, train)], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.copytree(mem, st)
    limit = 1.2 * 2**30
    tight = {"GLOBSCOPE_MEMORY_LIMIT": "1.2G"}
    rc, err, peak = _run("fit", st, "--reducer", "ae", "--no-holdout", "--eval-samples", 64, env=tight)
    assert rc == 0, err[-2000:]
    assert "basis: every direction of the checkpoints' span, streamed from the checkpoints: a fit holding V [k, P] " \
           "(448 MiB) would need" in err and "more than the 1.20 GiB there (GLOBSCOPE_MEMORY_LIMIT)" in err
    assert peak < limit, peak
    print("FITPEAK", peak)
    rc, err, peak = _run("landscape", st, "--reducer", "ae-2d", "--resolution", 7, "--eval-samples", 64, env=tight)
    assert rc == 0 and peak < limit, (peak, err[-2000:])
    assert "streamed row block" in err  # the estimate counts what streaming holds
    report = json.loads((st / "report.json").read_text())["fit-ae-2d"]
    assert report["basis_mode"] == "streamed" and report["reconstruction"]["mse_std"] < 1e-8

    rc, err, _ = _run("fit", mem, "--reducer", "ae", "--no-holdout", "--no-eval")
    assert rc == 0 and "in memory: V [k, P] is 448 MiB" in err, err[-2000:]
    rc, err, _ = _run("landscape", mem, "--reducer", "ae-2d", "--resolution", 7, "--eval-samples", 64)
    assert rc == 0, err[-2000:]
    a = torch.load(mem / "reducers" / "ae-2d.pt", weights_only=True)["state"]
    b = torch.load(st / "reducers" / "ae-2d.pt", weights_only=True)["state"]
    assert set(a) - set(b) == {"basis_V"} and set(b) - set(a) == {"basis_W"}
    assert all(torch.equal(a[k], b[k]) for k in set(a) & set(b))  # the same reducer, bit for bit
    np.testing.assert_allclose(_field(st / "landscape-2d.vti"), _field(mem / "landscape-2d.vti"), rtol=1e-5)


def test_held_out_scoring_of_a_streamed_basis_reads_the_study_once_per_group(study_copy, monkeypatch):
    """Issue 20.4 at 1e8: the held-out rows were encoded and decoded one work block (one row at 1.2e8 parameters)
    at a time, two passes over the 20 GB study per held-out row. A group of rows now shares a pass, and the scores
    are those of the in-memory basis (to float32 rounding)."""
    from globscope_core.reducers import holdout

    scorer = holdout.HeldOutScorer(study_copy, eval_samples=200)
    n_held = len(scorer.held_rows)
    assert n_held >= 3
    scores, passes = {}, {}
    for mode in ("memory", "streamed"):
        r = holdout.fit_held_out(study_copy, "pca", 2, basis=mode)
        assert r.basis.streamed == (mode == "streamed")
        calls = []
        if r.basis.streamed:
            source = r.basis.source
            real = source.iter_params
            monkeypatch.setattr(source, "iter_params", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
            monkeypatch.setattr(holdout, "held_out_group", lambda p, n: 2)  # 2 rows per pass: several groups
        scores[mode], passes[mode] = scorer.score_reducer(r), len(calls)
    assert passes["streamed"] == 2 * -(-n_held // 2)  # an encode and a decode per group, not per row
    for k in ("mse_raw", "mse_std", "loss_gap_mean", "loss_gap_max"):
        np.testing.assert_allclose(scores["streamed"][k], scores["memory"][k], rtol=1e-3, atol=1e-12)


def test_the_fit_takes_the_path_its_stage_printed(study_copy, monkeypatch, capsys):
    """The basis plan was decided three times (the stage's estimate, fit_reducer's check, the fit), each from the
    memory held at that moment, so the path taken could differ from the one printed. It is decided once now."""
    from globscope_core.reducers import base, budget, fit_reducer
    from globscope_core.stages.fit import fit_study

    plans = []
    real = budget.basis_plan
    for module in (budget, base):  # base imported it by name
        monkeypatch.setattr(module, "basis_plan", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    monkeypatch.setenv("GLOBSCOPE_BASIS_BYTES", "1K")  # streamed: V is over it
    r, info = fit_study(study_copy.dir, "pca", 2, holdout=False, eval_samples=64, progress=False)
    assert len(plans) == 1 and plans[0].streamed and info["basis_mode"] == "streamed" and r.basis.streamed
    assert "streamed from the checkpoints" in capsys.readouterr().err
    # a plan handed down is followed, whatever the memory would say now
    monkeypatch.delenv("GLOBSCOPE_BASIS_BYTES")
    r = fit_reducer(study_copy, "pca", 2, save=False, plan=plans[0])
    assert r.basis.streamed and r.fit_info["basis_mode"] == "streamed" and len(plans) == 1


def test_a_landscape_encodes_its_own_streamed_checkpoints_without_reading_them(study_copy, monkeypatch):
    """The landscape encoded the checkpoints a row block at a time, and encoding one block with a streamed basis
    reads the whole study: N passes (1,600 row reads of 0.5 GB at 1.2e8 parameters) before the first grid point.
    The fit's own latent points are used instead, equal to what encoding gives (to float32 rounding)."""
    from globscope_core.reducers import fit_reducer
    from globscope_core.stages.landscape import encode_checkpoints

    monkeypatch.setenv("GLOBSCOPE_BASIS_BYTES", "1K")  # streamed: V is over it
    r = fit_reducer(study_copy, "pca", 2, save=False)
    assert r.basis.streamed
    encoded = np.concatenate([r.transform(B) for _, B in study_copy.iter_params(8)])
    calls = []
    real = r.basis.source.iter_params
    monkeypatch.setattr(r.basis.source, "iter_params", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    Z = encode_checkpoints(study_copy, r)
    assert calls == [] and Z.shape == (study_copy.n_checkpoints, 2)
    np.testing.assert_allclose(Z, encoded, rtol=1e-4, atol=1e-4 * np.abs(encoded).max())


def test_trajectories_of_a_streamed_basis_decode_a_chunk_per_pass(study_copy, monkeypatch):
    """The trajectories decoded ~64 MiB of weights per batch: one checkpoint at 1.2e8 parameters, and with a
    streamed basis every batch is a pass over the study (40 passes, about 80 minutes there). They now decode the
    landscape's chunk per pass. Here 64 MiB is made one byte, so the old rule decodes one row per pass."""
    from globscope_core.reducers import fit_reducer
    from globscope_core.stages import landscape
    from globscope_core.storage.study import Study

    monkeypatch.setenv("GLOBSCOPE_BASIS_BYTES", "1K")  # streamed: V is over it
    assert fit_reducer(study_copy, "pca", 2).basis.streamed
    monkeypatch.setattr(landscape, "TRAJECTORY_BATCH_BYTES", 1)
    calls = []
    real = Study.iter_params
    monkeypatch.setattr(Study, "iter_params", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    n = study_copy.n_checkpoints
    info = landscape.compute_landscape(study_copy, "pca-2d", resolution=3, eval_samples=16, chunk_points=n,
                                       progress=False)
    assert info["complete"] and os.path.exists(info["trajectories"])
    assert n > 4 and len(calls) <= 2, (n, len(calls))  # one pass for the 9 grid points, one for the n checkpoints
