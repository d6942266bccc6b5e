"""Trust check of a study's AE landscapes (issue 14, items 3-4): isolated spikes, extrapolation, merge tree.

  .venv/bin/python bench/check_spikes.py --study STUDY_COPY [--dims 2,3] [--out bench/results/spikes-NAME.json]

Fits ae-2d / ae-3d with their defaults (written into the study: pass a copy), evaluates the landscape at
resolution 65 (2D) and 33 (3D) with the default bounds and 1024 test samples, and reports: isolated spikes
(a grid point more than 0.5 decades of loss above all 4 (2D) / 6 (3D) axis neighbours), in the trusted part
and in all; the trusted fraction of the grid; the losses outside the hull of the encoded checkpoints against
the worst stored checkpoint; and the merge tree (5% relative persistence on log_loss) on the trusted part
(the default) and on every point. ``--residual gaussian`` does the same with the earlier AE.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", required=True)
    ap.add_argument("--dims", default="2,3")
    ap.add_argument("--residual", default="polyharmonic")
    ap.add_argument("--out")
    a = ap.parse_args()
    import torch

    from globscope_core.reducers import fit_reducer
    from globscope_core.stages import topology as topology_stage
    from globscope_core.stages.landscape import compute_landscape
    from globscope_core.storage.study import Study

    torch.set_num_threads(2)
    study = Study.open(a.study)
    out = {"study": a.study, "residual": a.residual}
    for dim in [int(d) for d in a.dims.split(",")]:
        t0 = time.perf_counter()
        fit_reducer(study, "ae", dim, residual=a.residual)
        fit_s = time.perf_counter() - t0
        info = compute_landscape(study, f"ae-{dim}d", 65 if dim == 2 else 33, progress=False)
        every = topology_stage.study_topology(a.study, dim, verbose=False, trusted_only=False)
        # the trusted-only run last: its files and report section are what the study keeps
        trusted = topology_stage.study_topology(a.study, dim, verbose=False)
        res = {"resolution": info["resolution"], "bounds": info["bounds"], "fit_seconds": round(fit_s, 1),
               "landscape_seconds": info["seconds"], "loss_min": info["loss_min"], "loss_max": info["loss_max"],
               "nan_count": info["nan_count"], "trusted_fraction": info["trusted_fraction"],
               "spikes": info["spikes"], "extrapolated": info["extrapolated"],
               "merge_tree_trusted": {k: trusted[k] for k in ("leaves", "n_basins_with_runs", "pairs", "threshold")},
               "merge_tree_all": {k: every[k] for k in ("leaves", "n_basins_with_runs", "pairs", "threshold")}}
        out[f"{dim}d"] = res
        print(f"ae-{dim}d ({a.residual}): spikes trusted {res['spikes']['trusted']} / all {res['spikes']['all']}; "
              f"trusted {res['trusted_fraction']:.0%} of the grid; loss max trusted "
              f"{res['extrapolated']['loss_max_trusted']:.3g}, outside {res['extrapolated'].get('loss_max')}, "
              f"{res['extrapolated'].get('above_2x_worst_checkpoint')} untrusted points above 2x the worst checkpoint "
              f"({res['extrapolated']['worst_checkpoint_loss']:.3g}); merge tree leaves trusted "
              f"{res['merge_tree_trusted']['leaves']} vs all {res['merge_tree_all']['leaves']}", flush=True)
        if a.out:
            from machine import write_json

            write_json(a.out, out, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
