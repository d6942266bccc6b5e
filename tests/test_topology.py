"""Topology (topology/, stages/topology.py): merge trees and persistence against gudhi, the command, study basins."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import globscope_core.topology as T
from globscope_core import cli
from globscope_core.cli import main
from globscope_core.errors import GlobScopeError
from globscope_core.stages import topology as topology_stage
from globscope_core.storage import study_files, vtk_files

gudhi = pytest.importorskip("gudhi")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def oracle(values, tree="join"):
    """(pairs as a set of (extremum, saddle) vertex ids, essential vertex) from gudhi's lower-star persistence."""
    g = T.as_grid(values)
    f = g.ravel()
    order = np.argsort(f, kind="stable")
    rank = np.empty(len(f), np.int64)
    rank[order] = np.arange(len(f))
    if tree == "split":
        rank = len(f) - 1 - rank
    st = gudhi.SimplexTree()
    a = np.arange(len(f), dtype=np.int32)
    st.insert_batch(np.stack([a, a]), rank.astype(float))  # (v, v): vertices (a (1, n) batch is not taken)
    e = T.neighbour_edges(g.shape)
    if len(e):
        st.insert_batch(np.ascontiguousarray(e.T.astype(np.int32)), np.maximum(rank[e[:, 0]], rank[e[:, 1]]).astype(float))
    assert st.filtration([int(order[0])]) == rank[order[0]]
    st.compute_persistence()
    reg, ess = st.lower_star_persistence_generators()
    pairs = np.asarray(reg[0]).reshape(-1, 2) if len(reg) else np.zeros((0, 2), int)
    return {tuple(p) for p in pairs.tolist()}, int(ess[0][0])


def smooth(shape, seed, waves=6):
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    f = np.zeros(shape)
    for _ in range(waves):
        w = rng.normal(0, 6, len(shape))
        f += np.sin(sum(wi * x for wi, x in zip(w, axes)) + rng.uniform(0, 6))
    return f.astype(np.float32)


def check_against_oracle(values, tree="join", use_numba=None):
    r = T.compute_topology(values, tree=tree, use_numba=use_numba)
    pairs, ess = oracle(values, tree)
    assert {tuple(p) for p in r.pairs.tolist()} == pairs
    assert len(r.pairs) == len(pairs)
    d = r.diagram["point_arrays"]["ttkVertexScalarField"]
    glob = (d[0], d[1]) if tree == "join" else (d[1], d[0])  # the infinite pair comes first (TTK's order)
    assert glob[0] == ess
    # node set: extrema, saddles and the root (last vertex of the sweep)
    f = T.as_grid(values).ravel()
    order = np.argsort(f, kind="stable")
    root = order[-1] if tree == "join" else order[0]
    expect = {ess, int(root)} | {p[0] for p in pairs} | {p[1] for p in pairs}
    assert set(r.nodes["point_arrays"]["VertexId"].tolist()) == expect
    return r


