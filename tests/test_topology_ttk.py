"""Topology against the real TTK (topology/, the ParaView plugin; issue 16): every array and cell equal.

Needs TTK built for this ParaView (`bash setup.sh --with-ttk`); without it these tests skip and say so.
All comparisons run in one pvpython process (tests/ttk_compare.py), the 200+ tiny grids included.
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from test_topology import smooth  # the same smooth random fields as the core tests

from globscope_core.cli import main
from globscope_core.stages import paraview_env
from globscope_core.storage import vtk_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PVPYTHON = paraview_env.find("pvpython")
TTK = paraview_env.ttk_plugin()
pytestmark = [
    pytest.mark.skipif(PVPYTHON is None, reason="no pvpython (ParaView): run `bash setup.sh`"),
    pytest.mark.skipif(TTK is None, reason="TTK is not installed: run `bash setup.sh --with-ttk`"),
]


def wells(shape, seed):
    """Like the demo's decoded landscapes: log10 loss with a few deep basins, ridges and grid noise."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1.5, 1.5, n) for n in shape], indexing="ij")
    f = np.full(shape, 0.4)
    for _ in range(6):
        c = rng.uniform(-1.2, 1.2, len(shape))
        f -= rng.uniform(0.5, 1.5) * np.exp(-sum((x - ci) ** 2 for x, ci in zip(axes, c)) / rng.uniform(0.05, 0.3))
    return (f + rng.normal(0, 0.01, shape)).astype(np.float32)


def write(path, values, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0)):
    v = values if values.ndim == 3 else values[None]
    nz, ny, nx = v.shape
    vtk_files.write_vti(path, vtk_files.ImageField((nx, ny, nz), origin, spacing, {"loss": v.ravel()}, {}, "loss"))


def run_compare(tmp_path, cases, env=None):
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    out = tmp_path / "result.json"
    argv = [PVPYTHON, os.path.join(ROOT, "tests", "ttk_compare.py"), str(spec), str(out)]
    p = subprocess.run(argv, env=paraview_env.environment(env), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0 and out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text()), p


def assert_identical(result, cases, min_arrays):
    # after a simplification, TTK's <name>_Order may break ties inside a flattened basin otherwise than ours
    # (same simplified values, same trees); those differences are listed, not counted (see the README)
    notes = {k: v for k, v in result["order_notes"].items() if v}
    if notes:
        print("order array differences after simplification:", json.dumps(notes)[:2000])
    assert all("_Order" in d for v in notes.values() for d in v)
    bad = {k: v for k, v in result["cases"].items() if v}
    assert not bad, json.dumps(dict(list(bad.items())[:5]), indent=1)
    assert set(result["cases"]) == {c["name"] for c in cases}  # nothing skipped
    for name, n in result["compared"].items():
        assert n >= min_arrays, f"{name}: only {n} arrays compared"


def test_landscapes_random_tied_smooth_2d_3d_and_cli_files(tmp_path):
    fields = {
        # origins and spacings that float32 does not hold exactly, as a landscape's (positions are float32 in TTK)
        "wells-2d": (wells((65, 65), 0), (-47.1997385, -58.2817843, 0.0), (1.7134, 1.5931, 1.0)),
        "wells-3d": (wells((17, 17, 17), 1), (-1.37, -1.53, -1.11), (0.1713, 0.1917, 0.1391)),
        "smooth-2d": (smooth((64, 64), 2), (0, 0, 0), (1, 1, 1)),
        "smooth-3d": (smooth((20, 22, 24), 3), (0, 0, 0), (1, 1, 1)),
        "random-2d": (np.random.default_rng(4).random((64, 64)).astype(np.float32), (0, 0, 0), (1, 1, 1)),
        "random-3d": (np.random.default_rng(5).random((16, 16, 16)), (0, 0, 0), (1, 1, 1)),  # float64
        "tied2-2d": (np.random.default_rng(6).integers(0, 2, (48, 40)).astype(np.float32), (0, 0, 0), (1, 1, 1)),
        "tied4-2d": (np.random.default_rng(7).integers(0, 4, (40, 48)).astype(np.float32), (0, 0, 0), (1, 1, 1)),
        "tied2-3d": (np.random.default_rng(8).integers(0, 2, (12, 13, 14)).astype(np.float32), (0, 0, 0), (1, 1, 1)),
        "tied4-3d": (np.random.default_rng(9).integers(0, 4, (14, 13, 12)).astype(np.float32), (0, 0, 0), (1, 1, 1)),
    }
    cases = []
    for name, (v, origin, spacing) in fields.items():
        path = str(tmp_path / f"{name}.vti")
        write(path, v, origin, spacing)
        for tree in ("join", "split"):
            case = {"name": f"{name}-{tree}", "file": path, "scalar": "loss", "tree": tree}
            if name.startswith(("wells", "smooth-3d", "tied4")):
                # `globscope topology` writes the same files as TTK (split: with TTK's pairs)
                out = str(tmp_path / f"cli-{name}-{tree}")
                assert main(["topology", path, "--out", out, "--tree", tree, "--split-pairs", "homology"]) == 0
                case["cli"] = out
            cases.append(case)
        if name.startswith(("wells", "smooth", "tied4")):
            for thr, absolute in ((0.05, False), (0.3, True)):
                cases.append({"name": f"{name}-simplify-{'abs' if absolute else 'rel'}", "file": path, "scalar": "loss",
                              "tree": "join", "simplify": {"threshold": thr, "absolute": absolute}})
    result, _ = run_compare(tmp_path, cases)
    assert_identical(result, cases, min_arrays=20)
    assert len([c for c in cases if "cli" in c]) == 10 and len([c for c in cases if "simplify" in c]) == 12


