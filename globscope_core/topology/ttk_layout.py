"""TTK's output layout of a merge tree (shared/ttk-layout.md): node and arc arrays, region types, float32
positions as TTK computes them, and the persistence diagram. Filled into a topology.TopologyResult."""
from __future__ import annotations

import numpy as np

from .kernels import kernels_for
from .results import TopologyResult, Tree

VTK_POLY_VERTEX = 2
# CriticalType codes
MINIMUM, SADDLE1, SADDLE2, MAXIMUM, DEGENERATE, REGULAR = 0, 1, 2, 3, 4, 5


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


# TTK's implicit triangulation keeps origin and spacing as float32 and computes a vertex's position as
# origin + spacing * index in float; its build (TTK_ENABLE_CPU_OPTIMIZATION: -march=native) fuses that
# multiply-add, so the result is rounded once: computed here exactly in float64, then rounded to float32.
# Checked against TTK 1.2.0 built here on random origins and spacings (tests/test_topology_ttk.py).
def _fma32(a, b, c):
    """float32 fma(a, b, c): one rounding of the exact a*b + c (exact in float64 for these operands)."""
    return (np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float64)
            + np.asarray(c, np.float32).astype(np.float64)).astype(np.float32)


def vertex_coords(shape, origin, spacing):
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


def fill_tree(res: TopologyResult, t: Tree, g, coords, kind, use_numba):
    nn = len(t.node_vertex)
    has_up = t.node_up >= 0
    arc_down = np.flatnonzero(has_up)  # arcs sorted by (downNodeId, upNodeId): one per non-root node
    arc_up = t.node_up[arc_down]
    arc_of_node = np.full(nn, -1, np.int64)
    arc_of_node[arc_down] = np.arange(len(arc_down))
    seg_by_node = kernels_for(use_numba)["seg_ids"](np.ascontiguousarray(t.node_up, dtype=np.int64), nn)
    seg_arc = seg_by_node[arc_down]  # SegmentationId of each arc (in arc order)

    n_arcs = len(arc_down)
    pos = coords(t.node_vertex)
    span = _distance32(pos[arc_down], pos[arc_up]).astype(np.float64) if n_arcs else np.zeros(0)

    types = _node_types(t, kind)
    rtype = region_types(types[arc_down], types[arc_up]) if n_arcs else np.zeros(0, np.int8)
    # per vertex: the arc whose lower node is vertex_arc_node (the root, alone, has none)
    size, vseg, vtype, vsize, vspan = kernels_for(use_numba)["regions"](
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
    low = kernels_for(use_numba)["lowest"](np.ascontiguousarray(t.node_up, dtype=np.int64))
    ext = t.node_vertex[low[arc_down]]
    pers_of = np.full(len(g), np.inf)
    pers_of[t.pairs[:, 0]] = np.abs(g[t.pairs[:, 1]].astype(np.float64) - g[t.pairs[:, 0]])
    bp = pers_of[ext]
    res.basin_minimum = ext[by_seg] if n_arcs else np.zeros(0, np.int64)
    res.basin_persistence = bp[by_seg] if n_arcs else np.zeros(0)


def fill_diagram(res: TopologyResult, pairs, gmin, gmax, asc_rank, f, dtype, coords, kind, is3d):
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
