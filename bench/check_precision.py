"""Reduced precision against float32 on a study's landscape (issue 17): loss difference and merge tree.

  .venv/bin/python bench/check_precision.py --study STUDY --reducer ae-2d [--precision bf16] [--resolution 65]
                                           [--eval-samples 1024] [--device cpu] [--out bench/results/precision-NAME.json]

The study is copied twice to a temporary directory (never modified). The same landscape (same grid, bounds,
samples) is computed in float32 and in ``--precision`` (timed side by side, one after the other), then the
merge tree of each (study_topology: 5% relative persistence on log_loss, trusted part) is computed. Reports:
the largest and the median relative loss difference (all points, and inside the hull of the checkpoints);
whether the simplified merge trees are the same (nodes, leaves, kept pairs, and the runs grouped into the
same basins), how far the runs' basin minima moved (grid cells), and the largest difference of those basins'
persistence.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", required=True)
    ap.add_argument("--reducer", required=True, help="a fitted reducer of the study (ae-2d, pca-3d, ...)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "tf32"))
    ap.add_argument("--resolution", type=int)
    ap.add_argument("--eval-samples", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="compile both runs (torch.compile)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)

    from globscope_core.stages import topology as topology_stage
    from globscope_core.stages.landscape import compute_landscape
    from globscope_core.storage.vtk_files import read_vti

    tmp = tempfile.mkdtemp(prefix="check-precision-")
    runs = {}
    try:
        for prec in ("fp32", a.precision):
            d = os.path.join(tmp, prec)
            shutil.copytree(a.study, d, ignore=shutil.ignore_patterns(".landscape-*", "landscape-*", "topology*"))
            t = time.perf_counter()
            info = compute_landscape(d, a.reducer, a.resolution, eval_samples=a.eval_samples, device=a.device,
                                     progress=False, precision=prec, compile=a.compile)
            seconds = time.perf_counter() - t
            dim = int(a.reducer.split("-")[-1][0]) if not a.reducer.endswith(".pt") else len(info["bounds"]) // 2
            field = read_vti(os.path.join(d, f"landscape-{dim}d.vti"))
            topo = topology_stage.study_topology(d, dim, verbose=False)
            runs[prec] = {"seconds": round(seconds, 2), "eval_seconds": info["eval_seconds"],
                          "evaluation": info["evaluation"], "field": field, "topology": topo}
        f32, low = runs["fp32"]["field"].point_arrays, runs[a.precision]["field"].point_arrays
        rel = np.abs(low["loss"].astype(np.float64) - f32["loss"]) / np.abs(f32["loss"].astype(np.float64))
        trusted = f32["trusted"] > 0.5
        t32, tlo = runs["fp32"]["topology"], runs[a.precision]["topology"]
        keys = ("nodes", "leaves", "pairs_kept", "n_basins_with_runs")
        # which runs share a basin, and how far each run's basin minimum moved (in grid cells: flat basin
        # bottoms have near-ties that another precision may break differently)
        groups = {p: sorted(sorted(b["runs"]) for b in runs[p]["topology"]["basins"]) for p in runs}
        cell = np.asarray(runs["fp32"]["field"].spacing[:dim])
        pos = {p: np.array([r["basin_minimum_position"] for r in runs[p]["topology"]["runs"]]) for p in runs}
        shift = float(np.max(np.abs(pos["fp32"] - pos[a.precision]) / cell)) if len(pos["fp32"]) else 0.0
        pers = {p: np.array([r["basin_persistence"] or np.inf for r in runs[p]["topology"]["runs"]]) for p in runs}
        finite = np.isfinite(pers["fp32"]) & np.isfinite(pers[a.precision])
        out = {"study": a.study, "reducer": a.reducer, "precision": a.precision, "device": a.device,
               "grid_points": int(rel.size), "eval_samples": a.eval_samples,
               "max_rel_diff": float(np.nanmax(rel)), "median_rel_diff": float(np.nanmedian(rel)),
               "max_rel_diff_trusted": float(np.nanmax(rel[trusted])) if trusted.any() else None,
               "seconds": {p: runs[p]["seconds"] for p in runs},
               "eval_seconds": {p: runs[p]["eval_seconds"] for p in runs},
               "evaluation": {p: runs[p]["evaluation"] for p in runs},
               "merge_tree": {p: {k: runs[p]["topology"].get(k) for k in keys} for p in runs},
               # the same simplified tree: same sizes, and the runs grouped into the same basins
               "merge_tree_same": all(t32.get(k) == tlo.get(k) for k in keys) and groups["fp32"] == groups[a.precision],
               "basins": groups, "basin_minimum_shift_cells": round(shift, 3),
               "basin_persistence_max_abs_diff": float(np.max(np.abs(pers["fp32"][finite] - pers[a.precision][finite])))
               if finite.any() else 0.0}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{a.reducer} {a.precision} vs fp32: max rel loss diff {out['max_rel_diff']:.2e} "
          f"(trusted {out['max_rel_diff_trusted']:.2e}, median {out['median_rel_diff']:.1e}); merge tree "
          f"{'unchanged' if out['merge_tree_same'] else 'CHANGED'}: {out['merge_tree']}, basins {out['basins']}; "
          f"basin minima moved by at most {out['basin_minimum_shift_cells']} grid cells; basin persistence differs "
          f"by at most {out['basin_persistence_max_abs_diff']:.2e}; seconds {out['seconds']}")
    if a.out:
        from machine import write_json

        write_json(a.out, out, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
