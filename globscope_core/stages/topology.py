"""Files of the topology stage: TTK's merge tree outputs, and the basins of a study's runs.

``write_topology`` writes a TopologyResult as ``nodes.vtu``, ``arcs.vtu``, ``segmentation.vti`` and
``diagram.vtu`` (TTK's layout, shared/ttk-layout.md). ``topology_of_file`` does a .vti file and
``study_topology`` a study: the simplified join tree of ``landscape-{d}d.vti`` to ``topology-{d}d/``
and, for each run, the basin its final checkpoint lies in (report.json section ``basins-{d}d``).
"""
from __future__ import annotations

import os
import time

import numpy as np

from ..errors import GlobScopeError
from ..storage import study_files, vtk_files
from ..storage.locks import holding
from ..storage.safe_write import file_set
from ..topology.merge_tree import TopologyResult, compute_topology

# Leaf branches with persistence below 5% of the loss range are noise of the evaluation grid; what is
# left is a tree of a handful of basins that reads at a glance (see the report for the numbers).
DEFAULT_PERSISTENCE = 0.05


def write_topology(res: TopologyResult, out_dir: str, field: vtk_files.ImageField | None = None,
                   field_data: dict | None = None) -> list:
    """Write the four TTK outputs of ``res`` to ``out_dir`` as one set (all new, or after a failure all old);
    ``field`` adds the input's other arrays, and its field data (a landscape's study, reducer, ...) goes to
    every output: TTK 1.2.0 keeps it on the segmentation (a shallow copy of the input) and the diagram
    (ttkPersistenceDiagram copies it), and here the nodes and arcs carry it too, beside our own fields."""
    fd = dict(field.field_data if field is not None else {})
    fd.update(field_data or {})
    fd.update({"TreeType": res.tree, "PersistenceThreshold": res.threshold})
    n, a, d = res.nodes, res.arcs, res.diagram
    nz, ny, nx = res.shape
    with file_set(out_dir, study_files.TOPOLOGY_FILES) as tmp:
        paths = study_files.topology_files(tmp)
        vtk_files.write_vtu(paths[0], n["points"], n["cell_types"], n["cells"], n["point_arrays"], field_data=fd)
        vtk_files.write_vtu(paths[1], a["points"], np.full(len(a["cells"]), vtk_files.VTK_LINE), a["cells"],
                            a["point_arrays"], a["cell_arrays"], field_data=fd)
        vtk_files.write_vti(paths[2], vtk_files.ImageField((nx, ny, nz), res.origin, res.spacing,
                                                           segmentation_arrays(res, field), fd, "SegmentationId"))
        vtk_files.write_vtu(paths[3], d["points"], np.full(len(d["cells"]), vtk_files.VTK_LINE), d["cells"],
                            d["point_arrays"], d["cell_arrays"], field_data=fd)
    return study_files.topology_files(out_dir)


def segmentation_arrays(res: TopologyResult, field: vtk_files.ImageField | None = None) -> dict:
    """The point arrays of TTK's segmentation output, in its order: the tree's input arrays, then
    SegmentationId, RegionSize, RegionSpan, RegionType. With a persistence threshold the tree's input is
    TTK's simplification output: the scalar replaced by the simplified one, plus ``<scalar>_Order``."""
    arrays = dict(field.point_arrays) if field is not None else {}
    scalar = res.scalar
    if res.threshold > 0:
        src = arrays.get(scalar)
        dtype = np.asarray(src).dtype if src is not None else res.simplified_values.dtype
        arrays[scalar] = res.simplified_values.ravel().astype(dtype)
        arrays[f"{scalar}_Order"] = res.simplified_order.ravel()
    arrays.update(res.segmentation)
    return arrays


def read_scalar(path: str, scalar: str, f: vtk_files.ImageField | None = None):
    """(ImageField, (nz, ny, nx) values, order or None) of a .vti file (or of ``f``, read from it), with clear errors."""
    f = f or vtk_files.read_vti(path)
    if scalar not in f.point_arrays:
        have = ", ".join(sorted(f.point_arrays)) or "none"
        raise GlobScopeError(f"{path}: no point array '{scalar}' (arrays: {have})")
    values = np.asarray(f.point_arrays[scalar])
    if values.ndim != 1:
        raise GlobScopeError(f"{path}: array '{scalar}' has {values.shape[1]} components, need a scalar")
    nx, ny, nz = f.dims
    order = f.point_arrays.get(f"{scalar}_Order")
    return f, values.reshape(nz, ny, nx), None if order is None else np.asarray(order).reshape(nz, ny, nx)