SHAPES = [(1, 40, 50), (1, 13, 7), (6, 7, 8), (12, 10, 9)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tree", ["join", "split"])
def test_random_fields_with_ties_match_gudhi(shape, tree):
    rng = np.random.default_rng(sum(shape))
    check_against_oracle(rng.integers(0, 4, shape).astype(np.float32), tree)  # many ties
    check_against_oracle(rng.random(shape), tree)


@pytest.mark.parametrize("shape", [(1, 64, 64), (16, 18, 20)])
def test_smooth_fields_match_gudhi(shape):
    r = check_against_oracle(smooth(shape, 1))
    assert 1 <= len(r.pairs) < 200  # smooth: a few basins, not noise


def test_pure_python_path_equals_numba():
    if not T.numba_available():
        pytest.fail("numba should be importable in the venv")
    v = np.random.default_rng(3).integers(0, 5, (5, 6, 7)).astype(np.float32)
    a = check_against_oracle(v, use_numba=False)
    b = T.compute_topology(v, use_numba=True)
    c = T.compute_topology(v, persistence=1.5, use_numba=False)
    d = T.compute_topology(v, persistence=1.5, use_numba=True)
    for x, y in [(a, b), (c, d)]:
        for part in ("nodes", "arcs", "diagram"):
            for k, arr in x.__dict__[part]["point_arrays"].items():
                np.testing.assert_array_equal(arr, y.__dict__[part]["point_arrays"][k])
        for k, arr in x.segmentation.items():
            np.testing.assert_array_equal(arr, y.segmentation[k])
    os.environ["GLOBSCOPE_NO_NUMBA"] = "1"
    try:
        from globscope_core.topology.kernels import kernels_for
        assert kernels_for(None) is kernels_for(False)  # the pure-Python kernels
    finally:
        del os.environ["GLOBSCOPE_NO_NUMBA"]


def test_hand_made_path_in_ttk_layout():
    # values 1 0 2 0 3 on a 1-pixel-wide grid: minima at 1 and 3 (tie: lower id first), saddle 2, root 4
    r = T.compute_topology(np.array([[1, 0, 2, 0, 3]], np.float32), origin=(10, 20, 0), spacing=(0.5, 1, 1))
    n = r.nodes["point_arrays"]
    assert n["VertexId"].tolist() == [1, 3, 2, 4]
    assert n["CriticalType"].tolist() == [0, 0, 1, 3]
    assert n["NodeId"].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(r.nodes["points"][:, 0], [10.5, 11.5, 11.0, 12.0])
    assert (r.nodes["points"][:, 2] == 0).all()
    c = r.arcs["cell_arrays"]
    assert c["downNodeId"].tolist() == [0, 1, 2] and c["upNodeId"].tolist() == [2, 2, 3]
    assert c["SegmentationId"].tolist() == [0, 1, 2]
    assert c["RegionSize"].tolist() == [1, 0, 0]
    s = r.segmentation
    assert s["SegmentationId"].tolist() == [0, 0, 2, 1, 2]
    assert s["RegionType"].tolist() == [0, 0, 1, 0, 1]
    d = r.diagram["cell_arrays"]
    assert d["PairIdentifier"].tolist() == [0, 1, -1]
    # pairs by their birth's order (the infinite pair first); the diagonal: 2x its persistence, birth 0
    assert d["Persistence"].tolist() == [3.0, 2.0, 6.0] and d["IsFinite"].tolist() == [0, 1, 0]
    assert d["Birth"].tolist() == [0.0, 0.0, 0.0]
    assert r.diagram["point_arrays"]["ttkVertexScalarField"].tolist() == [1, 4, 3, 2]
    assert r.diagram["cells"].tolist() == [[0, 1], [2, 3], [0, 0]]  # diagonal: point 0 to the highest birth


def test_segmentation_ids_and_region_sizes_are_consistent():
    v = smooth((1, 50, 60), 4)
    r = T.compute_topology(v)
    c = r.arcs["cell_arrays"]
    n_nodes, n_arcs = len(r.nodes["points"]), len(c["SegmentationId"])
    assert n_arcs == n_nodes - 1
    assert sorted(c["SegmentationId"].tolist()) == list(range(n_arcs))
    assert (np.diff(c["downNodeId"]) > 0).all()  # sorted by (downNodeId, upNodeId)
    assert c["RegionSize"].sum() == v.size - n_nodes
    seg = r.segmentation["SegmentationId"]
    counts = np.bincount(seg, minlength=n_arcs)
    by_seg = np.empty(n_arcs, int)
    by_seg[c["SegmentationId"]] = c["RegionSize"]
    assert ((counts - by_seg) >= 0).all() and ((counts - by_seg) <= 2).all()  # nodes add 1 (root side: 2)
    # the lowest point of each leaf segment is its minimum
    f = v.ravel()
    leaf = np.flatnonzero(r.nodes["point_arrays"]["CriticalType"] == 0)
    for node in leaf:
        sid = c["SegmentationId"][c["downNodeId"] == node][0]
        assert f[seg == sid].min() == f[r.nodes["point_arrays"]["VertexId"][node]]


@pytest.mark.parametrize("shape,tree", [((1, 60, 70), "join"), ((10, 12, 11), "join"), ((1, 40, 40), "split")])
def test_simplification_keeps_exactly_the_pairs_above_threshold(shape, tree):
    v = smooth(shape, 7, waves=10) + np.random.default_rng(0).normal(0, 0.05, shape).astype(np.float32)
    full = T.compute_topology(v, tree=tree)
    for t in (0.0, 0.05, 0.3, 1.0):
        r = T.compute_topology(v, tree=tree, persistence=t)
        keep = {tuple(p) for p, q in zip(full.pairs.tolist(), full.persistence) if q > t}
        assert {tuple(p) for p in r.simplified_pairs.tolist()} == keep
        assert len(r.nodes["points"]) < len(full.nodes["points"]) or not len(keep) < len(full.pairs)
        # the plain merge tree of the simplified field (with its _Order) is the simplified tree
        g, o = r.simplified_values, r.simplified_order
        again = T.compute_topology(g, tree=tree, order=o)
        for k in ("VertexId", "CriticalType", "Scalar", "RegionSize"):
            np.testing.assert_array_equal(again.nodes["point_arrays"][k], r.nodes["point_arrays"][k])
        np.testing.assert_array_equal(again.segmentation["SegmentationId"], r.segmentation["SegmentationId"])
        # the order agrees with the values and only removed basins changed, to their saddle's value
        gs = g.ravel()[np.argsort(o.ravel())]
        assert (np.diff(gs) >= 0).all() if tree == "join" else (np.diff(gs) >= 0).all()
        changed = g.ravel() != v.ravel()
        assert np.isin(g.ravel()[changed], v.ravel()[full.pairs[:, 1]]).all()
    rel = T.compute_topology(v, tree=tree, persistence=0.1, relative=True)
    assert rel.threshold == pytest.approx(0.1 * float(v.max() - v.min()))


def test_plateaus_and_constant_fields():
    c = T.compute_topology(np.full((1, 5, 6), 2.0))
    assert c.nodes["point_arrays"]["VertexId"].tolist() == [0, 29] and len(c.pairs) == 0
    assert (c.segmentation["SegmentationId"] == 0).all()
    assert c.diagram["cell_arrays"]["Persistence"][0] == 0
    c3 = T.compute_topology(np.zeros((4, 4, 4), np.float32), tree="split")
    assert c3.nodes["point_arrays"]["VertexId"].tolist() == [63, 0]
    v = np.zeros((1, 20, 20), np.float32)
    v[3:8, 3:8] = -1
    v[12:18, 10:16] = -2  # two flat basins
    v[:, 9] = 1  # a wall
    r = check_against_oracle(v)
    assert len(r.pairs) == 1 and r.persistence[0] == 1.0
    check_against_oracle(np.random.default_rng(1).integers(0, 2, (5, 5, 5)).astype(np.float64))


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 30), (1, 30, 1), (30, 1, 1), (1, 2, 25), (4, 1, 9)])
def test_one_pixel_wide_grids(shape):
    v = np.random.default_rng(5).integers(0, 3, shape).astype(np.float32)
    if v.size == 1:
        r = T.compute_topology(v)
        assert len(r.nodes["points"]) == 1 and len(r.arcs["cells"]) == 0
        assert r.segmentation["SegmentationId"].tolist() == [-1]
        return
    for tree in ("join", "split"):
        r = check_against_oracle(v, tree)
        T.compute_topology(v, tree=tree, persistence=1)


