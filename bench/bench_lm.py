"""Benchmark: the whole pipeline on a transformer language model of 1e8 parameters, on this machine (issue 20).

    .venv/bin/python bench/bench_lm.py [--work /work/gs-lm] [--size gpt2-small|tiny] [--limit 11G] [--out bench/results]

GPT-2 small (124,439,808 parameters: GPT-2's vocabulary and context, `--model gpt2-small --model-arg vocab=50257
--model-arg context=1024`) on pydoc-text, 4 runs x 10 checkpoints, then fit ae-2d, a 17x17 landscape, topology
and render, each stage a command in its own process under ``GLOBSCOPE_MEMORY_LIMIT`` (12G: half of this 24 GB
machine). For each stage: wall time, peak resident memory (``ru_maxrss`` of the stage's process) and bytes read
from disk (``ru_inblock``; what the page cache served is not counted). ``--size tiny`` runs the same pipeline on a
2-layer GPT in a minute, to check the script.

Training by epochs would take 393 steps per epoch at batch 8, so the runs train on a fixed part of pydoc-text's
training split (``TRAIN_SEQUENCES``, through ``bench/lm_data.py``; the test split is whole) with a checkpoint every
few steps. Every chunk of the landscape is a pass over the study (20 GB), so it decodes 12 points per pass
(``--chunk-points 12``: a 6 GB chunk, 9.0 GiB in the landscape's memory estimate) instead of the default quarter
of the memory (6 points): half the passes. Finished stages are kept in the JSON (with the commit and the memory
limit each ran at) and skipped on a rerun; training and the landscape resume. Peaks are compared with 12e9 bytes
(12 GB; half of this machine's 24.7e9 is 12.3e9), so ``--limit`` is 11G (11.8e9 bytes): the fit sizes its Gram
panel to the limit, and under 12G it peaked at 12.85e9 bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from machine import write_json  # noqa: E402

SIZES = {
    "gpt2-small": dict(model=["--model", "gpt2-small", "--model-arg", "vocab=50257", "--model-arg", "context=1024"],
                       batch=4, every=3, epochs=1, train_sequences=108, eval_samples=4, resolution=17,
                       landscape_eval=2, chunk_points=12),
    "tiny": dict(model=["--model", "gpt", "--model-arg", "layers=2", "--model-arg", "width=64", "--model-arg",
                        "heads=2"], batch=4, every=3, epochs=1, train_sequences=108, eval_samples=16, resolution=9,
                 landscape_eval=8, chunk_points=None),
}
RUNS = 4
WRAPPER = ("import resource, subprocess, sys, time; t = time.time(); r = subprocess.run(sys.argv[1:]); "
           "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
           "print('BENCH', time.time() - t, u.ru_maxrss * 1024, u.ru_inblock * 512, file=sys.stderr); "
           "sys.exit(r.returncode)")


def stage(name, args, env):
    """Run ``globscope ARGS`` in its own process; (seconds, peak bytes, bytes read from disk, last lines)."""
    cmd = [sys.executable, "-c", WRAPPER, sys.executable, "-m", "globscope_core.cli", *map(str, args)]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: globscope {' '.join(map(str, args))}", flush=True)
    commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    bench = [ln for ln in lines if ln.startswith("BENCH ")]
    if r.returncode != 0 or not bench:
        raise SystemExit(f"{name} failed (exit {r.returncode}):\n" + "\n".join(lines[-20:]))
    seconds, peak, read = (float(v) for v in bench[-1].split()[1:])
    tail = [ln for ln in (r.stdout.strip().splitlines() + lines)
            if not ln.startswith("BENCH ") and "%|" not in ln][-12:]
    return {"seconds": round(seconds, 1), "peak_bytes": int(peak), "read_bytes": int(read), "output": tail,
            "commit": commit.stdout.strip() or None, "memory_limit": env["GLOBSCOPE_MEMORY_LIMIT"]}


def write_md(doc: dict, path: str) -> None:
    """The JSON's tables: every stage's time, peak and reads, then the fit's fidelity on the checkpoints it was
    fitted on next to those it was not (held out) and to no map at all (the two neighbours' mean)."""
    lines = [f"`bench/bench_lm.py --size {doc['size']}` ({doc['runs']} runs; 2 CPU cores, no GPU; peaks are "
             "ru_maxrss of each stage's process, reads ru_inblock: what the page cache served is not counted)", "",
             "| stage | seconds | peak GB (1e9) | peak GiB | read GiB | GLOBSCOPE_MEMORY_LIMIT | commit |",
             "|---|---|---|---|---|---|---|"]
    for name, st in doc["stages"].items():
        peak = st["peak_bytes"]
        lines.append(f"| {name} | {st['seconds']:.0f} | {peak / 1e9:.2f} | {peak / 2**30:.2f} | "
                     f"{st['read_bytes'] / 2**30:.2f} | {st.get('memory_limit', '')} | {st.get('commit') or ''} |")
    notes = [f"- {name}: {st['note']}" for name, st in doc["stages"].items() if st.get("note")]
    if notes:
        lines += [""] + notes
    fit = doc["report"].get("fit-ae-2d")
    if fit:
        rec, fn, ho = fit["reconstruction"], fit["function"], fit.get("held_out") or {}
        lines += ["", f"fit ae-2d: {fit['n_checkpoints']} checkpoints x {fit['n_params']:,} parameters, basis "
                  f"{fit['basis_rank']} directions ({fit['basis_mode']}), loss on {fn['eval_samples']} test sequences",
                  "", "| checkpoints | MSE raw | MSE standardized | relative loss gap mean | median | max |",
                  "|---|---|---|---|---|---|",
                  f"| fitted on ({fit['n_checkpoints']}) | {rec['mse_raw']:.2e} | {rec['mse_std']:.2e} | "
                  f"{fn['loss_gap_mean']:.2e} | {fn['loss_gap_median']:.2e} | {fn['loss_gap_max']:.2e} |"]
        if ho:
            two = ho["two_neighbour"]
            lines += [f"| held out ({ho['protocol']['held_out']}; fitted on {ho['protocol']['fitted']}) | "
                      f"{ho['mse_raw']:.2e} | {ho['mse_std']:.2e} | {ho['loss_gap_mean']:.2e} | "
                      f"{ho['loss_gap_median']:.2e} | {ho['loss_gap_max']:.2e} |",
                      f"| held out, no map (two neighbours' mean) | {two['mse_raw']:.2e} | {two['mse_std']:.2e} | "
                      f"{two['loss_gap_mean']:.2e} | {two['loss_gap_median']:.2e} | {two['loss_gap_max']:.2e} |"]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/work/gs-lm")
    ap.add_argument("--size", choices=sorted(SIZES), default="gpt2-small")
    ap.add_argument("--limit", default="11G", help="GLOBSCOPE_MEMORY_LIMIT of every stage")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    cfg = SIZES[a.size]
    study = os.path.join(a.work, a.size)
    os.makedirs(a.work, exist_ok=True)
    env = {**os.environ, "GLOBSCOPE_MEMORY_LIMIT": a.limit, "PYTHONPATH": HERE + os.pathsep
           + os.environ.get("PYTHONPATH", ""), "LM_TRAIN_SEQUENCES": str(cfg["train_sequences"])}
    path = os.path.join(a.out, f"lm-{a.size}.json")
    done = json.load(open(path)).get("stages", {}) if os.path.exists(path) else {}
    train = ["train", "--dataset", "lm_data:pydoc_part", *cfg["model"], "--runs", RUNS, "--epochs", cfg["epochs"],
             "--batch-size", cfg["batch"], "--every", cfg["every"], "--lr", 0.01, "--eval-samples",
             cfg["eval_samples"], "--out", study]
    plan = [
        ("train", train + (["--resume"] if os.path.exists(os.path.join(study, "study.h5")) else [])),
        ("fit", ["fit", study, "--reducer", "ae", "--dim", 2, "--eval-samples", cfg["eval_samples"]]),
        ("landscape", ["landscape", study, "--reducer", "ae-2d", "--resolution", cfg["resolution"],
                       "--eval-samples", cfg["landscape_eval"]]
         + (["--chunk-points", cfg["chunk_points"]] if cfg["chunk_points"] else [])),
        ("topology", ["topology", study]),
        ("render", ["render", study]),
    ]
    for name, args in plan:
        if name in done:
            continue
        done[name] = stage(name, args, env)
        info = json.load(open(os.path.join(study, "report.json"))) if os.path.exists(
            os.path.join(study, "report.json")) else {}
        doc = {"size": a.size, "config": cfg, "runs": RUNS, "study": study,
               "stages": done, "report": {k: info.get(k) for k in ("fit-ae-2d", "landscape-2d") if k in info}}
        write_json(path, doc, default=str)
        write_md(doc, path[: -len(".json")] + ".md")
        d = done[name]
        print(f"  {d['seconds']:.0f} s, peak {d['peak_bytes'] / 2**30:.2f} GiB, read {d['read_bytes'] / 2**30:.2f} GiB",
              flush=True)


if __name__ == "__main__":
    main()
