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

import os
from dataclasses import dataclass, field

import numpy as np

from .errors import GlobScopeError

try:  # optional: the kernels are plain Python that numba compiles when it is there
    import numba
except Exception:  # pragma: no cover - depends on the environment
    numba = None

# TTK's implicit triangulation, offsets (di, dj, dk); in 2D the ones with dk != 0 drop out at the
# boundary, leaving exactly TTK's 6 neighbours (+-x, +-y, +(1,-1), -(1,-1)).
OFFSETS = np.array([
    (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1),
    (1, -1, 0), (-1, 1, 0), (1, 0, -1), (-1, 0, 1), (0, 1, 1), (0, -1, -1),
    (1, -1, -1), (-1, 1, 1),
], dtype=np.int64)

VTK_POLY_VERTEX = 2
# CriticalType codes
MINIMUM, SADDLE1, SADDLE2, MAXIMUM, DEGENERATE, REGULAR = 0, 1, 2, 3, 4, 5
# bytes of working memory per grid point (values, order, ranks, union-find, segmentation, outputs)
BYTES_PER_POINT = 120


def neighbour_edges(shape) -> np.ndarray:
    """All edges (u, v), u < v, of the triangulation of a grid of shape (nz, ny, nx) (for tests)."""
    nz, ny, nx = shape
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    i, j, k = i.ravel(), j.ravel(), k.ravel()
    out = []
    for di, dj, dk in OFFSETS:
        ii, jj, kk = i + di, j + dj, k + dk
        ok = (ii >= 0) & (ii < nx) & (jj >= 0) & (jj < ny) & (kk >= 0) & (kk < nz)
        u = i[ok] + j[ok] * nx + k[ok] * nx * ny
        v = ii[ok] + jj[ok] * nx + kk[ok] * nx * ny
        out.append(np.stack([np.minimum(u, v), np.maximum(u, v)], 1))
    e = np.concatenate(out)
    return np.unique(e, axis=0)


# --- kernels (plain Python; numba-compiled when available) -----------------------------------------
def _sweep(order, nx, ny, nz, offs):
    """One union-find sweep over the vertices in ``order``: the merge tree of that order.

    Returns (pair_min, pair_saddle, global_min, is_node, up_of, down_of, rank): ``up_of[n]`` is the upper
    node of node n's root-ward arc (-1 for the root); ``down_of[v]`` is the lower node of the arc
    vertex v belongs to (a node belongs to its root-ward arc, the root to its elder lower arc).
    """
    n = order.shape[0]
    parent = np.empty_like(order)
    parent[:] = -1
    cur = np.empty_like(order)      # per component root: node at the bottom of its open arc
    oldest = np.empty_like(order)   # per component root: its oldest (lowest) minimum
    size = np.empty_like(order)     # per component root: number of vertices
    rank = np.empty_like(order)
    down_of = np.empty_like(order)
    up_of = np.empty_like(order)
    up_of[:] = -1
    is_node = np.zeros(n, np.uint8)
    pmin = np.empty_like(order)
    psad = np.empty_like(order)
    npairs = 0
    roots = np.empty(16, order.dtype)
    for r in range(n):
        rank[order[r]] = r
    nxy = nx * ny
    delta = offs[:, 0] + offs[:, 1] * nx + offs[:, 2] * nxy
    for r in range(n):
        v = order[r]
        k = v // nxy
        rem = v - k * nxy
        j = rem // nx
        i = rem - j * nx
        inside = 0 < i < nx - 1 and 0 < j < ny - 1 and 0 < k < nz - 1
        nr = 0
        for o in range(offs.shape[0]):
            if inside:  # the common case: no bounds to check
                u = v + delta[o]
            else:
                ii = i + offs[o, 0]
                jj = j + offs[o, 1]
                kk = k + offs[o, 2]
                if ii < 0 or ii >= nx or jj < 0 or jj >= ny or kk < 0 or kk >= nz:
                    continue
                u = ii + jj * nx + kk * nxy
            if parent[u] < 0:
                continue
            x = u
            while parent[x] != x:  # find, with path halving
                parent[x] = parent[parent[x]]
                x = parent[x]
            dup = False
            for q in range(nr):
                if roots[q] == x:
                    dup = True
                    break
            if not dup:
                roots[nr] = x
                nr += 1
        last = r == n - 1
        if nr == 0:  # minimum: a new component
            parent[v] = v
            size[v] = 1
            cur[v] = v
            oldest[v] = v
            down_of[v] = v
            is_node[v] = 1
        elif nr == 1:  # regular (or the root)
            c = roots[0]
            parent[v] = c
            size[c] += 1
            down_of[v] = cur[c]
            if last:
                up_of[cur[c]] = v
                is_node[v] = 1
        else:  # saddle: the elder rule keeps the component with the oldest minimum
            e = roots[0]
            for q in range(1, nr):
                if rank[oldest[roots[q]]] < rank[oldest[e]]:
                    e = roots[q]
            down_of[v] = cur[e] if last else v
            for q in range(nr):
                c = roots[q]
                up_of[cur[c]] = v
                if c != e:
                    pmin[npairs] = oldest[c]
                    psad[npairs] = v
                    npairs += 1
            big = roots[0]  # union by size: hang the smaller trees under the largest root
            for q in range(1, nr):
                if size[roots[q]] > size[big]:
                    big = roots[q]
            oe = oldest[e]
            for q in range(nr):
                c = roots[q]
                if c != big:
                    parent[c] = big
                    size[big] += size[c]
            parent[v] = big
            size[big] += 1
            cur[big] = v
            oldest[big] = oe
            is_node[v] = 1
    x = order[n - 1]
    while parent[x] != x:
        x = parent[x]
    return pmin[:npairs].copy(), psad[:npairs].copy(), oldest[x], is_node, up_of, down_of, rank


