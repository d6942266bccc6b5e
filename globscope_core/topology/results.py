"""What a merge tree computation returns: the internal tree of one vertex order, and the result in TTK's
layout (shared/ttk-layout.md). Plain numpy, so ParaView's own Python can hold them."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