def topology_of_file(path: str, scalar: str, out_dir: str, persistence: float = 0.0, relative: bool = False,
                     tree: str = "join", nan: str = "error", split_pairs: str = "tree") -> TopologyResult:
    field, values, order = read_scalar(path, scalar)
    try:
        res = compute_topology(values, field.origin, field.spacing, tree=tree, persistence=persistence,
                               relative=relative, order=order, nan=nan, name=scalar, split_pairs=split_pairs)
    except GlobScopeError as exc:
        raise GlobScopeError(f"{path}: {exc}") from None
    except MemoryError:
        raise GlobScopeError(f"{path}: out of memory for a grid of {values.size} points; use a coarser grid") from None
    write_topology(res, out_dir, field, {"source": os.path.abspath(path), "scalar": scalar})
    return res


def summary(res: TopologyResult) -> dict:
    n = res.nodes["point_arrays"]
    return {"tree": res.tree, "grid": list(res.shape[::-1]), "threshold": res.threshold,
            "pairs": int(len(res.pairs)), "pairs_kept": int(len(res.simplified_pairs)),
            "nodes": int(len(n["NodeId"])), "arcs": int(len(res.arcs["cells"])),
            "leaves": int(np.sum(n["CriticalType"] == (0 if res.tree == "join" else 3)))}


# --- basins of a study --------------------------------------------------------------------------
def final_points(path: str) -> tuple:
    """(runs [k], positions [k, 3]) of the final checkpoints: the vertex cells of a trajectories .vtp."""
    if not os.path.exists(path):
        raise GlobScopeError(f"{path}: file does not exist (run `globscope landscape` first)")
    pd = vtk_files.read_any(path)
    arrays = vtk_files.arrays_of(pd)
    if pd is None or pd.GetNumberOfPoints() == 0 or "run" not in arrays:
        raise GlobScopeError(f"{path}: no trajectory points with a 'run' array")
    verts = pd.GetVerts()
    ids = []
    if verts is not None:
        conn = verts.GetConnectivityArray()
        ids = [int(conn.GetValue(i)) for i in range(conn.GetNumberOfValues())]
    if not ids:
        raise GlobScopeError(f"{path}: no vertex cells (the final checkpoints)")
    pos = np.array([pd.GetPoint(i) for i in ids], np.float64)
    return np.asarray(arrays["run"])[ids].astype(int), pos


# its own files, then its inputs: a landscape of this dimension being computed or written is waited for
@holding(lambda a: (a["study_dir"], f"topology-{a['dim']}d"),
         lambda a: (a["study_dir"], f"landscape-{a['dim']}d", {"what": f"topology-{a['dim']}d", "reading": True}))