def _seg_ids(up_node, n_nodes):
    """SegmentationId of each node's root-ward arc: breadth-first from the leaves in tree order."""
    has_child = np.zeros(n_nodes, np.uint8)
    for a in range(n_nodes):
        if up_node[a] >= 0:
            has_child[up_node[a]] = 1
    seg = np.empty(n_nodes, np.int64)
    seg[:] = -1
    queue = np.empty(2 * n_nodes + 1, np.int64)
    tail = 0
    for a in range(n_nodes):
        if has_child[a] == 0:
            queue[tail] = a
            tail += 1
    head = 0
    nxt = 0
    while head < tail:
        a = queue[head]
        head += 1
        b = up_node[a]
        if b >= 0 and seg[a] < 0:
            seg[a] = nxt
            nxt += 1
            queue[tail] = b
            tail += 1
    return seg


def _flatten(rank, pmin, psad, nx, ny, nz, offs):
    """Flatten the basins of the removed pairs (sorted by decreasing saddle rank).

    Returns (owner, seq): ``owner[v]`` the saddle whose basin v was flattened into (-1 if none) and
    ``seq[v]`` its breadth-first index from that saddle (the order it takes just after the saddle).
    """
    n = rank.shape[0]
    owner = np.empty_like(rank)
    owner[:] = -1
    seq = np.zeros_like(rank)
    stack = np.empty_like(rank)
    nxy = nx * ny
    counter = 0
    for p in range(pmin.shape[0]):
        m = pmin[p]
        s = psad[p]
        rs = rank[s]
        if owner[m] >= 0:  # inside a larger removed basin already
            continue
        # the basin: the component of {rank < rank(s)} that holds m
        owner[m] = s
        seq[m] = -1
        top = 1
        stack[0] = m
        while top > 0:
            top -= 1
            x = stack[top]
            k = x // nxy
            rem = x - k * nxy
            j = rem // nx
            i = rem - j * nx
            for o in range(offs.shape[0]):
                ii = i + offs[o, 0]
                jj = j + offs[o, 1]
                kk = k + offs[o, 2]
                if ii < 0 or ii >= nx or jj < 0 or jj >= ny or kk < 0 or kk >= nz:
                    continue
                u = ii + jj * nx + kk * nxy
                if rank[u] < rs and owner[u] < 0:
                    owner[u] = s
                    seq[u] = -1
                    stack[top] = u
                    top += 1
        # breadth-first from the saddle: each flattened vertex then has a lower neighbour
        stack[0] = s
        head = 0
        tail = 1
        while head < tail:
            x = stack[head]
            head += 1
            k = x // nxy
            rem = x - k * nxy
            j = rem // nx
            i = rem - j * nx
            for o in range(offs.shape[0]):
                ii = i + offs[o, 0]
                jj = j + offs[o, 1]
                kk = k + offs[o, 2]
                if ii < 0 or ii >= nx or jj < 0 or jj >= ny or kk < 0 or kk >= nz:
                    continue
                u = ii + jj * nx + kk * nxy
                if owner[u] == s and seq[u] == -1:
                    counter += 1
                    seq[u] = counter
                    stack[tail] = u
                    tail += 1
    return owner, seq


