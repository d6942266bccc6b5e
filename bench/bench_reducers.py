"""Reducer benchmark (issue 3): the poster's table on the digits demo study, the targets, and memory
on a wide-MLP study (>= 1e6 parameters) to show that fitting streams the checkpoint matrix.

  .venv/bin/python bench/bench_reducers.py --study /tmp/s1 --work /tmp/bench_reducers [--dims 2,3] [--wide]

The demo study is copied into --work (never modified). Each wide-study fit runs in its own child
process so its peak RSS (ru_maxrss) is its own. Results: printed, and written to WORK/bench_reducers.json.
Targets checked (printed as PASS/FAIL, not asserted): AE raw MSE < 7e-6, AE >= 100x below Kernel PCA in
raw and in standardized units, every decoded checkpoint's loss within 1% of the original's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def demo_table(study_dir, work, dims):
    from globscope_core.stages.fit import compare_study, format_table

    dst = os.path.join(work, "demo")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(study_dir, dst, ignore=shutil.ignore_patterns("reducers", "report.json", "*.png"))
    out = {}
    for dim in dims:
        rows = compare_study(dst, dim, progress=False)
        print(f"\n== demo study {study_dir}, {dim}D ==")
        print(format_table(rows))
        by = {r["reducer"].split("-")[0]: r for r in rows}
        ae, kp = by["ae"], by["kpca"]
        checks = {
            "ae_mse_raw_below_7e-6": ae["mse_raw"] < 7e-6,
            "ae_100x_below_kpca_raw": kp["mse_raw"] / ae["mse_raw"] >= 100,
            "ae_100x_below_kpca_std": kp["mse_std"] / ae["mse_std"] >= 100,
            "ae_every_loss_within_1pct": ae["within_1pct"] == 1.0,
        }
        print(f"kpca/ae ratio: raw {kp['mse_raw'] / ae['mse_raw']:.0f}x, standardized {kp['mse_std'] / ae['mse_std']:.0f}x; "
              f"ae max loss gap {ae['loss_gap_max'] * 100:.3f}%")
        for k, v in checks.items():
            print(f"  {'PASS' if v else 'FAIL'} {k}")
        fit = json.load(open(os.path.join(dst, "report.json")))
        out[f"{dim}d"] = {"rows": rows, "checks": checks,
                          "umap_learn_inverse_mse_std": fit.get(f"fit-umap-{dim}d", {}).get("umap_learn_inverse_mse_std")}
        if out[f"{dim}d"]["umap_learn_inverse_mse_std"] is not None:
            print(f"umap: umap-learn's own inverse_transform (with SGD refinement) on the training embedding: "
                  f"MSE std {out[f'{dim}d']['umap_learn_inverse_mse_std']:.3e}")
    return out


def child(study_dir, mode, block_rows, max_rank):
    """One measurement in a fresh process: prints JSON with peak RSS."""
    import torch

    torch.set_num_threads(1)
    from globscope_core.reducers import fit_reducer
    from globscope_core.reducers.metrics import reconstruction
    from globscope_core.stages.fit import PeakRSS
    from globscope_core.storage.study import Study

    s = Study.open(study_dir)
    t = time.perf_counter()
    mem = PeakRSS().__enter__()
    if mode == "load-all":  # what an in-memory reducer would need at least: the whole matrix
        X = s.read_params()
        res = {"matrix_mb": X.nbytes / 2**20}
    else:
        cfg = {"block_rows": block_rows, "epochs": 600}
        if max_rank:
            cfg["max_rank"] = max_rank
        r = fit_reducer(s, "ae", 2, save=False, **cfg)
        res = {"fit_seconds": time.perf_counter() - t, "basis_rank": r.basis.rank,
               "explained": float(r.basis.explained.sum()), **reconstruction(r, s, block_rows=block_rows)}
    mem.__exit__(None, None, None)
    # sampled RSS: ru_maxrss would include the parent's size at fork time
    res["baseline_rss_mb"], res["peak_rss_mb"] = mem.start / 2**20, mem.peak / 2**20
    print("RESULT " + json.dumps(res))


def wide(work, runs, epochs):
    from globscope_core.networks import datasets
    from globscope_core.stages.train import train_study
    from globscope_core.storage.study import Study
    from globscope_core.storage.study_files import study_h5

    d = os.path.join(work, "wide")
    if not os.path.exists(study_h5(d)):
        train_study(d, datasets.make_spec("digits"), "mlp", {"widths": [1024, 1024]}, runs=runs, epochs=epochs,
                    progress=False)
    s = Study.open(d)
    print(f"\n== wide study: {s.n_checkpoints} checkpoints x {s.n_params} parameters "
          f"({s.n_checkpoints * s.n_params * 4 / 2**20:.0f} MiB as float32) ==")
    out = {"n_checkpoints": s.n_checkpoints, "n_params": s.n_params}
    for name, mode, br, mr in [("load whole matrix", "load-all", 0, 0), ("ae-2d exact basis, 8-row blocks", "fit", 8, 0),
                               ("ae-2d basis truncated to 16, 8-row blocks", "fit", 8, 16)]:
        p = subprocess.run([sys.executable, __file__, "--child", d, mode, str(br), str(mr)], capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            print(p.stderr[-2000:])
            raise SystemExit(f"child failed: {name}")
        res = json.loads(line[0][7:])
        out[name] = res
        print(f"  {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    return out


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]) or None, int(sys.argv[5]) or None)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="/tmp/s1", help="the digits demo study (globscope train --dataset digits ...)")
    ap.add_argument("--work", default="/tmp/bench_reducers")
    ap.add_argument("--dims", default="2,3")
    ap.add_argument("--wide", action="store_true", help="also the wide-MLP memory benchmark")
    ap.add_argument("--wide-runs", type=int, default=4)
    ap.add_argument("--wide-epochs", type=int, default=10)
    ap.add_argument("--skip-demo", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    res = {}
    if not a.skip_demo:
        res["demo"] = demo_table(a.study, a.work, [int(d) for d in a.dims.split(",")])
    if a.wide:
        res["wide"] = wide(a.work, a.wide_runs, a.wide_epochs)
    from machine import write_json

    write_json(os.path.join(a.work, "bench_reducers.json"), res, indent=2,
               default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    print(f"\nwritten {os.path.join(a.work, 'bench_reducers.json')}")


if __name__ == "__main__":
    main()
