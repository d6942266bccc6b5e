"""Benchmark: the paper's "Computational Requirements" table with GlobScope's numbers.

    .venv/bin/python bench/bench_scale.py [--work /tmp/gs-scale] [--models mnist-mlp,resnet56,cnn10,cnn100,vit]
                                          [--device cpu|cuda] [--out bench/results]

For each model: write small data files in the standard formats (no download here: MNIST IDX files,
CIFAR-10/100 python batches of structured synthetic images: a fixed low-frequency pattern per class
plus noise), train a short-trajectory study (several runs, a checkpoint every optimizer step), then
run each stage in its own subprocess and record its peak resident memory (``ru_maxrss`` of that
process; on a GPU also ``torch.cuda.max_memory_allocated``) and wall time:
  train      ``train_study``
  fit        ``fit_study(kind="ae", dim=2, evaluate=False)``: streamed span basis + autoencoder
  error      reconstruction error of decode(encode(x)), streamed over every checkpoint
  landscape  ``compute_landscape(resolution=R)`` on a small evaluation subset, with trajectories
  landscape-vmap  the same with every model batched under vmap (the CPU's general path before issue 17;
             ``--stages landscape-vmap,landscape`` times both side by side, the table shows ``landscape``)
The table (bench/results/scale.md and scale.json) also gives the estimate of resources.py for each
stage, next to the measured peak, and the relative loss gap of the decoded checkpoints (from the
trajectories file: loss_decoded vs loss_eval on the same subset).

Each row takes minutes on 2 CPU cores; ``--models`` picks rows, finished rows are kept in the JSON
(rerun to fill in the missing ones), and ``--fresh`` retrains.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (registry model, dataset, runs, steps per run, batch, lr, optimizer, eval samples, resolution)
ROWS = {
    "mnist-mlp": dict(model="mnist-mlp", dataset="mnist", runs=5, train=3200, batch=32, optimizer="sgd", lr=0.01,
                      eval_samples=256, resolution=65, paper=("MLP-MNIST", 1.35e5, 0.5)),
    "resnet56": dict(model="resnet56", dataset="cifar10", runs=4, train=1600, batch=32, optimizer="sgd", lr=0.01,
                     eval_samples=32, resolution=33, paper=("ResNet56-CIFAR10", 8.56e5, 3.3)),
    "cnn10": dict(model="cifar-cnn", dataset="cifar10", runs=5, train=3200, batch=32, optimizer="sgd", lr=0.01,
                  eval_samples=16, resolution=65, paper=("CNN-CIFAR10", 4.73e6, 18.0)),
    "cnn100": dict(model="cifar-cnn", dataset="cifar100", runs=3, train=1600, batch=32, optimizer="sgd", lr=0.01,
                   eval_samples=16, resolution=33, paper=("CNN-CIFAR100", 4.91e6, 18.7)),
    "vit": dict(model="vit", dataset="cifar10", runs=4, train=640, batch=32, optimizer="adam", lr=3e-4,
                eval_samples=16, resolution=11, paper=("ViT (paper: next)", 1e7, None)),
}
TEST_SAMPLES = 512


# --- data files in the standard formats -------------------------------------------------------------
def _images(n, classes, shape, seed):
    """uint8 images [n, *shape] and labels: one smooth random pattern per class plus noise."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    coarse = np.random.default_rng(1234).normal(size=(classes, c, 4, 4))
    patterns = np.kron(coarse, np.ones((1, 1, h // 4, w // 4)))  # blocky, class-specific
    y = rng.integers(0, classes, n)
    x = 128 + 40 * patterns[y] + 50 * rng.normal(size=(n, c, h, w))
    return np.clip(x, 0, 255).astype(np.uint8), y


def _write_idx(path, arr):
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    head = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with open(path, "wb") as f:
        f.write(head + arr.tobytes())


def write_mnist(directory, n_train, n_test):
    os.makedirs(directory, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        x, y = _images(n, 10, (1, 28, 28), seed)
        _write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte"), x[:, 0])
        _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte"), y.astype(np.uint8))


def write_cifar(directory, classes, n_train, n_test):
    os.makedirs(directory, exist_ok=True)

    def dump(name, x, y):
        key = b"labels" if classes == 10 else b"fine_labels"
        d = {b"data": x.reshape(len(x), -1), key: [int(v) for v in y], b"batch_label": name.encode()}
        if classes == 100:
            d[b"coarse_labels"] = [int(v) // 5 for v in y]
        with open(os.path.join(directory, name), "wb") as f:
            pickle.dump(d, f, protocol=2)

    x, y = _images(n_train, classes, (3, 32, 32), 1)
    if classes == 10:
        for i, part in enumerate(np.array_split(np.arange(n_train), 5)):
            dump(f"data_batch_{i + 1}", x[part], y[part])
        xt, yt = _images(n_test, classes, (3, 32, 32), 2)
        dump("test_batch", xt, yt)
    else:
        dump("train", x, y)
        xt, yt = _images(n_test, classes, (3, 32, 32), 2)
        dump("test", xt, yt)


# --- one stage in this process (run as a subprocess by the driver) -----------------------------------
def run_stage(stage, cfg, study_dir, data_dir, device, max_chunks=None):
    import torch

    from globscope_core.networks import datasets

    t0 = time.perf_counter()
    out = {}
    if stage == "train":
        from globscope_core.stages.train import train_study

        spec = datasets.make_spec(cfg["dataset"], data_dir)
        steps = cfg["train"] // cfg["batch"]
        s = train_study(study_dir, spec, cfg["model"], runs=cfg["runs"], epochs=1, batch_size=cfg["batch"],
                        optimizers=[cfg["optimizer"]], lrs=[cfg["lr"]], every=1, eval_samples=64, device=device,
                        progress=False, resume=True)
        out.update(n_params=s.n_params, n_checkpoints=s.n_checkpoints, steps_per_run=steps,
                   final_train_loss=float(np.mean([s.metrics["train_loss"][r] for r in s.final_rows().values()])))
    elif stage == "fit":
        from globscope_core.reducers.budget import basis_plan, estimate_fit
        from globscope_core.stages.fit import fit_study
        from globscope_core.storage.study import Study

        s = Study.open(study_dir)
        plan = basis_plan(s.n_params, s.n_checkpoints)
        est = estimate_fit(s.n_params, s.n_checkpoints, streamed=plan.streamed, panel_bytes=plan.panel_bytes)
        r, info = fit_study(study_dir, "ae", 2, evaluate=False, progress=False, device=device)
        out.update(basis_rank=info.get("basis_rank"), basis_explained=info.get("basis_explained"),
                   basis_mode=info.get("basis_mode"),
                   estimate_bytes=int(sum(est.values())), train_mse_std=info.get("train_mse_std"),
                   basis_seconds=info.get("basis_seconds"), reducer_seconds=info.get("reducer_seconds"))
    elif stage == "error":
        from globscope_core.reducers import load_reducer
        from globscope_core.reducers.metrics import reconstruction
        from globscope_core.storage.study import Study

        s = Study.open(study_dir)
        out.update(reconstruction(load_reducer(s, "ae-2d"), s))
    elif stage in ("landscape", "landscape-vmap"):
        import functools

        from globscope_core.stages import landscape
        from globscope_core.stages.landscape import compute_landscape
        from globscope_core.storage.vtk_files import arrays_of, read_any

        if stage == "landscape-vmap":  # the general path before issue 17, for a side-by-side time
            landscape.BatchedEvaluator = functools.partial(landscape.BatchedEvaluator, path="vmap")

        info = compute_landscape(study_dir, "ae-2d", cfg["resolution"], eval_samples=cfg["eval_samples"],
                                 device=device, progress=False, fresh=True, max_chunks=max_chunks)
        if not info.get("complete"):  # a partial grid: memory is per chunk; time is extrapolated
            done = info["points_computed_now"]
            total = cfg["resolution"] ** 2
            out.update(partial=f"{info['chunks_done']} of {info['chunks']} chunks", points=total,
                       eval_samples=info["eval_samples"], estimate_bytes=(info.get("needs") or {}).get("host_bytes"),
                       loss_gap_mean=float("nan"), extrapolated_seconds=(time.perf_counter() - t0) * total / max(1, done))
            out["seconds"] = time.perf_counter() - t0
            out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return out
        traj = arrays_of(read_any(info["trajectories"]))
        gap = np.abs(traj["loss_decoded"] - traj["loss_eval"]) / np.maximum(traj["loss_eval"], 1e-12)
        out.update(points=int(np.prod(info["dims"])), eval_samples=info["eval_samples"],
                   estimate_bytes=(info.get("needs") or {}).get("host_bytes"),
                   points_per_second=info.get("points_per_second"), loss_gap_mean=float(np.nanmean(gap)),
                   loss_gap_max=float(np.nanmax(gap)), nan_count=info.get("nan_count"),
                   evaluation=info.get("evaluation"))
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def stage_subprocess(stage, name, cfg, study_dir, data_dir, device, max_chunks=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--models", name, "--study", study_dir,
           "--data", data_dir, "--device", device] + (["--max-chunks", str(max_chunks)] if max_chunks else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{name} {stage} failed (rc {p.returncode}): " + " | ".join(tail))
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- the table ----------------------------------------------------------------------------------------
def fmt_gb(b):
    return "-" if b is None else f"{b / 1e9:.2f}"


def table(results) -> str:
    lines = [
        "| model | params | checkpoints | basis k (variance kept) | peak fit GB (estimate) | "
        "peak landscape GB (estimate) | grid, eval samples | fit s | landscape s | MSE std | MSE raw | "
        "loss gap | paper peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if not all(k in r for k in ("train", "fit", "error", "landscape")):
            continue
        cfg, fit, land = ROWS[name], r["fit"], r["landscape"]
        p = cfg["paper"]
        gpu = f", GPU {fmt_gb(land['peak_gpu_bytes'])}" if "peak_gpu_bytes" in land else ""
        fit_gpu = f", GPU {fmt_gb(fit['peak_gpu_bytes'])}" if "peak_gpu_bytes" in fit else ""
        kept = fit.get("basis_explained")
        lines.append(
            f"| {p[0]} ({cfg['model']}) | {r['train']['n_params']:.3g} | {r['train']['n_checkpoints']} | "
            f"{fit.get('basis_rank')} ({'-' if kept is None else f'{kept:.7f}'}) | "
            f"{fmt_gb(fit['peak_rss_bytes'])}{fit_gpu} ({fmt_gb(fit.get('estimate_bytes'))}) | "
            f"{fmt_gb(land['peak_rss_bytes'])}{gpu} ({fmt_gb(land.get('estimate_bytes'))}) | "
            f"{cfg['resolution']}x{cfg['resolution']}, {land['eval_samples']} | "
            f"{fit['seconds']:.0f} | " + (f"{land['seconds']:.0f}" if "partial" not in land else
            f"{land['partial']} in {land['seconds']:.0f} (full grid ~{land['extrapolated_seconds']:.0f})") +
            f" | {r['error']['mse_std']:.2e} | "
            f"{r['error']['mse_raw']:.2e} | {land['loss_gap_mean']:.2e} | {'-' if p[2] is None else p[2]} |"
            .replace("| nan |", "| - |"))
    return "\n".join(lines)


def save_stage(jpath, name, stage, value) -> dict:
    """Merge one stage's numbers into the JSON (several benchmark processes may share it)."""
    import fcntl

    with open(jpath + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.load(open(jpath)) if os.path.exists(jpath) else {}
        results.setdefault(name, {})[stage] = value
        tmp = jpath + ".tmp"
        from machine import stamped

        with open(tmp, "w") as f:
            json.dump(stamped(results), f, indent=1)
        os.replace(tmp, jpath)
    return {k: v for k, v in results.items() if k in ROWS}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/gs-scale", help="data files and studies go here")
    ap.add_argument("--models", default=",".join(ROWS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--fresh", action="store_true", help="retrain the studies")
    ap.add_argument("--stages", default="train,fit,error,landscape", help='comma list; "" rewrites scale.md only')
    ap.add_argument("--max-chunks", type=int, help="landscape: stop after this many chunks (peak memory is per "
                    "chunk; the time is extrapolated and the table says so)")
    ap.add_argument("--stage", help="internal: run one stage in this process")
    ap.add_argument("--study")
    ap.add_argument("--data")
    a = ap.parse_args()
    names = [m for m in a.models.split(",") if m]
    unknown = [m for m in names if m not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {list(ROWS)}")

    if a.stage:
        print(json.dumps(run_stage(a.stage, ROWS[names[0]], a.study, a.data, a.device, a.max_chunks)))
        return

    os.makedirs(a.out, exist_ok=True)
    jpath = os.path.join(a.out, "scale.json" if a.device == "cpu" else "scale-cuda.json")
    results = json.load(open(jpath)) if os.path.exists(jpath) else {}
    results = {k: v for k, v in results.items() if k in ROWS}
    stages = [st for st in a.stages.split(",") if st]  # --stages "" only rewrites scale.md
    for name in names if stages else []:
        cfg = ROWS[name]
        data_dir = os.path.join(a.work, "data", cfg["dataset"])
        if cfg["dataset"] == "mnist":
            write_mnist(data_dir, cfg["train"], TEST_SAMPLES)
        else:
            write_cifar(data_dir, 100 if cfg["dataset"] == "cifar100" else 10, cfg["train"], TEST_SAMPLES)
        study_dir = os.path.join(a.work, name)
        if a.fresh and os.path.isdir(study_dir):
            import shutil

            shutil.rmtree(study_dir)
        row = results.setdefault(name, {})
        for stage in stages:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {stage} ...", flush=True)
            row[stage] = stage_subprocess(stage, name, cfg, study_dir, data_dir, a.device, a.max_chunks)
            print(f"    {stage}: {row[stage]['seconds']:.1f} s, peak RSS {fmt_gb(row[stage]['peak_rss_bytes'])} GB",
                  flush=True)
            results = save_stage(jpath, name, stage, row[stage])
    md = ["# Computational requirements (bench/bench_scale.py)", "",
          "Peak memory is the stage process's peak resident set (ru_maxrss, host memory), GB = 1e9 bytes; on a "
          "GPU also the peak of torch.cuda.max_memory_allocated.",
          "Data: synthetic images in the standard file formats written by the benchmark (no download); "
          "short trajectories: one epoch per run, a checkpoint every optimizer step.",
          "Landscape: evaluation subsets and grids as listed (small, to fit 2 shared CPU cores); "
          "loss gap: mean relative loss difference of decoded vs. original checkpoints on that subset.", ""]
    for device, name in (("CPU (--device cpu)", "scale.json"), ("GPU (--device cuda)", "scale-cuda.json")):
        path = os.path.join(a.out, name)
        if os.path.exists(path):
            md += [f"## {device}", "", table({k: v for k, v in json.load(open(path)).items() if k in ROWS}), ""]
    with open(os.path.join(a.out, "scale.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