def study_topology(study_dir: str, dim: int = 2, persistence: float = DEFAULT_PERSISTENCE, relative: bool = True,
                   scalar: str = "log_loss", tree: str = "join", verbose: bool = True,
                   trusted_only: bool = True) -> dict:
    """Simplified merge tree of ``landscape-{dim}d.vti`` and the basin of each run's final checkpoint.

    Writes ``STUDY/topology-{dim}d/`` and the report section ``basins-{dim}d``; returns that section.
    NaN losses (diverged decoded models) are treated as +inf. The default scalar is ``log_loss``
    (falling back to ``loss`` for older files): same tree as ``loss``, but a relative persistence
    threshold means a fraction of the decades the landscape spans, not of its largest loss, which
    far-extrapolated grid corners can make huge. Reported basin losses are always plain losses.
    ``trusted_only`` (default): grid points the landscape marks untrusted (``trusted`` == 0: outside the hull
    of the encoded checkpoints) are set to the trusted part's highest value, a plateau whose minima have zero
    persistence, so no kept minimum, basin or threshold comes from extrapolation.
    """
    from ..storage.safe_write import check_utf8_path
    from ..storage.study import update_report

    check_utf8_path(study_dir, "topology")  # VTK reads and writes the files
    land = study_files.landscape_vti(study_dir, dim)
    traj = study_files.trajectories_vtp(study_dir, dim)
    if not os.path.exists(land):
        raise GlobScopeError(f"{land}: file does not exist (run `globscope landscape` first)")
    t0 = time.perf_counter()
    field = vtk_files.read_vti(land)
    runs, pos = final_points(traj)  # every input read and checked before anything is written
    if scalar == "log_loss" and "log_loss" not in field.point_arrays:
        scalar = "loss"
    field, values, order = read_scalar(land, scalar, field)
    n_nan = int(np.isnan(values).sum()) if values.dtype.kind == "f" else 0
    n_untrusted = 0
    if trusted_only and "trusted" in field.point_arrays:
        keep = np.asarray(field.point_arrays["trusted"]).reshape(values.shape) > 0.5
        n_untrusted = int((~keep).sum())
        top = values[keep & np.isfinite(values)]
        if top.size:
            # a plateau at the trusted part's highest value: its minima have persistence 0 (simplified
            # away) and the relative threshold keeps meaning a fraction of the trusted range
            values, order = np.where(keep, values, top.max()).astype(values.dtype), None
    try:
        res = compute_topology(values, field.origin, field.spacing, tree=tree, persistence=persistence,
                               relative=relative, order=order, nan="inf", name=scalar)
    except GlobScopeError as exc:
        raise GlobScopeError(f"{land}: {exc}") from None
    out_dir = study_files.topology_dir(study_dir, dim)
    write_topology(res, out_dir, field, {"source": os.path.abspath(land), "scalar": scalar})
    nz, ny, nx = res.shape
    ijk = np.rint((pos - np.asarray(res.origin)) / np.asarray(res.spacing)).astype(np.int64)
    outside = ((ijk < 0) | (ijk >= np.array([nx, ny, nz]))).any(1)
    ijk = np.clip(ijk, 0, np.array([nx, ny, nz]) - 1)
    vert = ijk[:, 0] + ijk[:, 1] * nx + ijk[:, 2] * nx * ny
    seg = res.segmentation["SegmentationId"][vert]
    f = np.asarray(field.point_arrays.get("loss", values)).ravel()  # losses, whatever the tree's scalar
    coords = lambda v: (np.asarray(res.origin) + np.array([v % nx, v // nx % ny, v // (nx * ny)]) *  # noqa: E731
                        np.asarray(res.spacing))[:dim].round(6).tolist()
    # a basin is named by its minimum's NodeId in nodes.vtu (what ParaView shows, and `globscope decode --basin`)
    node_of = dict(zip(res.nodes["point_arrays"]["VertexId"].tolist(), res.nodes["point_arrays"]["NodeId"].tolist()))
    per_run = []
    for r, v, s, out in zip(runs, vert, seg, outside):
        m = int(res.basin_minimum[s]) if s >= 0 else int(v)
        p = float(res.basin_persistence[s]) if s >= 0 else float("inf")
        per_run.append({"run": int(r), "segment": int(s), "basin": node_of.get(m), "basin_minimum_vertex": m,
                        "basin_minimum_loss": float(f[m]), "basin_minimum_position": coords(m),
                        "basin_persistence": p if np.isfinite(p) else None,  # None: the global basin
                        "final_loss_on_grid": float(f[v]), "outside_grid": bool(out)})
    basins = {}
    for b in per_run:
        basins.setdefault(b["basin_minimum_vertex"], []).append(b["run"])
    section = dict(summary(res), scalar=scalar, persistence=persistence, relative=relative, nan_values=n_nan,
                   trusted_only=bool(trusted_only), untrusted_points_left_out=n_untrusted,
                   directory=os.path.relpath(out_dir, study_dir), seconds=round(time.perf_counter() - t0, 3),
                   n_basins_with_runs=len(basins), runs=per_run,
                   basins=[{"basin": node_of.get(m), "minimum_vertex": m, "runs": rs} for m, rs in sorted(basins.items())])
    update_report(study_dir, f"basins-{dim}d", section)
    if verbose:
        print(format_basins(section, dim))
    return section


def format_basins(section: dict, dim: int) -> str:
    lines = [f"basins-{dim}d: {section['nodes']} nodes, {section['leaves']} leaves after removing "
             f"{section['pairs'] - section['pairs_kept']} of {section['pairs']} pairs "
             f"({section.get('scalar', 'loss')} persistence <= {section['threshold']:.4g}); runs in {section['n_basins_with_runs']} basin(s)"]
    for b in section["runs"]:
        pers = "global" if b["basin_persistence"] is None else f"{b['basin_persistence']:.4g}"
        name = f"basin {b['basin']}" if b.get("basin") is not None else "the basin"
        lines.append(f"  run {b['run']:3d}: {name} (minimum at vertex {b['basin_minimum_vertex']}, "
                     f"{b['basin_minimum_position']}), min loss {b['basin_minimum_loss']:.4g}, persistence {pers}"
                     + ("  (final checkpoint outside the grid)" if b["outside_grid"] else ""))
    return "\n".join(lines)