def test_bad_input_values():
    v = np.random.default_rng(0).random((3, 4, 5))
    v[1, 2, 3] = np.nan
    v[0, 0, 0] = np.nan
    with pytest.raises(GlobScopeError, match=r"2 NaN value\(s\) of 60 at \(i=0, j=0, k=0\), \(i=3, j=2, k=1\)"):
        T.compute_topology(v)
    r = T.compute_topology(v, nan="inf")
    assert not np.isin([0, 33], r.nodes["point_arrays"]["VertexId"][r.nodes["point_arrays"]["CriticalType"] == 0]).any()
    assert r.nodes["point_arrays"]["VertexId"][-1] == 33  # +inf, ties by id: the last vertex is the root
    with pytest.raises(GlobScopeError, match="GiB"):
        T.check_memory(10**13, "big.vti")
    with pytest.raises(GlobScopeError, match="join"):
        T.compute_topology(v, tree="contour", nan="inf")
    with pytest.raises(GlobScopeError, match="shape"):
        T.compute_topology(np.zeros(5))


def _field(path, values, **extra):
    nz, ny, nx = values.shape
    arrays = {"loss": values.ravel(), **{k: a.ravel() for k, a in extra.items()}}
    vtk_files.write_vti(path, vtk_files.ImageField((nx, ny, nz), (-1.0, -2.0, 0.0), (0.1, 0.2, 1.0), arrays, {}, "loss"))


