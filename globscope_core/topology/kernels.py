"""The sweeps of merge_tree.py on TTK's implicit triangulation: neighbours, the union-find merge-tree sweep,
segmentation ids, the flattening of simplified basins, region arrays, and the saddle-maximum pairs of
TTK's default persistence backend.

Plain Python and numpy that numba compiles when it is importable (``kernels_for``); no other dependency, so
this runs inside ParaView's own Python too.
"""
from __future__ import annotations

import itertools
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


def _homology(desc_order, dims, offs, cell_verts, facet_verts, facet_cells, uf, pos):
    """The pairs of ``homology_split_pairs`` in one sweep of the vertices in ``desc_order``.

    Once a vertex is swept, all the cells of its star lie in one component of the complement (the star of a
    vertex is connected through its facets), so these components are those of the swept vertices on the grid's
    edges, with the outside as one more vertex, the oldest, next to every vertex on the domain boundary. At s,
    the components of its swept neighbours (and the outside, on the boundary) merge: all but the eldest die, a
    pair (its maximum, s) each. Only their order depends on the facets: where three or more merge, the facets
    of star(s) with s first are replayed in the order of their sorted vertex ids (``_star_tables``), as the
    union-find over all cells that this replaces did. ``uf`` (n + 1, all -1): parents, each root its component's
    oldest vertex (so its birth is its sweep position); ``pos`` (n) is scratch. Returns (maxima, saddles) in the
    order of the saddles in the sweep.
    """
    n = desc_order.shape[0]
    nx, ny, nz = dims[0], dims[1], dims[2]
    nxy = nx * ny
    nf = facet_verts.shape[1]  # a facet's vertices but s
    nc = cell_verts.shape[1]  # a cell's vertices
    nk = offs.shape[0]
    delta = offs[:, 0] + offs[:, 1] * nx + offs[:, 2] * nxy
    outside = n
    for r in range(n):
        pos[desc_order[r]] = r
    uf[outside] = outside
    cap = 16 + n // 8
    pmax = np.empty(cap, np.int64)
    psad = np.empty(cap, np.int64)
    npairs = 0
    npos = np.empty(nk, np.int64)  # the neighbours' sweep positions, -1 outside the grid
    nid = np.empty(nk, np.int64)  # and their vertex ids
    roots = np.empty(nk + 1, np.int64)
    nloc = facet_cells.shape[0] * 2 + 1
    lkey = np.empty(nloc, np.int64)  # the replay's union-find: components and cells born at s
    lpar = np.empty(nloc, np.int64)
    lbirth = np.empty(nloc, np.int64)
    for r in range(n):
        s = desc_order[r]
        k = s // nxy
        rem = s - k * nxy
        j = rem // nx
        i = rem - j * nx
        # inside the domain (on the axes it spans): no bounds to check and not next to the outside
        inside = (nx == 1 or 0 < i < nx - 1) and (ny == 1 or 0 < j < ny - 1) and (nz == 1 or 0 < k < nz - 1)
        nr = 0
        for o in range(nk):
            if inside:
                u = s + delta[o]
            else:
                ii = i + offs[o, 0]
                jj = j + offs[o, 1]
                kk = k + offs[o, 2]
                if ii < 0 or ii >= nx or jj < 0 or jj >= ny or kk < 0 or kk >= nz:
                    npos[o] = -1
                    continue
                u = ii + jj * nx + kk * nxy
            nid[o] = u
            npos[o] = pos[u]
            if npos[o] < r:
                while uf[u] != u:  # find, with path halving
                    uf[u] = uf[uf[u]]
                    u = uf[u]
                dup = False
                for q in range(nr):
                    if roots[q] == u:
                        dup = True
                        break
                if not dup:
                    roots[nr] = u
                    nr += 1
        if not inside:  # on the boundary: next to the outside (always a root)
            dup = False
            for q in range(nr):
                if roots[q] == outside:
                    dup = True
                    break
            if not dup:
                roots[nr] = outside
                nr += 1
        if nr == 0:  # a maximum inside the domain
            uf[s] = s
            continue
        eldest = roots[0]
        for q in range(1, nr):
            if roots[q] == outside or (eldest != outside and pos[roots[q]] < pos[eldest]):
                eldest = roots[q]
        if nr > 2:  # replay the facets: the order of the pairs at s
            nl = 0
            for f in range(facet_verts.shape[0]):
                first = True  # s comes first in the facet (a vertex outside the grid has -1: no facet)
                for t in range(nf):
                    if npos[facet_verts[f, t]] < r:
                        first = False
                        break
                if not first:
                    continue
                x = -1
                y = -1
                for e in range(2):
                    sc = facet_cells[f, e]
                    key = n + 1 + sc  # a cell born at s, unless it has a vertex outside the grid or swept
                    for t in range(nc):
                        pv = npos[cell_verts[sc, t]]
                        if pv < 0:
                            key = outside
                            break
                        if pv < r:
                            u = nid[cell_verts[sc, t]]
                            while uf[u] != u:
                                u = uf[u]
                            key = u
                            break
                    slot = -1
                    for q in range(nl):
                        if lkey[q] == key:
                            slot = q
                            break
                    if slot < 0:
                        slot = nl
                        nl += 1
                        lkey[slot] = key
                        lpar[slot] = slot
                        lbirth[slot] = -1 if key == outside else (r if key > n else pos[key])
                    while lpar[slot] != slot:
                        slot = lpar[slot]
                    if e == 0:
                        x = slot
                    else:
                        y = slot
                if x == y:
                    continue
                if lbirth[x] > lbirth[y]:
                    x, y = y, x  # x the elder
                if lbirth[y] != r:  # a cell born at s makes no pair
                    if npairs == cap:
                        cap *= 2
                        grown = np.empty(cap, np.int64)
                        grown[:npairs] = pmax[:npairs]
                        pmax = grown
                        grown = np.empty(cap, np.int64)
                        grown[:npairs] = psad[:npairs]
                        psad = grown
                    pmax[npairs] = desc_order[lbirth[y]]
                    psad[npairs] = s
                    npairs += 1
                lpar[y] = x
        elif nr == 2:  # one pair: the younger one dies
            if npairs == cap:
                cap *= 2
                grown = np.empty(cap, np.int64)
                grown[:npairs] = pmax[:npairs]
                pmax = grown
                grown = np.empty(cap, np.int64)
                grown[:npairs] = psad[:npairs]
                psad = grown
            pmax[npairs] = roots[1] if roots[0] == eldest else roots[0]
            psad[npairs] = s
            npairs += 1
        for q in range(nr):
            uf[roots[q]] = eldest
        uf[s] = eldest
    return pmax[:npairs].copy(), psad[:npairs].copy()


