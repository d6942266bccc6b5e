"""Benchmark: is the memory estimate every long stage prints what the stage really takes?

    .venv/bin/python bench/bench_memory.py [--work /tmp/gs-memory] [--studies demo,mnist,...] [--stages train,fit,...]
                                           [--fresh] [--out bench/results]

For each study below, every long stage runs as the real command (``globscope train``, ``fit``, ``compare``,
``landscape``, ``connect``, ``align``) in its own process. Each stage prints its estimate when it starts (one line,
``memory: about X expected (...)``); the benchmark reads it and the process's peak resident memory (``ru_maxrss``
of that child, from ``os.wait4``) and writes bench/results/memory.json and memory.md: study, stage, estimate,
measured peak and their ratio, which should lie in [0.8, 1.25].

Studies (short trajectories, small grids and evaluation subsets: the estimate must hold for any size, and the
machine has 2 shared cores): the demo's training (digits MLP 256x256, 6 runs, 10 of its 40 epochs), mnist-mlp on
mnist-5k, ResNet-56, the CIFAR CNN and the 1e7-parameter ViT on synthetic CIFAR-10 files (written as bench_scale.py
writes them), and the 1.7e7-parameter MLP of issue 24 (digits, widths 4096x4096). Finished rows are kept in the JSON;
rerun to fill in missing ones, ``--fresh`` redoes the named studies. ``align`` needs a permutation spec: MLPs only.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
EXE = os.path.join(os.path.dirname(sys.executable), "globscope")
STAGES = ("train", "fit", "compare", "landscape", "connect", "align")

EVAL = ["--eval-samples", "64"]
SMALL_CONNECT = ["--runs", "0", "1", "--epochs", "1", "--points", "5", "--plane-resolution", "5", "--eval-samples",
                 "64", "--plane-eval-samples", "32"]
# name: train arguments, compare's reducers, landscape resolution, whether align applies
STUDIES = {
    "demo": dict(train=["--dataset", "digits", "--model", "mlp", "--runs", "6", "--epochs", "10"],
                 compare="ae,pca,kpca,umap", resolution=17, align=True, label="demo (digits MLP 256x256)"),
    "mnist": dict(train=["--dataset", "mnist-5k", "--model", "mnist-mlp", "--runs", "3", "--epochs", "2",
                         "--every", "20", "--eval-samples", "1000"],
                  compare="ae,pca,kpca,umap", resolution=17, align=True, label="MNIST (mnist-mlp, mnist-5k)"),
    "resnet56": dict(train=["--dataset", "cifar10", "--model", "resnet56", "--runs", "2", "--epochs", "1",
                            "--batch-size", "32", "--every", "2", "--eval-samples", "128"],
                     compare="pca,kpca", resolution=9, align=False, cifar=(10, 256, 128), label="ResNet-56 (CIFAR-10)"),
    "cnn10": dict(train=["--dataset", "cifar10", "--model", "cifar-cnn", "--runs", "2", "--epochs", "1",
                         "--batch-size", "32", "--every", "2", "--eval-samples", "128"],
                  compare="pca,kpca", resolution=9, align=False, cifar=(10, 256, 128), label="CNN-CIFAR10 (cifar-cnn)"),
    "vit": dict(train=["--dataset", "cifar10", "--model", "vit", "--runs", "2", "--epochs", "1", "--batch-size", "32",
                       "--every", "2", "--optimizer", "adam", "--lr", "3e-4", "--eval-samples", "128"],
                compare="pca,kpca", resolution=5, align=False, cifar=(10, 256, 128), label="ViT 1e7 (CIFAR-10)"),
    "mlp17m": dict(train=["--dataset", "digits", "--model", "mlp", "--model-arg", "widths=[4096,4096]", "--runs", "2",
                          "--epochs", "1", "--every", "4", "--eval-samples", "512"],
                   compare="pca,kpca", resolution=5, align=True, label="MLP 1.7e7 (digits, 4096x4096)"),
}
LINE = re.compile(r"memory: about ([\d.]+) (GiB|MiB) expected")


def stage_args(name: str, stage: str, study: str) -> list[str] | None:
    cfg = STUDIES[name]
    cpu = ["--device", "cpu"]
    if stage == "train":
        data = ["--data-dir", os.path.join(os.path.dirname(study), "cifar10")] if "cifar" in cfg else []
        return ["train", *cfg["train"], *data, "--out", study, *cpu]
    if stage == "fit":
        return ["fit", study, "--reducer", "ae", "--epochs", "200", *EVAL, *cpu]
    if stage == "compare":
        return ["compare", study, "--reducers", cfg["compare"], "--epochs", "200", *EVAL, *cpu]
    if stage == "landscape":
        return ["landscape", study, "--reducer", "ae-2d", "--resolution", str(cfg["resolution"]), *EVAL, "--fresh",
                "--no-progress", *cpu]
    if stage == "connect":
        return ["connect", study, *SMALL_CONNECT, *cpu]
    if stage == "align":
        out = study + "-aligned"
        shutil.rmtree(out, ignore_errors=True)
        return ["align", study, "--out", out, *EVAL, "--alphas", "5", *cpu] if cfg["align"] else None
    raise ValueError(stage)


def run_stage(args: list[str]) -> dict:
    """``globscope ARGS`` in a child reaped with os.wait4: (exit status, its ru_maxrss, its output)."""
    import tempfile

    t0 = time.time()
    with tempfile.TemporaryFile("w+") as fe:
        p = subprocess.Popen([EXE, *args], stdout=subprocess.DEVNULL, stderr=fe,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        fe.seek(0)
        err = fe.read()
    m = LINE.search(err)
    est = float(m.group(1)) * (2**30 if m.group(2) == "GiB" else 2**20) if m else None
    line = next((ln.strip() for ln in re.split(r"[\r\n]", err) if ln.strip().startswith("memory: about")), None)
    return {"rc": p.returncode, "peak_bytes": usage.ru_maxrss * 1024, "estimate_bytes": est, "line": line,
            "seconds": round(time.time() - t0, 1), "cmd": "globscope " + " ".join(args),
            "error": None if p.returncode == 0 else (err.strip().splitlines() or [""])[-1][:300]}


def write_data(work: str, cfg: dict) -> None:
    if "cifar" in cfg:
        from bench_scale import write_cifar

        classes, n_train, n_test = cfg["cifar"]
        d = os.path.join(work, f"cifar{classes}")
        if not os.path.exists(os.path.join(d, "test_batch" if classes == 10 else "test")):
            write_cifar(d, classes, n_train, n_test)


def table(results: dict) -> str:
    lines = ["| study | parameters | checkpoints | stage | estimate GB | measured peak GB | estimate / peak | s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        info = r.get("info", {})
        for stage in STAGES:
            s = r.get(stage)
            if not s:
                continue
            if s.get("skipped"):
                lines.append(f"| {STUDIES[name]['label']} | {info.get('n_params', '-'):,} | "
                             f"{info.get('n_checkpoints', '-')} | {stage} | - | - | {s['skipped']} | - |")
                continue
            est, peak = s.get("estimate_bytes"), s["peak_bytes"]
            ratio = f"{est / peak:.2f}" if est else "no estimate printed"
            if est and not 0.8 <= est / peak <= 1.25:
                ratio += " (outside [0.8, 1.25])"
            lines.append(f"| {STUDIES[name]['label']} | {info.get('n_params', 0):,} | {info.get('n_checkpoints', '-')} "
                         f"| {stage} | {est / 1e9 if est else float('nan'):.3f} | {peak / 1e9:.3f} | {ratio} | "
                         f"{s['seconds']:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/gs-memory")
    ap.add_argument("--studies", default=",".join(STUDIES))
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--fresh", action="store_true", help="retrain the named studies and measure them again")
    ap.add_argument("--redo", action="store_true", help="measure the named stages again (the studies are kept)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    path = os.path.join(args.out, "memory.json")
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = {k: v for k, v in json.load(f).get("studies", {}).items() if k in STUDIES}
    stages = [s for s in STAGES if s in args.stages.split(",")]
    t_all = time.time()
    for name in args.studies.split(","):
        cfg = STUDIES[name]
        study = os.path.join(args.work, name)
        r = results.setdefault(name, {})
        if args.fresh:
            results[name] = r = {}
        write_data(args.work, cfg)
        for stage in stages:
            if stage in r and r[stage].get("rc") == 0 and not (args.fresh or args.redo):
                continue
            if stage == "train":
                shutil.rmtree(study, ignore_errors=True)
            a = stage_args(name, stage, study)
            if a is None:
                r[stage] = {"skipped": "no permutation spec for this model (align: MLPs only)"}
                continue
            res = run_stage(a)
            r[stage] = res
            est = res["estimate_bytes"]
            print(f"{name:9s} {stage:9s} rc {res['rc']}  estimate {est / 1e9 if est else float('nan'):.3f} GB  "
                  f"peak {res['peak_bytes'] / 1e9:.3f} GB  ratio {est / res['peak_bytes'] if est else float('nan'):.2f}"
                  f"  {res['seconds']:.0f} s" + (f"  {res['error']}" if res["error"] else ""), flush=True)
            if stage == "train" and res["rc"] == 0:
                from globscope_core.storage.study import Study

                s = Study.open(study)
                r["info"] = {"n_params": s.n_params, "n_checkpoints": s.n_checkpoints}
            _save(args.out, results)
    print(f"done in {time.time() - t_all:.0f} s")
    _save(args.out, results)


def _save(out_dir, results):
    from machine import write_json

    from globscope_core.storage.safe_write import atomic_write_bytes

    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "memory.json"), {"studies": results})
    md = ["# Memory estimates against measured peaks (bench/bench_memory.py)", "",
          "Each stage is the real command in its own process; estimate: the `memory: about ...` line it prints when "
          "it starts; measured peak: that process's peak resident memory (ru_maxrss from os.wait4). GB = 1e9 bytes. "
          "Short trajectories, small grids and evaluation subsets (see the commands in memory.json).", "",
          table(results), ""]
    atomic_write_bytes(os.path.join(out_dir, "memory.md"), "\n".join(md).encode())


if __name__ == "__main__":
    main()
