"""Merge trees, persistence and basins of scalar fields on regular 2D/3D grids, in TTK's output layout.

numpy only (numba when importable): ParaView's own Python imports this package (the plugin's engine), so
nothing here may import torch, h5py or pip's vtk.

- ``merge_tree``: the API (``compute_topology``), the tree of one vertex order and persistence simplification
- ``kernels``: the sweeps on TTK's implicit triangulation (numba-compiled or pure Python) and homology pairs
- ``ttk_layout``: nodes, arcs, segmentation and diagram arrays exactly as TTK 1.2.0 writes them
- ``results``: the dataclasses the others fill
"""
from .kernels import OFFSETS, homology_split_pairs, neighbour_edges, numba_available
from .merge_tree import (
           BYTES_PER_POINT,
           as_grid,
           check_memory,
           compute_topology,
           merge_tree,
           simplify_order,
           vertex_order,
)
from .results import TopologyResult, Tree
from .ttk_layout import DEGENERATE, MAXIMUM, MINIMUM, REGULAR, SADDLE1, SADDLE2, VTK_POLY_VERTEX, region_types

__all__ = ["BYTES_PER_POINT", "DEGENERATE", "MAXIMUM", "MINIMUM", "OFFSETS", "REGULAR", "SADDLE1", "SADDLE2",
           "VTK_POLY_VERTEX", "TopologyResult", "Tree", "as_grid", "check_memory", "compute_topology",
           "homology_split_pairs", "merge_tree", "neighbour_edges", "numba_available", "region_types",
           "simplify_order", "vertex_order"]