def test_cli_writes_ttk_files(tmp_path, capsys):
    v = smooth((1, 30, 40), 2)
    src = str(tmp_path / "land.vti")
    _field(src, v, accuracy=np.ones_like(v))
    out = str(tmp_path / "topo")
    assert main(["topology", src, "--scalar", "loss", "--out", out, "--persistence", "0.1", "--relative"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert sorted(os.listdir(out)) == sorted(study_files.TOPOLOGY_FILES) and info["pairs_kept"] <= info["pairs"]
    nodes = vtk_files.read_any(os.path.join(out, "nodes.vtu"))
    na = vtk_files.arrays_of(nodes)
    assert {k: str(a.dtype) for k, a in na.items()} == {"NodeId": "int32", "Scalar": "float32", "VertexId": "int32",
                                                         "CriticalType": "int32", "RegionSize": "int32", "RegionSpan": "int32"}
    assert nodes.GetNumberOfPoints() == info["nodes"]  # TTK: one poly-vertex cell holding every node
    assert nodes.GetNumberOfCells() == 1 and nodes.GetCellType(0) == T.VTK_POLY_VERTEX
    p = np.array([nodes.GetPoint(i) for i in range(nodes.GetNumberOfPoints())])
    vid = na["VertexId"]
    np.testing.assert_allclose(p[:, 0], -1.0 + 0.1 * (vid % 40), atol=1e-6)
    np.testing.assert_allclose(p[:, 1], -2.0 + 0.2 * (vid // 40), atol=1e-6)
    assert (p[:, 2] == 0).all()
    arcs = vtk_files.read_any(os.path.join(out, "arcs.vtu"))
    ca = vtk_files.arrays_of(arcs, "cell")
    assert set(ca) == {"SegmentationId", "upNodeId", "downNodeId", "RegionSize", "RegionSpan"}
    assert set(vtk_files.arrays_of(arcs)) == {"Scalar", "ttkMaskScalarField"}
    assert arcs.GetNumberOfCells() == info["arcs"] and arcs.GetCellType(0) == vtk_files.VTK_LINE
    seg = vtk_files.read_vti(os.path.join(out, "segmentation.vti"))
    assert {"SegmentationId", "RegionType", "RegionSize", "RegionSpan", "loss", "loss_Order", "accuracy"} <= set(seg.point_arrays)
    assert seg.point_arrays["RegionType"].dtype == np.int8 and seg.dims == (40, 30, 1)
    # TTK's chain: the segmentation file (simplified loss + loss_Order) gives the same tree again
    again = str(tmp_path / "again")
    assert main(["topology", os.path.join(out, "segmentation.vti"), "--out", again]) == 0
    capsys.readouterr()
    assert vtk_files.arrays_of(vtk_files.read_any(os.path.join(again, "nodes.vtu")))["VertexId"].tolist() == vid.tolist()
    dg = vtk_files.arrays_of(vtk_files.read_any(os.path.join(out, "diagram.vtu")), "cell")
    assert set(dg) == {"PairIdentifier", "PairType", "Persistence", "Birth", "IsFinite"}
    assert dg["IsFinite"].dtype == np.uint8 and dg["PairIdentifier"][-1] == -1
    assert len(dg["PairIdentifier"]) == info["pairs"] + 2


def test_cli_bad_input(tmp_path, capsys):
    v = smooth((1, 10, 12), 0)
    src = str(tmp_path / "a.vti")
    _field(src, v)
    assert main(["topology", src, "--scalar", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "no point array 'nope' (arrays: loss)" in capsys.readouterr().err
    poly = str(tmp_path / "poly.vti")
    vtk_files.write_vtp(str(tmp_path / "p.vtp"), np.zeros((2, 3)), lines=[[0, 1]])
    shutil.copy(str(tmp_path / "p.vtp"), poly)
    assert main(["topology", poly, "--out", str(tmp_path / "o")]) == 2
    assert "not image data" in capsys.readouterr().err
    v[0, 3, 4] = np.nan
    _field(src, v)
    assert main(["topology", src, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "a.vti" in err and "1 NaN value(s) of 120 at (i=4, j=3)" in err and "Traceback" not in err
    assert main(["topology", src, "--out", str(tmp_path / "o"), "--nan-as-inf"]) == 0
    assert main(["topology", str(tmp_path / "missing.vti"), "--out", str(tmp_path / "o")]) == 2


def _fake_study(path, dim):
    """A landscape with three wells and noise, and three runs ending in two of them (the landscape layout)."""
    os.makedirs(path, exist_ok=True)
    shape = (1, 41, 41) if dim == 2 else (21, 21, 21)  # (nz, ny, nx)
    nz, ny, nx = shape
    spacing = (2.0 / (nx - 1), 2.0 / (ny - 1), 2.0 / (nz - 1) if nz > 1 else 1.0)
    origin = (-1.0, -1.0, -1.0 if nz > 1 else 0.0)
    z, y, x = [o + s * np.arange(n) for o, s, n in zip(origin[::-1], spacing[::-1], shape)]
    z, y, x = np.meshgrid(z, y, x, indexing="ij")
    f = np.full(shape, 2.0)
    for (cx, cy, cz), d in zip([(-0.5, -0.5, 0), (0.5, 0.4, 0), (0.0, 0.7, 0)], [1.0, 0.6, 0.3]):
        f -= d * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / 0.05)
    values = (f + np.random.default_rng(0).normal(0, 0.005, shape)).astype(np.float32)
    vtk_files.write_vti(os.path.join(path, f"landscape-{dim}d.vti"),
                    vtk_files.ImageField((nx, ny, nz), origin, spacing, {"loss": values.ravel()}, {}, "loss"))
    ends = np.array([[-0.45, -0.5, 0], [0.52, 0.4, 0], [-0.5, -0.55, 0]])
    pts = np.concatenate([np.zeros((3, 3)), ends])
    vtk_files.write_vtp(os.path.join(path, f"trajectories-{dim}d.vtp"), pts,
                    lines=[[0, 3], [1, 4], [2, 5]], verts=[[3], [4], [5]],
                    point_arrays={"run": np.array([0, 1, 2, 0, 1, 2]), "step": np.array([0, 0, 0, 9, 9, 9])})
    return values


@pytest.mark.parametrize("dim", [2, 3])
def test_study_basins(tmp_path, capsys, dim):
    d = str(tmp_path / "study")
    values = _fake_study(d, dim)
    sec = topology_stage.study_topology(d, dim=dim)
    out = capsys.readouterr().out
    assert f"basins-{dim}d" in out and "run   0" in out
    report = json.load(open(os.path.join(d, "report.json")))[f"basins-{dim}d"]
    assert report["runs"] == json.loads(json.dumps(sec["runs"]))
    runs = {b["run"]: b for b in sec["runs"]}
    assert runs[0]["basin_minimum_vertex"] == runs[2]["basin_minimum_vertex"] != runs[1]["basin_minimum_vertex"]
    assert runs[0]["basin_persistence"] is None  # the deepest well: the global basin
    assert runs[1]["basin_persistence"] > 0.3
    assert runs[0]["basin_minimum_loss"] == pytest.approx(float(values.min()))
    np.testing.assert_allclose(runs[1]["basin_minimum_position"][:2], [0.5, 0.4], atol=0.11)
    assert sec["leaves"] == 3  # three wells survive simplification, the noise does not
    assert sorted(os.listdir(os.path.join(d, f"topology-{dim}d"))) == sorted(study_files.TOPOLOGY_FILES)
    assert main(["topology", d, "--dim", str(dim), "--persistence", "0.5", "--absolute"]) == 0
    sec2 = json.load(open(os.path.join(d, "report.json")))[f"basins-{dim}d"]
    assert sec2["leaves"] == 2 and sec2["threshold"] == 0.5


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="no system python3 (ParaView's)")
def test_runs_in_paraviews_python():
    code = ("import sys; sys.path.insert(0, %r); import numpy as np; from globscope_core import topology as T;"
            "assert 'vtk' not in sys.modules and 'torch' not in sys.modules;"
            "v = np.random.default_rng(0).integers(0, 4, (6, 7, 8)).astype(np.float32);"
            "r = T.compute_topology(v, persistence=1);"
            "print(np.__version__, T.numba_available(), r.pairs.tolist(), r.nodes['point_arrays']['VertexId'].tolist())" % ROOT)
    p = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    v = np.random.default_rng(0).integers(0, 4, (6, 7, 8)).astype(np.float32)
    r = T.compute_topology(v, persistence=1)
    assert p.stdout.split(" ", 2)[2].strip() == f"{r.pairs.tolist()} {r.nodes['point_arrays']['VertexId'].tolist()}"


def test_ttk_region_types_arcs_and_diagram_layout():
    # issue 16's smallest example: vertex 15 is a 3-way (degenerate) saddle of the join tree
    v = np.array([[0, 3, 1, 1, 2, 0], [1, 0, 2, 2, 3, 3], [1, 1, 3, 2, 0, 0], [3, 2, 0, 2, 2, 1]], np.float32)[None]
    r = T.compute_topology(v)
    n = r.nodes["point_arrays"]
    assert n["CriticalType"][n["VertexId"] == 15].tolist() == [T.DEGENERATE]
    c = r.arcs["cell_arrays"]
    ends = n["CriticalType"][c["downNodeId"]], n["CriticalType"][c["upNodeId"]]
    rt = T.region_types(*ends)
    # TTK's rule: min-arcs 0 first, then max-arcs 1, then saddle-saddle 2/3, anything with a degenerate end 4
    want = [0 if 0 in e else 1 if 3 in e else 2 if e == (1, 1) else 3 if e == (2, 2) else 4 for e in zip(*map(list, ends))]
    assert rt.tolist() == want and 4 in want
    by_seg = dict(zip(c["SegmentationId"].tolist(), rt.tolist()))
    assert r.segmentation["RegionType"].tolist() == [by_seg[s] for s in r.segmentation["SegmentationId"].tolist()]
    assert list(r.segmentation) == ["SegmentationId", "RegionSize", "RegionSpan", "RegionType"]  # no _Order
    # arcs: one float32 point per node, lines from the lower to the higher value (split: root side first)
    for tree in ("join", "split"):
        r = T.compute_topology(smooth((1, 30, 30), 3), tree=tree)
        a = r.arcs
        assert a["points"].dtype == np.float32 and len(a["points"]) == len(r.nodes["points"])
        s = a["point_arrays"]["Scalar"][a["cells"]]
        assert (s[:, 0] <= s[:, 1]).all()
        assert a["cells"][0].tolist() == [0, 1] and a["cells"].max() == len(a["points"]) - 1
    # split tree: TTK's default pairs leave boundary maxima unpaired; the tree's own pairs include them
    v = np.zeros((1, 9, 9), np.float32)
    v[0, 0, 4], v[0, 4, 4], v[0, 7, 2] = 3, 5, 4  # a maximum on the boundary, two inside
    tree_pairs = T.compute_topology(v, tree="split").diagram["point_arrays"]["ttkVertexScalarField"]
    hom = T.compute_topology(v, tree="split", split_pairs="homology").diagram["point_arrays"]["ttkVertexScalarField"]
    assert 4 in tree_pairs[2:] and 4 not in hom[2:]  # vertex 4 = (i=4, j=0): its pair only in the tree's diagram
    assert {40, 65} <= set(hom[2:].tolist())


# --- a study's landscape: the merge tree on its trusted part ---------------------------------------
def test_topology_leaves_untrusted_points_out(tmp_path):
    from globscope_core.stages import topology as topology_stage
    from globscope_core.storage import vtk_files

    d = str(tmp_path / "s")
    os.makedirs(d)
    nx = ny = 33
    y, x = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    f = 2.0 - np.exp(-((x + 0.4) ** 2 + y**2) / 0.05) - 0.8 * np.exp(-((x - 0.4) ** 2 + y**2) / 0.05)
    f -= 1.5 * np.exp(-((x - 0.9) ** 2 + (y - 0.9) ** 2) / 0.02)  # the deepest well, in a corner ...
    trusted = (np.hypot(x, y) < 0.8).astype(np.float32)  # ... outside the trusted disc
    sp = (2 / (nx - 1), 2 / (ny - 1), 1.0)
    vtk_files.write_vti(os.path.join(d, "landscape-2d.vti"), vtk_files.ImageField(
        (nx, ny, 1), (-1.0, -1.0, 0.0), sp, {"log_loss": f.astype(np.float32).ravel(),
                                             "trusted": trusted.ravel()}, {}, "log_loss"))
    vtk_files.write_vtp(os.path.join(d, "trajectories-2d.vtp"), np.array([[0, 0, 0], [-0.4, 0, 0], [0.4, 0, 0]]),
                    lines=[[0, 1], [0, 2]], verts=[[1], [2]],
                    point_arrays={"run": np.array([0, 0, 1]), "step": np.array([0, 9, 9])})
    sec = topology_stage.study_topology(d, 2, verbose=False)
    assert sec["trusted_only"] and sec["untrusted_points_left_out"] == int((trusted == 0).sum())
    assert sec["leaves"] == 2 and sec["n_basins_with_runs"] == 2
    assert all(np.hypot(*r["basin_minimum_position"]) < 0.8 for r in sec["runs"])
    every = topology_stage.study_topology(d, 2, verbose=False, trusted_only=False)
    assert every["leaves"] == 3 and not every["trusted_only"]
    assert cli.main(["topology", d, "--dim", "2", "--all-points"]) == 0
    assert json.load(open(os.path.join(d, "report.json")))["basins-2d"]["leaves"] == 3
