"""Benchmark: batched landscape evaluation vs a per-point loop, side by side in one run.

    .venv/bin/python bench/bench_landscape.py [--study /tmp/s1] [--device cpu|cuda] [--json out.json]

The study is copied to a temporary directory (never modified) and a PCA reducer is fitted on the copy
(``--reducer ae`` to fit/use an autoencoder instead, when the reducer issue provides it). For each
evaluation subset size both methods decode the same latent grid points and evaluate them:
  * ours:      BatchedEvaluator, ``--batch`` decoded models per forward pass (the landscape's chunks);
  * per-point: decode one point, load it into one model, evaluate_model, next (what peers do).
Timings are best of ``--repeats``, interleaved, so load from other processes hits both alike.
FLOP rate: forward multiply-adds (2 FLOPs each) of the MLP layers; the machine's float32 GEMM rate is
torch.mm of 2048x2048 matrices, measured in the same run (best of before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from globscope_core.batched import BatchedEvaluator, eval_data
from globscope_core.evaluation import evaluate_model, resolve_device
from globscope_core.landscape import encode_checkpoints, grid_bounds
from globscope_core.reducers import fit_reducer, load_reducer
from globscope_core.store import Study


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gemm_rate(dev, n=2048, reps=5) -> float:
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(dev)
        t = time.perf_counter()
        a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def best_time(fn, dev, repeats) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default="/tmp/s1")
    p.add_argument("--reducer", default="pca", help="reducer kind fitted on the copy (pca, ae, ...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=256, help="decoded models per forward pass (ours)")
    p.add_argument("--loop-points", type=int, default=48, help="points timed in the per-point loop")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    dev = resolve_device(args.device)
    tmp = tempfile.mkdtemp(prefix="bench-landscape-")
    try:
        dst = os.path.join(tmp, "study")
        shutil.copytree(args.study, dst)
        study = Study.open(dst)
        fit_reducer(study, args.reducer, 2)
        reducer = load_reducer(study, f"{args.reducer}-2d")
        lo, hi = grid_bounds(encode_checkpoints(study, reducer), 0.2)
        rng = np.random.default_rng(0)
        z = torch.as_tensor(lo + rng.random((args.batch, 2)) * (hi - lo), dtype=torch.float32, device=dev)
        model = study.build_model().to(dev)
        layout = study.layout

        gemm_before = gemm_rate(dev)
        cases = [("train", 64), ("train", 256), ("train", 1024), ("test", None), ("train", None)]
        rows = []
        for split, n in cases:
            x, y = eval_data(study, split, n)
            ev = BatchedEvaluator(study.model_spec, x, y, device=dev, layout=layout)
            xd, yd = x.to(dev), y.to(dev)

            def ours():
                with torch.no_grad():
                    return ev.evaluate(reducer.inverse_transform_torch(z))

            def loop():
                out = []
                for i in range(args.loop_points):
                    with torch.no_grad():
                        vec = reducer.inverse_transform_torch(z[i : i + 1])[0]
                    layout.load_into(model, vec)
                    out.append(evaluate_model(model, xd, yd, device=dev))
                return out

            # same numbers from both methods (the loop is the reference)
            ref = np.array(loop())[:, 0]
            got = ours()[0][: args.loop_points]
            err = float(np.nanmax(np.abs(got - ref) / np.maximum(1e-6, np.abs(ref))))
            t_ours = t_loop = float("inf")
            for _ in range(args.repeats):  # interleaved
                t_loop = min(t_loop, best_time(loop, dev, 1))
                t_ours = min(t_ours, best_time(ours, dev, 1))
            pps_ours, pps_loop = args.batch / t_ours, args.loop_points / t_loop
            flops = ev.flops_per_model
            rows.append({"split": split, "samples": len(x), "ours_points_per_s": round(pps_ours, 1),
                         "loop_points_per_s": round(pps_loop, 1), "speedup": round(pps_ours / pps_loop, 2),
                         "ours_gflops": round(pps_ours * flops / 1e9, 2),
                         "loop_gflops": round(pps_loop * flops / 1e9, 2), "max_rel_diff": err})
        gemm = max(gemm_before, gemm_rate(dev))
        for r in rows:
            r["ours_fraction_of_gemm"] = round(r["ours_gflops"] * 1e9 / gemm, 3)
        peak = {"max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        if dev.type == "cuda":
            peak["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        result = {"study": args.study, "n_params": study.n_params, "device": str(dev),
                  "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                  "threads": torch.get_num_threads(), "batch": args.batch, "reducer": reducer.name,
                  "gemm_gflops": round(gemm / 1e9, 2), "rows": rows, "peak_memory": peak}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{result['study']}: {result['n_params']} params, device {result['device_name']}, "
          f"{result['threads']} threads, GEMM {result['gemm_gflops']} GFLOP/s, {args.batch} models per pass")
    print(f"{'split':>6} {'samples':>7} {'ours pt/s':>10} {'loop pt/s':>10} {'speedup':>8} {'GFLOP/s':>8} "
          f"{'of GEMM':>8} {'max rel diff':>12}")
    for r in rows:
        print(f"{r['split']:>6} {r['samples']:>7} {r['ours_points_per_s']:>10} {r['loop_points_per_s']:>10} "
              f"{r['speedup']:>8} {r['ours_gflops']:>8} {r['ours_fraction_of_gemm']:>8} {r['max_rel_diff']:>12.2e}")
    print(f"peak memory: {peak}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