def _lowest(node_up):
    """Per node: the oldest leaf of its subtree (NodeIds are in sweep order: children first)."""
    low = np.arange(node_up.shape[0])
    for a in range(node_up.shape[0]):
        b = node_up[a]
        if b >= 0 and low[a] < low[b]:
            low[b] = low[a]
    return low


def _regions(vnode, is_node, arc_of_node, seg_arc, rtype, span):
    """Arc sizes (regular vertices) and the per-vertex SegmentationId, RegionType, RegionSize, RegionSpan."""
    n = vnode.shape[0]
    size = np.zeros(seg_arc.shape[0], np.int64)
    for v in range(n):
        a = arc_of_node[vnode[v]]
        if a >= 0 and is_node[v] == 0:
            size[a] += 1
    seg = np.empty(n, np.int32)
    rt = np.empty(n, np.int8)
    rs = np.empty(n, np.int32)
    sp = np.empty(n, np.float64)
    for v in range(n):
        a = arc_of_node[vnode[v]]
        if a < 0:  # a single-vertex grid has no arc at all
            seg[v], rt[v], rs[v], sp[v] = -1, -1, 0, 0.0
        else:
            seg[v], rt[v], rs[v], sp[v] = seg_arc[a], rtype[a], size[a], span[a]
    return size, seg, rt, rs, sp


_KERNELS = {"py": {"sweep": _sweep, "seg_ids": _seg_ids, "flatten": _flatten, "lowest": _lowest,
                   "regions": _regions}}


def numba_available() -> bool:
    return numba is not None


def _kernels(use_numba):
    if use_numba is None:
        use_numba = numba is not None and os.environ.get("GLOBSCOPE_NO_NUMBA", "") in ("", "0")
    if not use_numba:
        return _KERNELS["py"]
    if numba is None:
        raise GlobScopeError("numba is not importable; run without it (use_numba=False)")
    if "nb" not in _KERNELS:
        jit = numba.njit(cache=True, nogil=True)
        _KERNELS["nb"] = {k: jit(f) for k, f in _KERNELS["py"].items()}
    return _KERNELS["nb"]


# --- results -----------------------------------------------------------------------------------
@dataclass
class Tree:
    """A merge tree of one vertex order (internal form; vertex ids are flat grid ids)."""

    order: np.ndarray        # vertices in sweep order (ascending for join, descending for split)
    rank: np.ndarray         # position of each vertex in ``order``
    node_vertex: np.ndarray  # node vertices by NodeId (sweep order)
    node_up: np.ndarray      # NodeId of each node's root-ward neighbour (-1 for the root)
    vertex_arc_node: np.ndarray  # per vertex: NodeId of the lower node of its arc
    pairs: np.ndarray        # [k, 2] (extremum vertex, saddle vertex), elder rule, sorted by saddle
    global_extremum: int     # oldest extremum, paired with the root (infinite pair)
    root: int                # the last vertex of the sweep
    is_node: np.ndarray      # per vertex: 1 for a node


