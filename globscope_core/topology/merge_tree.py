"""Merge trees, persistence pairs, segmentation and persistence simplification on regular grids.

GlobScope computes these itself, exactly as TTK's FTM merge tree would on the same grid, and returns
them in TTK's output layout (shared/ttk-layout.md):

- the grid is triangulated like TTK's implicit triangulation (6 neighbours in 2D, 14 in 3D);
- vertices are ordered by (value, vertex id), or by a ``<name>_Order`` array when one is given;
- the join tree is built by one sweep in that order with a union-find: a vertex with no processed
  neighbour is a minimum, one that touches two or more components is a saddle, and the elder rule
  pairs the younger minimum with the saddle; the split tree is the same sweep in reverse order;
- simplification removes the leaf branches whose persistence is at most a threshold by flattening
  each removed basin to its saddle's value and ordering it just after the saddle (breadth-first from
  it), so that the plain merge tree of the simplified field (with its ``_Order``) is the simplified tree.

Only numpy (and numba when importable): this module also runs inside ParaView's own Python
(numpy 1.24, no pip vtk, no torch). Set ``GLOBSCOPE_NO_NUMBA=1`` or pass ``use_numba=False`` to run
the pure-Python kernels (same results, much slower; the tests run both).

NaN values are refused by default (the error says how many and where); with ``nan="inf"`` they are
treated as +inf: they come last in the order (ties by vertex id), so they never create minima of a
join tree, and their Scalar is +inf.
"""
from __future__ import annotations

import numpy as np

from ..errors import GlobScopeError
from ..resources import format_bytes, host_memory
from .kernels import OFFSETS, homology_split_pairs, kernels_for
from .results import TopologyResult, Tree
from .ttk_layout import fill_diagram, fill_tree, vertex_coords

# bytes of working memory per grid point (values, order, ranks, union-find, segmentation, outputs)
BYTES_PER_POINT = 120


def as_grid(values) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.size == 0:
        raise GlobScopeError(f"expected a 2D or 3D grid of values, got shape {a.shape}")
    return a


def check_memory(n_points: int, what: str = "grid") -> None:
    """Refuse grids whose working set would not fit in memory (a clear error, never a crash)."""
    need = n_points * BYTES_PER_POINT
    try:
        avail, source = host_memory()  # resources.py: the memory rule of every stage
    except (ValueError, OSError, AttributeError):  # pragma: no cover - no way to tell: no check
        return
    if need > avail:
        raise GlobScopeError(f"{what}: {n_points} points need about {format_bytes(need)} for the merge tree, "
                             f"only {format_bytes(avail)} available ({source}); use a coarser grid")


def _describe_nan(bad: np.ndarray, shape) -> str:
    idx = np.flatnonzero(bad.ravel())
    nz, ny, nx = shape
    where = [f"(i={v % nx}, j={v // nx % ny}" + (f", k={v // (nx * ny)})" if nz > 1 else ")") for v in idx[:5]]
    more = ", ..." if len(idx) > 5 else ""
    return f"{len(idx)} NaN value(s) of {bad.size} at {', '.join(where)}{more}"


def vertex_order(values, order_field=None, nan="error", what="field") -> np.ndarray:
    """Vertices sorted by (value, vertex id), or by ``order_field`` (TTK's ``_Order``) when given."""
    f = as_grid(values).ravel()
    if f.dtype.kind == "f":
        bad = np.isnan(f)
        if bad.any():
            if nan != "inf":
                raise GlobScopeError(f"{what}: {_describe_nan(bad, as_grid(values).shape)}; "
                                     "refusing (treat them as +inf with --nan-as-inf)")
            f = np.where(bad, np.inf, f)
    elif f.dtype.kind not in "iub":
        raise GlobScopeError(f"{what}: values of type {f.dtype} are not a scalar field")
    if order_field is not None:
        key = np.asarray(order_field).ravel()
        if key.shape != f.shape:
            raise GlobScopeError(f"{what}: order array has {key.size} values for {f.size} points")
        order = np.argsort(key, kind="stable")
    elif f.dtype == np.float32 and f.size < 2**32:
        return _argsort_float32(f)
    else:
        order = np.argsort(f, kind="stable")
    return order.astype(np.int32) if f.size < 2**31 - 1 else order


def _argsort_float32(f) -> np.ndarray:
    """``argsort(f, kind="stable")`` of float32 values (no NaN), 3x faster: one sort of (value, id) keys."""
    b = (f + np.float32(0)).view(np.uint32).astype(np.uint64)  # + 0 turns -0.0 into +0.0
    b = np.where(b >> np.uint64(31), b ^ np.uint64(0xFFFFFFFF), b | np.uint64(0x80000000))  # order of floats
    key = (b << np.uint64(32)) | np.arange(f.size, dtype=np.uint64)
    del b
    key.sort()
    key &= np.uint64(0xFFFFFFFF)
    return key.astype(np.int32 if f.size < 2**31 - 1 else np.int64)


def merge_tree(shape, order, use_numba=None) -> Tree:
    """The merge tree of the vertices swept in ``order`` (join: ascending; split: descending)."""
    nz, ny, nx = shape
    k = kernels_for(use_numba)
    order = np.ascontiguousarray(order)
    pmin, psad, gmin, is_node, up_of, down_of, rank = k["sweep"](order, nx, ny, nz, OFFSETS)
    node_vertex = order[is_node[order].astype(bool)]  # nodes in sweep order = NodeId
    node_id = np.full(len(order), -1, order.dtype)
    node_id[node_vertex] = np.arange(len(node_vertex), dtype=order.dtype)
    up_v = up_of[node_vertex]
    node_up = np.where(up_v >= 0, node_id[np.maximum(up_v, 0)], -1).astype(np.int64)
    pairs = np.stack([pmin, psad], 1).astype(np.int64)
    return Tree(order, rank, node_vertex, node_up, node_id[down_of], pairs, int(gmin), int(order[-1]), is_node)


