"""The sweeps of merge_tree.py on TTK's implicit triangulation: neighbours, the union-find merge-tree sweep,
segmentation ids, the flattening of simplified basins, region arrays, and the saddle-maximum pairs of
TTK's default persistence backend.

Plain Python and numpy that numba compiles when it is importable (``kernels_for``); no other dependency, so
this runs inside ParaView's own Python too.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import GlobScopeError

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


def kernels_for(use_numba):
    """The kernels by name: numba-compiled, or pure Python (use_numba False, or None with GLOBSCOPE_NO_NUMBA=1)."""
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