def test_two_hundred_tiny_random_grids(tmp_path):
    rng = np.random.default_rng(16)
    cases = []
    for i in range(240):
        shape = tuple(int(s) for s in rng.integers(2, 6, 3 if i % 2 else 2))
        levels = int(rng.integers(2, 6)) if i % 3 else 0  # ties, or continuous values
        v = rng.integers(0, levels, shape).astype(np.float32) if levels else rng.random(shape).astype(np.float32)
        path = str(tmp_path / f"g{i}.vti")
        write(path, v)
        case = {"name": f"g{i}-{shape}-{levels}", "file": path, "scalar": "loss", "tree": "split" if i % 4 >= 2 else "join"}
        if i % 5 == 0:
            case["simplify"] = {"threshold": float(rng.uniform(0, 0.5)), "absolute": bool(i % 2)}
            case["tree"] = "join"
        cases.append(case)
    result, _ = run_compare(tmp_path, cases)
    assert_identical(result, cases, min_arrays=20)


PIPELINE = """
import sys
from paraview.simple import *
LoadPlugin(sys.argv[1], ns=globals())
src = XMLImageDataReader(FileName=[sys.argv[2]])
mt = GlobScopeMergeTree(Input=src)
mt.ScalarField = ['POINTS', 'loss']
mt.TreeType = 'Split Tree'
mt.UpdatePipeline()
simp = GlobScopeTopologicalSimplificationByPersistence(Input=src)
simp.InputArray = ['POINTS', 'loss']
simp.PersistenceThreshold = 0.1
simp.ThresholdIsAbsolute = 0
simp.UpdatePipeline()
n = [mt.GetDataInformation(i).GetNumberOfCells() for i in (1, 3)]
print('TTKPROXY', hasattr(sys.modules['paraview.simple'], 'TTKMergeandContourTreeFTM') or
      hasattr(sys.modules['paraview.simple'], 'TTKMergeTree'), 'CELLS', n[0], n[1])
"""


@pytest.mark.parametrize("engine", ["ttk", "globscope_core"])
def test_plugin_says_which_engine_ran(tmp_path, engine):
    path = str(tmp_path / "f.vti")
    write(path, smooth((40, 40), 11))
    script = tmp_path / "pipeline.py"
    script.write_text(PIPELINE)
    env = dict(os.environ, GLOBSCOPE_NO_TTK="1") if engine == "globscope_core" else None
    argv = [PVPYTHON, str(script), paraview_env.PLUGIN, path]
    p = subprocess.run(argv, env=paraview_env.environment(env), capture_output=True,
                       text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert f"GlobScope Merge Tree: engine {'TTK' if engine == 'ttk' else 'globscope_core'}" in out
    assert f"GlobScope Topological Simplification: engine {'TTK' if engine == 'ttk' else 'globscope_core'}" in out
    line = [ln for ln in out.splitlines() if ln.startswith("TTKPROXY")][-1].split()
    assert line[1] == str(engine == "ttk")  # TTK's C++ plugin loads at start-up (PV_PLUGIN_PATH) unless disabled
    assert int(line[3]) > 0 and int(line[4]) > 0  # arcs and a complete diagram


def test_pvbatch_under_mpiexec_loads_ttk(tmp_path):
    mpiexec, pvbatch = paraview_env.find("mpiexec"), paraview_env.find("pvbatch")
    if mpiexec is None or pvbatch is None:
        pytest.skip("no mpiexec/pvbatch: run `bash setup.sh`")
    script = tmp_path / "s.py"
    script.write_text("import paraview.simple as s\nimport GlobScopePlugin as P\n"
                      "print('RANK', hasattr(s, 'TTKMergeandContourTreeFTM') or hasattr(s, 'TTKMergeTree'),"
                      " P.ttk_module()[0] is not None, flush=True)\n")
    argv = [mpiexec, "-n", "2", pvbatch, str(script)]
    p = paraview_env.run(argv, paraview_env.environment(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("RANK")]
    assert p.returncode == 0 and lines, (p.stdout + p.stderr)[-3000:]
    assert all(ln.split()[1:] == ["True", "True"] for ln in lines), lines