_KERNELS = {"py": {"sweep": _sweep, "seg_ids": _seg_ids, "flatten": _flatten, "lowest": _lowest,
                   "regions": _regions, "homology": _homology}}


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


def homology_split_pairs(shape, desc_order, use_numba=None) -> np.ndarray:
    """Saddle-maximum pairs as TTK's default persistence backend (discrete Morse) gives them.

    These are the top-dimensional pairs of the lower-star filtration (the diagram at vertex level is unique):
    by duality, the classes of the sublevel sets are the components of their complement, whose cells are the
    triangles (tetrahedra) above the level, joined through the edges (triangles) above it, and the outside,
    older than every maximum, through the boundary. So a maximum on the boundary makes no pair, and a maximum
    dies where its component of the complement reaches an older one. Returns [k, 2] (maximum vertex, saddle
    vertex) in the order of the saddles in ``desc_order``: one sweep of the vertices (``_homology``), about
    the cost of the merge tree's own.
    """
    nz, ny, nx = shape
    axes = [a for a, m in enumerate((nx, ny, nz)) if m > 1]
    if len(axes) < 2:  # a one-cell-wide grid has no such pairs
        return np.zeros((0, 2), np.int64)
    n = nx * ny * nz
    small = n + 1 < 2**31  # int32 ids and sweep positions halve what the random order reads
    uf = np.full(n + 1, -1, np.int32 if small else np.int64)
    pos = np.empty(n, np.int32 if small else np.int64)
    homology = kernels_for(use_numba)["homology"]
    pmax, psad = homology(np.ascontiguousarray(desc_order, dtype=np.int64), np.array([nx, ny, nz], np.int64),
                          *_star_tables(shape), uf, pos)
    return np.stack([pmax, psad], 1)


def _star_tables(shape):
    """The star of a vertex in the grid's implicit triangulation, for ``_homology``.

    Mirrored in x, that triangulation is Kuhn's: in each cell of the grid, one simplex per order of the axes, the
    path of unit steps from the cell's lower corner to its upper one. Returns (offs, cell_verts, facet_verts,
    facet_cells): the neighbours (di, dj, dk), the vertex itself first; per top cell of the star its vertices
    (indices into offs); per facet through the vertex its other vertices and its two cells, sorted by the
    facet's sorted vertex ids. Those ids are the vertex's id plus fixed deltas, so this order is the same at
    every vertex (deltas that coincide on a narrow grid belong to vertices that never both exist).
    """
    nz, ny, nx = shape
    axes = [a for a, m in enumerate((nx, ny, nz)) if m > 1]
    d = len(axes)
    flat = [a for a in range(3) if a not in axes]  # an axis of size 1: no steps along it
    offs = [(0, 0, 0)] + [tuple(int(x) for x in o) for o in OFFSETS if all(o[a] == 0 for a in flat)]
    index = {o: q for q, o in enumerate(offs)}
    cells = []
    for perm in itertools.permutations(axes):  # one simplex per axis order in each grid cell (mirrored in x)
        for m in range(d + 1):  # the vertex is the cell's m-th: its lower corner is m steps back
            q = [0, 0, 0]
            for a in perm[:m]:
                q[a] -= 1
            verts = []
            for t in range(d + 1):
                if t:
                    q[perm[t - 1]] += 1
                verts.append(index[(-q[0], q[1], q[2])])
            cells.append(verts)
    facets = {}
    for sc, verts in enumerate(cells):
        for drop in verts:
            if drop != 0:
                facets.setdefault(tuple(sorted(v for v in verts if v != drop)), []).append(sc)
    assert all(len(c) == 2 for c in facets.values())  # in the unbounded grid, every facet has two cells
    delta = [o[0] + o[1] * nx + o[2] * nx * ny for o in offs]
    order = sorted(facets, key=lambda f: sorted(delta[v] for v in f))
    facet_verts = [[v for v in f if v != 0] for f in order]
    return (np.array(offs, np.int64), np.array(cells, np.int64), np.array(facet_verts, np.int64),
            np.array([facets[f] for f in order], np.int64))
