"""Named points of a merge tree in TTK's layout: the minimum of a basin and the saddle where two basins join.

A basin is named by the NodeId of its minimum in ``nodes.vtu`` (what ParaView shows for the tree's nodes). In
a join tree each minimum's arcs lead up to the root; two basins join at the first node both paths reach.
numpy only (ParaView's own Python imports it)."""
from __future__ import annotations

import numpy as np

from ..errors import GlobScopeError
from .ttk_layout import MINIMUM


def basin_minima(nodes: dict) -> list[dict]:
    """The minima of a join tree's ``nodes`` point arrays: [{node, vertex, scalar}], lowest first."""
    ids = np.flatnonzero(np.asarray(nodes["CriticalType"]) == MINIMUM)
    out = [{"node": int(nodes["NodeId"][i]), "vertex": int(nodes["VertexId"][i]),
            "scalar": float(nodes["Scalar"][i])} for i in ids]
    return sorted(out, key=lambda m: (m["scalar"], m["node"]))


def _path_up(node: int, up_of: dict) -> list[int]:
    path = [node]
    while path[-1] in up_of:
        path.append(up_of[path[-1]])
        if len(path) > len(up_of) + 1:
            raise GlobScopeError("the tree's arcs contain a cycle")
    return path


def joining_saddle(nodes: dict, arcs: dict, a: int, b: int) -> dict:
    """The node where basins ``a`` and ``b`` (NodeIds of minima) join: {node, vertex, scalar}."""
    minima = {m["node"] for m in basin_minima(nodes)}
    for n in (a, b):
        if n not in minima:
            raise GlobScopeError(f"basin {n} is not a minimum of the tree (basins: {describe(nodes)})")
    if a == b:
        raise GlobScopeError(f"--saddle needs two different basins, got {a} twice")
    up_of = {int(d): int(u) for d, u in zip(arcs["downNodeId"], arcs["upNodeId"])}
    above_a = _path_up(a, up_of)
    above_b = set(_path_up(b, up_of))
    joint = next((n for n in above_a if n in above_b), None)
    if joint is None:
        raise GlobScopeError(f"basins {a} and {b} lie in different trees (the landscape has separate components)")
    i = int(np.flatnonzero(np.asarray(nodes["NodeId"]) == joint)[0])
    return {"node": joint, "vertex": int(nodes["VertexId"][i]), "scalar": float(nodes["Scalar"][i])}


def describe(nodes: dict, limit: int = 12) -> str:
    """'3 (-1.52), 0 (-1.31), ...': the basins by NodeId with their minimum's scalar, lowest first."""
    m = basin_minima(nodes)
    text = ", ".join(f"{x['node']} ({x['scalar']:.4g})" for x in m[:limit])
    return text + (f", and {len(m) - limit} more" if len(m) > limit else "") if m else "none"
