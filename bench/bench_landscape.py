"""Benchmark: batched landscape evaluation vs a per-point loop, side by side in one run.

    .venv/bin/python bench/bench_landscape.py [--study /tmp/s1] [--device cpu|cuda] [--json out.json]
    .venv/bin/python bench/bench_landscape.py --zoo resnet20,resnet56,cifar-cnn,vit,mnist-mlp [--samples 64]

``--zoo``: the paper's architectures at full size on CIFAR-shaped (MNIST-shaped for the MLP) inputs, with
random states around a fresh model (positive BatchNorm variances); evaluation only, every path of
``evaluation/many_models.py`` against the per-point loop (load the state into one model, ``evaluate_model``), and the
machine's float32 (and bfloat16) GEMM and 3x3-convolution rates, all measured in the same run. FLOPs are
counted by torch.utils.flop_counter (2 per multiply-add). See ``zoo`` below.

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
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

if "--zoo" in sys.argv and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # compile times from a cold cache
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")
import torch  # noqa: E402
from machine import write_json

from globscope_core.evaluation.many_models import BatchedEvaluator, eval_data
from globscope_core.evaluation.one_model import evaluate_model
from globscope_core.networks.device import resolve_device
from globscope_core.networks.models import study_model
from globscope_core.reducers import fit_reducer, load_reducer
from globscope_core.reducers.latent_grid import grid_bounds
from globscope_core.stages.landscape import encode_checkpoints
from globscope_core.storage.study import Study


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gemm_rate(dev, n=2048, reps=5, dtype=torch.float32) -> float:
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
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


def conv_rate(dev, dtype=torch.float32, reps=5) -> float:
    """A ResNet/VGG-like 3x3 convolution, 64 -> 64 channels on 64 32x32 images, channels-last."""
    x = torch.randn(64, 64, 32, 32, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
    f = lambda: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
    f()
    return 2 * 64 * 64 * 9 * 64 * 32 * 32 / best_time(f, dev, reps)


def zoo_case(name, n_models, n, dev):
    """(spec, layout, params [n_models, P], x, y) of a full-size model, random states near a fresh one."""
    from globscope_core.networks.models import build_model, make_spec
    from globscope_core.storage.state_layout import StateLayout

    shape = (1, 28, 28) if "mlp" in name else (3, 32, 32)
    spec = make_spec(name, shape, 10)
    model = build_model(spec).eval()
    layout = StateLayout.from_module(model)
    g = torch.Generator().manual_seed(0)
    base = layout.flatten(model.state_dict())
    params = base + 0.05 * base.abs().mean() * torch.randn(n_models, layout.size, generator=g)
    for e in layout.entries:
        if e.name.endswith("running_var"):
            params[:, e.offset : e.offset + e.numel] = 0.5 + torch.rand(n_models, e.numel, generator=g)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return spec, layout, params.to(dev), x, y


def zoo(args, dev):
    """Every path against the per-point loop, interleaved, best of ``--repeats``; rates in the same run."""
    from globscope_core.networks.models import build_model

    models = {"mnist-mlp": 64, "resnet20": 32, "resnet56": 12, "cifar-cnn": 16, "vit": 4}  # models timed
    peak = {"gemm_fp32": gemm_rate(dev), "conv_fp32": conv_rate(dev)}
    bf16 = dev.type == "cuda" or torch.backends.mkldnn.is_available()
    if bf16:
        peak["gemm_bf16"] = gemm_rate(dev, dtype=torch.bfloat16)
        peak["conv_bf16"] = conv_rate(dev, torch.bfloat16)
    variants = [("vmap", dict(path="vmap")), ("ours", {}), ("compiled", dict(compile=True))]
    if bf16:
        variants += [("bf16", dict(precision="bf16")), ("bf16 compiled", dict(precision="bf16", compile=True))]
    if dev.type == "cuda":
        variants.append(("tf32", dict(precision="tf32")))
    rows = []
    for name in args.zoo.split(","):
        for n in args.samples:
            B = models.get(name, 8) if n <= 64 else max(2, models.get(name, 8) // 4)
            spec, layout, params, x, y = zoo_case(name, B, n, dev)
            model = build_model(spec).to(dev).eval()
            xd, yd = x.to(dev), y.to(dev)

            def loop():
                out = []
                for i in range(B):
                    layout.load_into(model, params[i])
                    out.append(evaluate_model(model, xd, yd, device=dev))
                return np.array(out)[:, 0]

            ref = loop()
            evs, comp = {}, {}
            for tag, kw in variants:
                if kw.get("compile") and "mlp" in name:
                    continue  # the MLP path is not compiled (see BatchedEvaluator)
                if tag == "vmap" and "mlp" in name:
                    kw = dict(path="vmap", fast=False)
                if kw.get("compile"):  # a fresh compilation (torch gives up recompiling a function after 8)
                    torch._dynamo.reset()
                ev = BatchedEvaluator(spec, x, y, device=dev, layout=layout, **kw)
                got = ev.evaluate(params)[0]  # the first call compiles
                comp[tag] = ev.compile_seconds
                evs[tag] = (ev, float(np.max(np.abs(got - ref) / np.abs(ref))))
            t_loop, t = float("inf"), {tag: float("inf") for tag in evs}
            for _ in range(args.repeats):  # interleaved: load from other processes hits all alike
                t_loop = min(t_loop, best_time(loop, dev, 1))
                for tag, (ev, _) in evs.items():
                    t[tag] = min(t[tag], best_time(lambda: ev.evaluate(params), dev, 1))
            flops = evs["ours"][0].flops_per_model
            row = {"model": name, "params": layout.size, "samples": n, "models": B, "gflop_per_model": flops / 1e9,
                   "path": evs["ours"][0].path, "loop_models_per_s": B / t_loop,
                   "loop_fraction_of_gemm": B / t_loop * flops / peak["gemm_fp32"], "variants": {}}
            for tag, (ev, err) in evs.items():
                rate = B / t[tag] * flops
                own = peak["gemm_bf16" if "bf16" in tag else "gemm_fp32"]
                row["variants"][tag] = {"models_per_s": B / t[tag], "vs_loop": t_loop / t[tag],
                                        "gflops": rate / 1e9, "fraction_of_gemm": rate / own,
                                        "fraction_of_conv": rate / peak["conv_bf16" if "bf16" in tag else "conv_fp32"],
                                        "compile_s": comp[tag], "max_rel_diff": err}
            rows.append(row)
            print(f"{name:>10} {n:>4} samples {B:>3} models  loop {row['loop_models_per_s']:7.2f}/s "
                  f"({row['loop_fraction_of_gemm']:.2f} of GEMM)", flush=True)
            for tag, v in row["variants"].items():
                print(f"{'':>16} {tag:>14} {v['models_per_s']:7.2f}/s  x{v['vs_loop']:5.2f} loop  "
                      f"{v['gflops']:7.1f} GFLOP/s  {v['fraction_of_gemm']:.2f} of its GEMM  "
                      f"max rel diff {v['max_rel_diff']:.1e}"
                      + (f"  compile {v['compile_s']:.1f} s" if v["compile_s"] else ""), flush=True)
    peak_after = {"gemm_fp32": gemm_rate(dev), "conv_fp32": conv_rate(dev)}
    mem = {"max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if dev.type == "cuda":
        mem["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "peak_gflops": {k: v / 1e9 for k, v in peak.items()},
            "peak_gflops_after": {k: v / 1e9 for k, v in peak_after.items()}, "rows": rows, "peak_memory": mem}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default="/tmp/s1")
    p.add_argument("--zoo", help="comma-separated registry models: evaluation of every path (see the docstring)")
    p.add_argument("--samples", type=lambda v: [int(s) for s in v.split(",")], default=[64],
                   help="--zoo: evaluation samples, comma-separated (default 64)")
    p.add_argument("--reducer", default="pca", help="reducer kind fitted on the copy (pca, ae, ...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=256, help="decoded models per forward pass (ours)")
    p.add_argument("--path", choices=("mlp", "per-model", "vmap"), help="evaluation path of ours (default: "
                   "the evaluator's choice)")
    p.add_argument("--loop-points", type=int, default=48, help="points timed in the per-point loop")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    dev = resolve_device(args.device)
    if args.zoo:
        result = zoo(args, dev)
        if args.json:
            write_json(args.json, result)
        return 0
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
        model = study_model(study).to(dev)
        layout = study.layout

        gemm_before = gemm_rate(dev)
        cases = [("train", 64), ("train", 256), ("train", 1024), ("test", None), ("train", None)]
        rows = []
        for split, n in cases:
            x, y = eval_data(study, split, n)
            ev = BatchedEvaluator(study.model_spec, x, y, device=dev, layout=layout, path=args.path,
                                  fast=args.path in (None, "mlp"))
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
        result = {"study": args.study, "n_params": study.n_params, "device": str(dev), "path": ev.path,
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
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