@dataclass
class TopologyResult:
    """Merge tree, segmentation and diagram in TTK's layout; every field a plain numpy array/dict."""

    tree: str
    shape: tuple            # (nz, ny, nx)
    origin: tuple
    spacing: tuple
    threshold: float        # absolute persistence threshold that was applied
    scalar: str = "scalar"  # the scalar field's name
    nodes: dict = field(default_factory=dict)         # points, point_arrays
    arcs: dict = field(default_factory=dict)          # points, cells, point_arrays, cell_arrays
    segmentation: dict = field(default_factory=dict)  # point_arrays (flat, VTK point order)
    diagram: dict = field(default_factory=dict)       # points, cells, point_arrays, cell_arrays
    pairs: np.ndarray = None       # pairs of the input field: [k, 2] vertex ids (birth, death)
    persistence: np.ndarray = None  # their persistence
    simplified_pairs: np.ndarray = None  # pairs of the simplified tree
    simplified_values: np.ndarray = None  # (nz, ny, nx)
    simplified_order: np.ndarray = None   # (nz, ny, nx) int: rank of each vertex (TTK's _Order)
    basin_minimum: np.ndarray = None  # per arc (SegmentationId order): oldest extremum vertex below it
    basin_persistence: np.ndarray = None  # per arc: persistence of that extremum (inf: global)


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
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        avail = max(avail, total // 2)  # page cache counts as free for this purpose
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return
    if need > avail:
        raise GlobScopeError(f"{what}: {n_points} points need about {need / 2**30:.1f} GiB for the merge tree, "
                             f"only {avail / 2**30:.1f} GiB available; use a coarser grid")


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
    k = _kernels(use_numba)
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
    k = _kernels(use_numba)
    owner, seq = k["flatten"](tree.rank, np.ascontiguousarray(removed[:, 0].astype(tree.rank.dtype)),
                              np.ascontiguousarray(removed[:, 1].astype(tree.rank.dtype)), nx, ny, nz, OFFSETS)
    flat = owner >= 0
    primary = np.where(flat, tree.rank[np.maximum(owner, 0)], tree.rank)
    order = np.lexsort((seq, primary)).astype(tree.order.dtype)
    g = f.copy()
    g[flat] = f[owner[flat]]
    return order, g


def _node_types(tree: Tree, kind: str) -> np.ndarray:
    n = len(tree.node_vertex)
    down = np.bincount(tree.node_up[tree.node_up >= 0], minlength=n)
    is_root = tree.node_up < 0
    leaf, root = (MINIMUM, MAXIMUM) if kind == "join" else (MAXIMUM, MINIMUM)
    saddle = SADDLE1 if kind == "join" else SADDLE2
    t = np.full(n, DEGENERATE, np.int32)
    t[down == 2] = saddle
    t[down == 0] = leaf
    t[is_root & (down <= 1)] = root  # a root that also merges 2+ components keeps its saddle/degenerate type
    return t


def region_types(down_type, up_type) -> np.ndarray:
    """TTK's RegionType of arcs from their end nodes' CriticalType (ttkFTMStructures.h): 0 if either end is a
    minimum, else 1 if either is a maximum, else 2 if both are 1-saddles, 3 if both 2-saddles, else 4 (so an
    arc touching a degenerate node is 4, and a split tree's arc down to the global minimum is 0)."""
    down_type, up_type = np.asarray(down_type), np.asarray(up_type)
    r = np.full(down_type.shape, 4, np.int8)
    r[(down_type == SADDLE2) & (up_type == SADDLE2)] = 3
    r[(down_type == SADDLE1) & (up_type == SADDLE1)] = 2
    r[(down_type == MAXIMUM) | (up_type == MAXIMUM)] = 1
    r[(down_type == MINIMUM) | (up_type == MINIMUM)] = 0
    return r


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

    coords = _coords(shape, origin, spacing)
    _fill_tree(res, t, g, coords, tree, use_numba)
    # the diagram of the input field; a split tree's own pairs, or TTK's default (homology) pairs
    dpairs = t0.pairs
    if tree == "split" and split_pairs == "homology":
        dpairs = homology_split_pairs(shape, sweep, use_numba)
    in_rank = t0.rank if tree == "join" else (len(f) - 1 - t0.rank)
    gmin, gmax = (t0.global_extremum, t0.root) if tree == "join" else (t0.root, t0.global_extremum)
    _fill_diagram(res, dpairs, gmin, gmax, in_rank, f, grid.dtype, coords, tree, nz > 1)
    return res


# TTK's implicit triangulation keeps origin and spacing as float32 and computes a vertex's position as
# origin + spacing * index in float; its build (TTK_ENABLE_CPU_OPTIMIZATION: -march=native) fuses that
# multiply-add, so the result is rounded once: computed here exactly in float64, then rounded to float32.
# Checked against TTK 1.2.0 built here on random origins and spacings (tests/test_ttk.py).
def _fma32(a, b, c):
    """float32 fma(a, b, c): one rounding of the exact a*b + c (exact in float64 for these operands)."""
    return (np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float64)
            + np.asarray(c, np.float32).astype(np.float64)).astype(np.float32)


