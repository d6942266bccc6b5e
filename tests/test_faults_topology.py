"""Pathological cost in topology: ``--split-pairs homology`` (TTK's default pairs of a split tree, the plugin's
engine for every split tree) was a Python union-find over all facets, 8.5-31 s for a 48^3 field where the
tree itself takes 0.1 s. It is now one sweep of the vertices, numba-compiled as the merge-tree kernels (the same
kernel uncompiled without numba); these tests hold both to the same pairs, in the same order, as a plain
reference of the old union-find, and the compiled one to a time far from the old one.
"""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

import globscope_core.topology as T
from globscope_core.topology.kernels import kernels_for


def reference_pairs(shape, desc):
    """The old algorithm, plainly: the top cells of TTK's implicit triangulation (Kuhn, mirrored in x) are the
    components' cells; each facet joins its two cells (or its one cell and the outside, older than every maximum)
    at its first vertex in the descending sweep, in the order (that vertex, sorted vertex ids); a younger
    component dies there unless it was born at that same vertex. Pairs (maximum, saddle) by saddle."""
    nz, ny, nx = shape
    axes = [a for a, m in enumerate((nx, ny, nz)) if m > 1]
    if len(axes) < 2:
        return np.zeros((0, 2), np.int64)
    desc = [int(v) for v in desc]
    pos = {v: r for r, v in enumerate(desc)}

    def vid(p):
        return (nx - 1 - p[0]) + p[1] * nx + p[2] * nx * ny

    cells = []
    for corner in itertools.product(*[range(m - 1) if a in axes else range(1) for a, m in enumerate((nx, ny, nz))]):
        for perm in itertools.permutations(axes):
            p = list(corner)
            verts = [vid(p)]
            for a in perm:
                p[a] += 1
                verts.append(vid(p))
            cells.append(verts)
    facets = {}
    for c, verts in enumerate(cells):
        for drop in range(len(verts)):
            facets.setdefault(tuple(sorted(verts[:drop] + verts[drop + 1:])), []).append(c)
    outside = len(cells)
    parent = list(range(outside + 1))
    birth = [min(pos[v] for v in verts) for verts in cells] + [-1]

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    pairs = []
    for f in sorted(facets, key=lambda f: (min(pos[v] for v in f), f)):
        ends = facets[f] + [outside]
        x, y = find(ends[0]), find(ends[1])
        if x == y:
            continue
        if birth[x] > birth[y]:
            x, y = y, x
        s = desc[min(pos[v] for v in f)]
        if desc[birth[y]] != s:
            pairs.append((desc[birth[y]], s))
        parent[y] = x
    pairs.sort(key=lambda p: pos[p[1]])
    return np.array(pairs, np.int64).reshape(-1, 2)


def make_field(shape, kind, seed):
    rng = np.random.default_rng(seed)
    if kind in ("random", "order"):  # "order": the values beside an arbitrary order array
        return rng.random(shape).astype(np.float32)
    if kind in ("ties2", "ties4"):
        return rng.integers(0, int(kind[-1]), shape).astype(np.float32)
    if kind == "constant":
        return np.full(shape, 0.5, np.float32)
    if kind == "nan":  # treated as +inf (nan="inf"): first in the descending sweep, tied by vertex id
        v = rng.random(shape)
        v[rng.random(shape) < 0.2] = np.nan
        return v
    raise ValueError(kind)


def descending(v, kind, seed):
    if kind == "order":  # an arbitrary vertex order (a TTK _Order array)
        return np.random.default_rng(seed).permutation(v.size).astype(np.int64)
    return T.vertex_order(v, nan="inf")[::-1].copy()


def assert_all_equal(shape, desc):
    assert "homology" in kernels_for(True)  # the pairs are compiled, as the merge-tree kernels
    want = reference_pairs(shape, desc)
    for use_numba in (True, False):  # the compiled kernel, and the pure-Python fallback
        got = T.homology_split_pairs(shape, desc, use_numba=use_numba)
        assert got.dtype == np.int64 and got.shape == want.shape, (use_numba, got.shape, want.shape)
        np.testing.assert_array_equal(got, want)
    return want


FIELDS = ["random", "ties2", "ties4", "constant", "nan", "order"]


@pytest.mark.parametrize("shape", [(1, 40, 41), (10, 11, 12), (3, 1, 5), (4, 5, 1), (2, 9, 3)],
                         ids=["2d", "3d", "xz-plane", "yz-plane", "3d-thin"])
@pytest.mark.parametrize("kind", FIELDS)
def test_homology_pairs_equal_reference(shape, kind):
    for seed in range(3):
        v = make_field(shape, kind, seed)
        pairs = assert_all_equal(shape, descending(v, kind, seed))
        if kind in ("random", "order") and min(sorted(shape)[1:]) >= 5:
            assert len(pairs) > 0  # fields with inner maxima: the comparison is not of empty lists


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 9), (1, 9, 1), (7, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 3)],
                         ids=["1x1", "1xN", "Nx1", "Nx1x1", "2x2", "2x2x2", "2x2x3"])
def test_homology_pairs_of_tiny_grids(shape):
    for kind in FIELDS:
        for seed in range(4):
            v = make_field(shape, kind, seed)
            assert_all_equal(shape, descending(v, kind, seed))


@pytest.mark.parametrize("values", ["2d", "3d"])
def test_split_tree_diagram_with_nan_as_inf_same_compiled_or_not(values):
    v = make_field((1, 20, 21) if values == "2d" else (7, 8, 9), "nan", 5)
    a, b = (T.compute_topology(v, tree="split", split_pairs="homology", nan="inf", use_numba=u) for u in (True, False))
    assert "homology" in kernels_for(True)
    for k, arr in a.diagram["point_arrays"].items():
        np.testing.assert_array_equal(arr, b.diagram["point_arrays"][k])
    for k, arr in a.diagram["cell_arrays"].items():
        np.testing.assert_array_equal(arr, b.diagram["cell_arrays"][k])
    assert len(a.diagram["point_arrays"]["ttkVertexScalarField"]) > 4  # pairs beyond the global one


def test_homology_pairs_of_48_cubed_random_field_take_well_under_a_second():
    T.compute_topology(np.random.default_rng(1).random((4, 5, 6)), tree="split", split_pairs="homology")  # JIT
    v = np.random.default_rng(0).random((48, 48, 48), dtype=np.float32)
    t = time.perf_counter()
    r = T.compute_topology(v, tree="split", split_pairs="homology")
    dt = time.perf_counter() - t
    # 0.2-1.5 s compiled (tree, segmentation and diagram; idle to busy 2-core machine), 8.5-31 s with the old
    # Python union-find: a generous bound, a regression guard, not a benchmark (bench_topology.py --homology is)
    assert dt < 5.0, f"split tree with homology pairs of a 48^3 field took {dt:.1f} s"
    assert len(r.diagram["point_arrays"]["ttkVertexScalarField"]) > 2 * 1000