def simplify_order(shape, tree: Tree, values_flat, threshold, use_numba=None):
    """Remove the pairs with persistence <= threshold: (new sweep order, simplified values)."""
    nz, ny, nx = shape
    f = values_flat
    pers = np.abs(f[tree.pairs[:, 1]].astype(np.float64) - f[tree.pairs[:, 0]])
    removed = tree.pairs[pers <= threshold]
    if len(removed) == 0:
        return tree.order, f.copy()
    removed = removed[np.argsort(-tree.rank[removed[:, 1]], kind="stable")]
    k = kernels_for(use_numba)
    owner, seq = k["flatten"](tree.rank, np.ascontiguousarray(removed[:, 0].astype(tree.rank.dtype)),
                              np.ascontiguousarray(removed[:, 1].astype(tree.rank.dtype)), nx, ny, nz, OFFSETS)
    flat = owner >= 0
    primary = np.where(flat, tree.rank[np.maximum(owner, 0)], tree.rank)
    order = np.lexsort((seq, primary)).astype(tree.order.dtype)
    g = f.copy()
    g[flat] = f[owner[flat]]
    return order, g


def compute_topology(values, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0), tree="join", persistence=0.0,
                     relative=False, order=None, nan="error", name="scalar", use_numba=None,
                     split_pairs="tree") -> TopologyResult:
    """Merge tree, segmentation and persistence diagram of a scalar field on a regular grid.

    ``values`` (nz, ny, nx) or (ny, nx); ``origin``/``spacing`` in VTK's (x, y, z) order. ``tree``:
    "join" (minima merging as the value rises) or "split". ``persistence``: leaf branches with
    persistence <= it are removed (``relative``: a fraction of the field's range). ``order``: TTK's
    ``<name>_Order`` array when the input has one. ``nan``: "error" or "inf" (see module docstring).
    The nodes, arcs and segmentation are those of the simplified field; the diagram and ``pairs`` are
    those of the input field (all pairs, to choose a threshold from). ``split_pairs``: the diagram of a
    split tree lists the tree's own saddle-maximum pairs ("tree", as TTK's FTM backend) or those of TTK's
    default backend ("homology": a maximum on the boundary makes no pair; see homology_split_pairs).
    ``segmentation`` holds TTK's four region arrays; the simplified field and its order (TTK's
    simplification output, the input of the tree) are ``simplified_values`` and ``simplified_order``.
    """
    if tree not in ("join", "split"):
        raise GlobScopeError(f"tree must be 'join' or 'split', not {tree!r}")
    if split_pairs not in ("tree", "homology"):
        raise GlobScopeError(f"split_pairs must be 'tree' or 'homology', not {split_pairs!r}")
    grid = as_grid(values)
    shape = grid.shape
    nz, ny, nx = shape
    check_memory(grid.size, name)
    origin = tuple(float(o) for o in (list(origin) + [0.0] * 3)[:3])
    spacing = tuple(float(s) for s in (list(spacing) + [1.0] * 3)[:3])
    asc = vertex_order(grid, order, nan=nan, what=name)
    f = grid.ravel().astype(np.float64) if grid.dtype.kind != "f" else grid.ravel()
    if nan == "inf" and f.dtype.kind == "f" and np.isnan(f).any():
        f = np.where(np.isnan(f), np.inf, f)
    finite = f[np.isfinite(f)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    threshold = float(persistence) * (hi - lo) if relative else float(persistence)
    if threshold < 0 or not np.isfinite(threshold):
        raise GlobScopeError(f"persistence threshold must be a finite number >= 0, not {persistence}")

    sweep = asc if tree == "join" else asc[::-1].copy()
    t0 = merge_tree(shape, sweep, use_numba)
    pers0 = np.abs(f[t0.pairs[:, 1]].astype(np.float64) - f[t0.pairs[:, 0]])
    if threshold > 0:
        sweep2, g = simplify_order(shape, t0, f, threshold, use_numba)
        t = merge_tree(shape, sweep2, use_numba) if sweep2 is not t0.order else t0
    else:
        g, t = f.copy(), t0
    res = TopologyResult(tree, shape, origin, spacing, threshold, name)
    res.pairs, res.persistence = t0.pairs, pers0
    res.simplified_pairs = t.pairs
    res.simplified_values = g.reshape(shape)
    asc_rank = t.rank if tree == "join" else (len(f) - 1 - t.rank)
    res.simplified_order = asc_rank.astype(np.int32 if len(f) < 2**31 - 1 else np.int64).reshape(shape)

    coords = vertex_coords(shape, origin, spacing)
    fill_tree(res, t, g, coords, tree, use_numba)
    # the diagram of the input field; a split tree's own pairs, or TTK's default (homology) pairs
    dpairs = t0.pairs
    if tree == "split" and split_pairs == "homology":
        dpairs = homology_split_pairs(shape, sweep, use_numba)
    in_rank = t0.rank if tree == "join" else (len(f) - 1 - t0.rank)
    gmin, gmax = (t0.global_extremum, t0.root) if tree == "join" else (t0.root, t0.global_extremum)
    fill_diagram(res, dpairs, gmin, gmax, in_rank, f, grid.dtype, coords, tree, nz > 1)
    return res