def _coords(shape, origin, spacing):
    """Vertex id -> (x, y, z) float32, as TTK's implicit triangulation computes them (see _fma32)."""
    nz, ny, nx = shape
    o = np.asarray(origin, np.float32)
    sp = np.asarray(spacing, np.float32)

    def at(v):
        v = np.asarray(v, np.int64)
        ijk = np.stack([v % nx, v // nx % ny, v // (nx * ny)], -1)
        return _fma32(sp, ijk, o)

    return at


def _distance32(a, b):
    """TTK's Geometry::distance of float points: squares accumulated in float32 (fused), x then y then z."""
    d = (a - b).astype(np.float32)
    s = np.zeros(len(d), np.float32)
    for k in range(3):
        s = _fma32(d[:, k], d[:, k].astype(np.float64), s)
    return np.sqrt(s)


def _fill_tree(res: TopologyResult, t: Tree, g, coords, kind, use_numba):
    nn = len(t.node_vertex)
    has_up = t.node_up >= 0
    arc_down = np.flatnonzero(has_up)  # arcs sorted by (downNodeId, upNodeId): one per non-root node
    arc_up = t.node_up[arc_down]
    arc_of_node = np.full(nn, -1, np.int64)
    arc_of_node[arc_down] = np.arange(len(arc_down))
    seg_by_node = _kernels(use_numba)["seg_ids"](np.ascontiguousarray(t.node_up, dtype=np.int64), nn)
    seg_arc = seg_by_node[arc_down]  # SegmentationId of each arc (in arc order)

    n_arcs = len(arc_down)
    pos = coords(t.node_vertex)
    span = _distance32(pos[arc_down], pos[arc_up]).astype(np.float64) if n_arcs else np.zeros(0)

    types = _node_types(t, kind)
    rtype = region_types(types[arc_down], types[arc_up]) if n_arcs else np.zeros(0, np.int8)
    # per vertex: the arc whose lower node is vertex_arc_node (the root, alone, has none)
    size, vseg, vtype, vsize, vspan = _kernels(use_numba)["regions"](
        t.vertex_arc_node, t.is_node, arc_of_node, seg_arc, rtype, np.ascontiguousarray(span, dtype=np.float64))

    # nodes: the adjacent arc is the single down arc, else the up arc, else the first down arc
    down_count = np.bincount(arc_up, minlength=nn) if n_arcs else np.zeros(nn, np.int64)
    first_down = np.full(nn, -1, np.int64)
    if n_arcs:
        first_down[arc_up[::-1]] = np.arange(n_arcs)[::-1]
    adj = np.where(down_count == 1, first_down, np.where(has_up, arc_of_node, first_down))
    node_size = np.where(adj >= 0, size[np.maximum(adj, 0)] if n_arcs else 0, 0)
    node_span = np.where(adj >= 0, span[np.maximum(adj, 0)] if n_arcs else 0, 0)
    res.nodes = {
        "points": pos,  # float32: vtkPoints' default type, as TTK writes them
        "cells": [np.arange(nn, dtype=np.int64)],  # TTK: one VTK_POLY_VERTEX cell holding every node
        "cell_types": np.array([VTK_POLY_VERTEX]),
        "point_arrays": {
            "NodeId": np.arange(nn, dtype=np.int32),
            "Scalar": g[t.node_vertex].astype(np.float32),
            "VertexId": t.node_vertex.astype(np.int32),
            "CriticalType": types,
            "RegionSize": node_size.astype(np.int32),
            "RegionSpan": node_span.astype(np.int32),
        },
    }
    # TTK: one line per arc from its lower-valued node to its higher-valued one (join: leaf side first,
    # split: root side first), one float32 point per node in order of first use
    lo_hi = (arc_down, arc_up) if kind == "join" else (arc_up, arc_down)
    ends = np.stack([t.node_vertex[lo_hi[0]], t.node_vertex[lo_hi[1]]], 1).reshape(-1)
    used, first = np.unique(ends, return_index=True)
    pt_vertex = ends[np.sort(first)]  # node vertices in order of first use
    pt_of = np.full(len(g), -1, np.int64)
    pt_of[pt_vertex] = np.arange(len(pt_vertex))
    res.arcs = {
        "points": coords(pt_vertex) if n_arcs else np.zeros((0, 3), np.float32),
        "cells": pt_of[ends].reshape(-1, 2) if n_arcs else np.zeros((0, 2), np.int64),
        "point_arrays": {"Scalar": g[pt_vertex].astype(np.float32),
                         "ttkMaskScalarField": np.zeros(len(pt_vertex), np.int8)},
        "cell_arrays": {
            "SegmentationId": seg_arc.astype(np.int32),
            "upNodeId": arc_up.astype(np.int32),
            "downNodeId": arc_down.astype(np.int32),
            "RegionSize": size.astype(np.int32),
            "RegionSpan": span.astype(np.float64),
        },
    }
    # segmentation: by SegmentationId; a single-vertex grid has no arc at all
    by_seg = np.argsort(seg_arc)
    res.segmentation = {"SegmentationId": vseg, "RegionSize": vsize, "RegionSpan": vspan, "RegionType": vtype}
    # basins: for each arc, the oldest extremum of the subtree below it, and that extremum's persistence
    low = _kernels(use_numba)["lowest"](np.ascontiguousarray(t.node_up, dtype=np.int64))
    ext = t.node_vertex[low[arc_down]]
    pers_of = np.full(len(g), np.inf)
    pers_of[t.pairs[:, 0]] = np.abs(g[t.pairs[:, 1]].astype(np.float64) - g[t.pairs[:, 0]])
    bp = pers_of[ext]
    res.basin_minimum = ext[by_seg] if n_arcs else np.zeros(0, np.int64)
    res.basin_persistence = bp[by_seg] if n_arcs else np.zeros(0)


def _top_cells(shape) -> np.ndarray:
    """The triangles (2D) or tetrahedra (3D) of TTK's implicit triangulation, [m, d+1] vertex ids.

    Mirrored in x, it is the Kuhn triangulation: in each cell of the grid, one simplex per order of the axes,
    the path of unit steps from the cell's lower corner to its upper one."""
    import itertools

    nz, ny, nx = shape
    axes = [a for a, n in enumerate((nx, ny, nz)) if n > 1]
    dims = np.array([nx, ny, nz])
    lo = np.stack(np.meshgrid(*[np.arange(n - 1 if a in axes else 1) for a, n in enumerate((nx, ny, nz))],
                              indexing="ij"), -1).reshape(-1, 3)  # lower corners, mirrored coordinates
    out = []
    for perm in itertools.permutations(axes):
        p = lo.copy()
        verts = []
        for step in (None,) + perm:
            if step is not None:
                p = p.copy()
                p[:, step] += 1
            i = dims[0] - 1 - p[:, 0]  # back to TTK's x
            verts.append(i + p[:, 1] * nx + p[:, 2] * nx * ny)
        out.append(np.stack(verts, 1))
    return np.concatenate(out) if out else np.zeros((0, len(axes) + 1), np.int64)


def homology_split_pairs(shape, desc_order, use_numba=None) -> np.ndarray:
    """Saddle-maximum pairs as TTK's default persistence backend (discrete Morse) gives them.

    These are the top-dimensional pairs of the lower-star filtration (the diagram at vertex level is unique):
    by duality, the classes of the sublevel sets are the components of their complement, whose cells are the
    triangles (tetrahedra) above the level, joined through the edges (triangles) above it, and the outside,
    older than every maximum, through the boundary. So a maximum on the boundary makes no pair, and a maximum
    dies where its component of the complement reaches an older one. Returns [k, 2] (maximum vertex, saddle
    vertex) in the order of the saddles in ``desc_order``.
    """
    nz, ny, nx = shape
    n = nx * ny * nz
    top = _top_cells(shape)
    d = top.shape[1] - 1
    if d < 2:  # a one-cell-wide grid has no such pairs
        return np.zeros((0, 2), np.int64)
    pos = np.empty(n, np.int64)
    pos[np.asarray(desc_order, np.int64)] = np.arange(n)  # position in the descending sweep
    # the cell's first vertex in the sweep is when it joins the complement: its maximum
    cell_birth = top[np.arange(len(top)), np.argmin(pos[top], 1)]
    # facets: drop one vertex; each is shared by two cells, or one on the boundary (then joined to the outside)
    facets = np.concatenate([np.sort(np.delete(top, q, 1), 1) for q in range(d + 1)])
    owner = np.tile(np.arange(len(top)), d + 1)
    key, inv = np.unique(facets, axis=0, return_inverse=True)
    inv = inv.ravel()
    srt = np.argsort(inv, kind="stable")
    first = np.searchsorted(inv[srt], np.arange(len(key)))
    a = owner[srt[first]]
    cnt = np.bincount(inv, minlength=len(key))
    b = np.where(cnt == 2, owner[srt[np.minimum(first + 1, len(srt) - 1)]], len(top))  # len(top): the outside
    f_when = pos[key].min(1)  # the facet joins the complement at its maximum vertex
    f_vertex = key[np.arange(len(key)), pos[key].argmin(1)]
    ev = np.argsort(f_when, kind="stable")
    parent = list(range(len(top) + 1))
    birth = [int(pos[v]) for v in cell_birth] + [-1]  # the outside is the oldest
    bvert = [int(v) for v in cell_birth] + [-1]
    pairs = []

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for e in ev.tolist():
        x, y = find(int(a[e])), find(int(b[e]))
        if x == y:
            continue
        if birth[x] > birth[y]:
            x, y = y, x  # x the elder
        s = int(f_vertex[e])
        if bvert[y] != s:  # a zero-persistence pair (inside one vertex's star) is no pair
            pairs.append((bvert[y], s))
        parent[y] = x
    p = np.array(pairs, np.int64).reshape(-1, 2)
    return p[np.argsort(pos[p[:, 1]], kind="stable")] if len(p) else p


def _fill_diagram(res: TopologyResult, pairs, gmin, gmax, asc_rank, f, dtype, coords, kind, is3d):
    """TTK's persistence diagram layout (ttkPersistenceDiagramUtils DiagramToVTU, not embedded in the domain).

    One line per pair (points 2i birth, 2i+1 death at (b, b, 0), (b, d, 0), float32), pairs sorted by their
    birth vertex's order (so the infinite global min-max pair comes first), point array ``Coordinates`` (the
    vertices' positions), and a last diagonal cell from point 0 to the birth point of the pair with the
    highest birth value: PairIdentifier -1, PairType -1, IsFinite 0, Birth 0, Persistence 2x pair 0's.
    """
    birth_v, death_v = (pairs[:, 0], pairs[:, 1]) if kind == "join" else (pairs[:, 1], pairs[:, 0])
    # the infinite pair first, so that it stays first when a split tree's root is also a saddle (a tie)
    birth_v = np.concatenate([[gmin], birth_v]).astype(np.int64)
    death_v = np.concatenate([[gmax], death_v]).astype(np.int64)
    k = len(birth_v)
    saddle = SADDLE1 if kind == "join" else SADDLE2  # TTK: saddle-maximum pairs start at a 2-saddle, 2D too
    bt = np.full(k, MINIMUM if kind == "join" else saddle, np.int32)
    dt = np.full(k, saddle if kind == "join" else MAXIMUM, np.int32)
    bt[0], dt[0] = MINIMUM, MAXIMUM
    ptype = np.full(k, 0 if kind == "join" else (2 if is3d else 1), np.int32)
    ptype[0] = 0
    finite = np.ones(k, np.uint8)
    finite[0] = 0
    srt = np.argsort(asc_rank[birth_v], kind="stable")
    birth_v, death_v, bt, dt, ptype, finite = (a[srt] for a in (birth_v, death_v, bt, dt, ptype, finite))
    out_t = dtype if np.dtype(dtype).kind == "f" else np.float64
    b = f[birth_v].astype(np.float64)
    d = f[death_v].astype(np.float64)
    pts = np.zeros((2 * k, 3), np.float32)
    pts[0::2, 0], pts[0::2, 1] = b, b
    pts[1::2, 0], pts[1::2, 1] = b, d
    vid = np.empty(2 * k, np.int32)
    vid[0::2], vid[1::2] = birth_v, death_v
    ctype = np.empty(2 * k, np.int32)
    ctype[0::2], ctype[1::2] = bt, dt
    cxyz = np.empty((2 * k, 3), np.float32)
    cxyz[0::2], cxyz[1::2] = coords(birth_v), coords(death_v)
    top = int(np.argmax(b))  # std::max_element: the first pair with the highest birth
    cells = np.append(np.arange(2 * k), [0, 2 * top]).astype(np.int64).reshape(-1, 2)
    res.diagram = {
        "points": pts,
        "cells": cells,
        "point_arrays": {"ttkVertexScalarField": vid, "CriticalType": ctype, "Coordinates": cxyz},
        "cell_arrays": {
            "PairIdentifier": np.append(np.arange(k), -1).astype(np.int32),
            "PairType": np.append(ptype, -1).astype(np.int32),
            "Persistence": np.append(d - b, 2 * (d[0] - b[0])).astype(out_t),
            "Birth": np.append(b, 0).astype(out_t),
            "IsFinite": np.append(finite, 0).astype(np.uint8),
        },
    }
