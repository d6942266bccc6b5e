"""Faults of stages that run side by side (issue 24, item 3): two writers of the same outputs of one study.

Every writer of a study's outputs holds that output's lock (storage/locks.py). The second one waits with a
one-line message or is refused in one line; never two successes with mixed files. To catch the second
command while the first holds its lock, the first is stopped with SIGSTOP once its lock file names it (and,
for a landscape, once it has finished chunks), and continued with SIGCONT: real processes, real signals,
nothing mocked.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import make_study

from globscope_core.storage.study import Study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ready(tmp_path_factory):
    """3 runs of a 64-16-10 MLP, reducers pca-2d and kpca-2d, a 9x9 landscape of pca-2d and its merge tree."""
    from globscope_core.reducers import fit_reducer
    from globscope_core.stages.landscape import compute_landscape
    from globscope_core.stages.topology import study_topology

    d = tmp_path_factory.mktemp("concurrency") / "study"
    s = make_study(d, runs=3, epochs=3, widths=(16,), eval_samples=256)
    fit_reducer(s, "pca", 2)
    fit_reducer(s, "kpca", 2)
    compute_landscape(s, "pca-2d", 9, eval_samples=64, progress=False)
    study_topology(str(d), dim=2, verbose=False)
    return str(d)


def _copy(ready, dst) -> str:
    shutil.copytree(ready, dst)
    return str(dst)


def _spawn(*argv):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "globscope_core.cli", *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(*argv, timeout=300):
    p = _spawn(*argv)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def _until(cond, proc, timeout=240, what=""):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"{what}: the first command ended first: {proc.communicate()[1][-2000:]}"
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.005)


def _holds(study_dir, output, pid) -> bool:
    """Whether ``STUDY/.{output}.lock`` names ``pid`` as its holder."""
    try:
        with open(os.path.join(study_dir, f".{output}.lock")) as fh:
            return fh.read().split(" ")[0] == str(pid)
    except OSError:
        return False


def _stop_when(proc, cond, what):
    """SIGSTOP ``proc`` once ``cond()`` holds."""
    _until(cond, proc, what=what)
    proc.send_signal(signal.SIGSTOP)


def _chunks(d):
    return set(os.path.basename(p) for p in glob.glob(os.path.join(d, ".landscape-2d.partial", "chunk-*.npz")))


def _computing(d):
    """A landscape is computing (its first chunks are written): it holds its lock from before the first chunk."""
    return lambda: len(_chunks(d)) >= 2


def _one_error(rc, err, *needles):
    """Exit status 2, one error line (notes such as the memory estimate may come before it), no traceback."""
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _field(path, name):
    from globscope_core.storage import vtk_files

    data = vtk_files.read_any(path)
    return data.GetFieldData().GetAbstractArray(name).GetValue(0)


LANDSCAPE = ["--resolution", 17, "--chunk-points", 8, "--eval-samples", 64, "--no-progress"]


@pytest.mark.parametrize("second", ["same command", "other reducer", "same command with --fresh"])
def test_a_second_landscape_of_a_dimension_is_refused_and_the_first_loses_nothing(second, ready, tmp_path):
    """Issue 24.3: the second one was told to pass --fresh, which deleted the first one's chunks; two
    landscapes at once could leave a pca-2d surface with ae-2d trajectories and report."""
    d = _copy(ready, tmp_path / "s")
    first = _spawn("landscape", d, "--reducer", "pca-2d", *LANDSCAPE)
    try:
        _stop_when(first, _computing(d), "the first landscape's chunks")
        kept = _chunks(d)
        argv = {"same command": ["--reducer", "pca-2d", *LANDSCAPE],
                "other reducer": ["--reducer", "kpca-2d", *LANDSCAPE],
                "same command with --fresh": ["--reducer", "pca-2d", *LANDSCAPE, "--fresh"]}[second]
        rc, _, err = _run("landscape", d, *argv)
        _one_error(rc, err, f"{d}: another landscape-2d is working on this study now (pid {first.pid})")
        assert kept <= _chunks(d)  # nothing of the first one's work was deleted
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    report = Study.open(d).read_report()["landscape-2d"]
    assert report["reducer"] == "pca-2d" and report["resolution"] == 17
    # the surface, the trajectories and the report come from the same reducer
    assert _field(os.path.join(d, "landscape-2d.vti"), "reducer") == "pca-2d"
    assert _field(os.path.join(d, "trajectories-2d.vtp"), "reducer") == "pca-2d"
    assert not os.path.exists(os.path.join(d, ".landscape-2d.partial"))


def test_topology_waits_for_the_landscape_it_reads(ready, tmp_path):
    """A topology started while a landscape of its dimension runs reads the new landscape, never the old one
    or a vti/vtp pair of two different landscapes."""
    d = _copy(ready, tmp_path / "s")
    first = _spawn("landscape", d, "--reducer", "pca-2d", *LANDSCAPE)
    try:
        _stop_when(first, _computing(d), "the landscape's chunks")
        topo = _spawn("topology", d, "--dim", 2)
        line = ""
        while "waiting for" not in line:
            line = topo.stderr.readline()
            assert line or topo.poll() is None, f"topology did not wait: {topo.communicate()}"
        assert f"waiting for landscape-2d on {d} (pid {first.pid})" in line
        time.sleep(1.0)
        assert topo.poll() is None  # still waiting
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    out, err = topo.communicate(timeout=300)
    assert topo.returncode == 0, err
    report = Study.open(d).read_report()
    assert report["basins-2d"]["grid"][:2] == [17, 17]  # the merge tree of the new landscape
    from globscope_core.storage.vtk_files import read_vti

    assert tuple(read_vti(os.path.join(d, "topology-2d", "segmentation.vti")).dims) == (17, 17, 1)


def test_a_second_fit_of_the_same_reducer_waits_then_replaces_both_its_files(ready, tmp_path):
    d = _copy(ready, tmp_path / "s")
    first = _spawn("fit", d, "--reducer", "pca", "--max-rank", 3, "--eval-samples", 64)
    try:
        _stop_when(first, lambda: _holds(d, "fit-pca-2d", first.pid), "the first fit's lock")
        second = _spawn("fit", d, "--reducer", "pca", "--eval-samples", 64)
        line = ""
        while "waiting for" not in line:
            line = second.stderr.readline()
            assert line or second.poll() is None, f"the second fit did not wait: {second.communicate()}"
        assert f"globscope: waiting for another fit-pca-2d on {d} (pid {first.pid}) ..." in line, line
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    from globscope_core.reducers import load_reducer

    s = Study.open(d)
    saved = load_reducer(s, "pca-2d")
    section = s.read_report()["fit-pca-2d"]
    assert section["config"] == saved.config and saved.config.get("max_rank") != 3  # the later fit, in both files


@pytest.mark.parametrize("curve", ["bezier", "polychain"])
def test_connect_rerun_on_a_pair_replaces_its_points(curve, ready, tmp_path, capsys):
    """Issue 24.3: each rerun of connect on one pair appended another curve and line to paths.h5."""
    from globscope_core.stages.connect import connect

    d = _copy(ready, tmp_path / "s")
    kw = dict(runs=(0, 1), epochs=1, batch_size=256, points=11, eval_samples=64, plane_resolution=0,
              reducers=["pca-2d"], progress=False)
    connect(d, **kw)
    connect(d, runs=(1, 2), **{k: v for k, v in kw.items() if k != "runs"})  # another pair: kept
    size = os.path.getsize(os.path.join(d, "paths.h5"))
    first = Study.open(d, "paths.h5")
    other = {r: first.read_params(first.run_rows(r, info["label"])) for r, info in enumerate(first.runs)
             if info["connect"] == "connect-1-2"}
    section = connect(d, curve=curve, seed=1, **kw)
    paths = Study.open(d, "paths.h5")
    assert len(paths.runs) == len(first.runs) == 4 and paths.n_checkpoints == first.n_checkpoints == 44
    assert os.path.getsize(os.path.join(d, "paths.h5")) <= size + (64 << 10)
    # the report's runs are the new points; the other pair's are untouched
    rc, rl = section["curve_run"], section["line_run"]
    assert paths.runs[rc]["curve"] == curve and paths.runs[rc]["seed"] == 1 and paths.runs[rl]["label"] == "line"
    new_curve = paths.read_params(paths.run_rows(rc, "curve"))
    assert len(new_curve) == 11
    assert len(other) == 2
    for r, rows in other.items():
        np.testing.assert_array_equal(paths.read_params(paths.run_rows(r, paths.runs[r]["label"])), rows)


def test_two_report_writers_at_once_keep_both_sections(tmp_path):
    """report.json is read, changed and written under one lock: two processes writing sections of their
    own, many times at once, keep both."""
    d = str(tmp_path)
    code = ("import sys; from globscope_core.storage.study import update_report\n"
            "for i in range(150): update_report(sys.argv[1], sys.argv[2], {'i': i, 'pad': 'x' * 2000})\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", code, d, key], env=env) for key in ("fit-a", "landscape-b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    with open(os.path.join(d, "report.json")) as fh:
        report = json.load(fh)
    assert report["fit-a"]["i"] == report["landscape-b"]["i"] == 149


def test_landscape_and_topology_on_one_study_while_fit_runs_on_another(ready, tmp_path):
    """Issue 24, what done looks like: stages run side by side on different studies; on one study the
    topology waits for the landscape it reads."""
    a, b = _copy(ready, tmp_path / "a"), _copy(ready, tmp_path / "b")
    fit = _spawn("fit", b, "--reducer", "ae", "--epochs", 300, "--no-holdout", "--eval-samples", 64)
    land = _spawn("landscape", a, "--reducer", "pca-2d", *LANDSCAPE)
    _until(_computing(a), land, what="the landscape's chunks")
    topo = _spawn("topology", a, "--dim", 2)
    errs = {name: p.communicate(timeout=300)[1] for name, p in (("fit", fit), ("landscape", land), ("topology", topo))}
    assert [fit.returncode, land.returncode, topo.returncode] == [0, 0, 0], errs
    assert "Traceback" not in "".join(errs.values())
    ra, rb = Study.open(a).read_report(), Study.open(b).read_report()
    assert ra["landscape-2d"]["resolution"] == 17 and ra["basins-2d"]["grid"][:2] == [17, 17]
    assert rb["fit-ae-2d"]["n_checkpoints"] == Study.open(b).n_checkpoints
    assert os.path.exists(os.path.join(b, "reducers", "ae-2d.pt"))
    assert not os.path.exists(os.path.join(a, "reducers", "ae-2d.pt"))  # each stage wrote into its own study
    assert rb["landscape-2d"]["resolution"] == 9  # b's landscape untouched
