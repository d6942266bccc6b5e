"""Does a learned aligner generalize? DEEP-ALIGN trained on ensemble A aligns ensemble B (issue 21, part 3).

Two ensembles of the same digits MLP (the demo's 64-256-256-10 by default) trained from different seeds: A (seeds
0..R-1) and B (seeds from --seed-b). On B's pairs (every run's final model to run 0's), in one process, the
barrier of the straight line (train split) after
  (a) deep-align trained on A only (never saw B), used through ``--aligner`` (make_deep_align's ``aligner``);
  (b) deep-align trained on B itself (in-ensemble), the same number of steps;
  (c) weight matching; (d) no alignment;
with the seconds per pair (``find``) and each aligner's training time. The same on A's pairs, the other way round.

  OMP_NUM_THREADS=1 python bench/bench_align_generalization.py --work /tmp/bench-gen --out bench/results
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import write_json  # noqa: E402

from globscope_core.alignment.methods import make_aligner  # noqa: E402
from globscope_core.alignment.permutation import flat_index, spec_for_model  # noqa: E402
from globscope_core.evaluation.many_models import eval_data  # noqa: E402
from globscope_core.evaluation.paths import barrier, interpolation_curve  # noqa: E402
from globscope_core.networks import datasets  # noqa: E402
from globscope_core.networks.models import study_model  # noqa: E402
from globscope_core.stages.train import train_study  # noqa: E402
from globscope_core.storage.study import Study  # noqa: E402


def ensemble(path: str, runs: int, epochs: int, widths, seed: int) -> Study:
    if os.path.exists(os.path.join(path, "study.h5")):
        return Study.open(path)
    return train_study(path, datasets.make_spec("digits"), "mlp", {"widths": list(widths)}, runs=runs, epochs=epochs,
                       seed=seed, progress=False)


def pairs(st: Study, aligners: dict, eval_samples: int) -> dict:
    """Barrier of every run's final model to run 0's after each method (None: not aligned), seconds per pair."""
    spec = spec_for_model(st.model_spec, st.layout, study_model(st))
    x, y = eval_data(st, "train", eval_samples, seed=1)
    al = np.linspace(0.0, 1.0, 25)
    finals = [st.read_params([st.final_row(r)])[0] for r in range(len(st.runs))]
    states = [st.layout.unflatten(torch.from_numpy(f)) for f in finals]
    out = {}
    for m, aligner in aligners.items():
        bars, times = [], []
        for r in range(1, len(finals)):
            t0 = time.perf_counter()
            perms = aligner.find(states[0], states[r]) if aligner is not None else None
            times.append(time.perf_counter() - t0)
            aligned = finals[r] if perms is None else finals[r][flat_index(spec, st.layout, perms)]
            bars.append(barrier(interpolation_curve(st, aligned, finals[0], al, x, y), al)[0])
        out[m] = {"barrier_mean": float(np.mean(bars)), "barrier_max": float(np.max(bars)), "barriers": bars,
                  "pair_seconds_mean": float(np.mean(times)) if aligner is not None else 0.0}
        print(f"{st.dir} {m}: barrier mean {out[m]['barrier_mean']:.4f} max {out[m]['barrier_max']:.4f}, "
              f"{out[m]['pair_seconds_mean']:.3f} s/pair", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--work", default="/tmp/bench-align-generalization", help="the two ensembles and the aligners")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--widths", default="256,256")
    ap.add_argument("--seed-b", type=int, default=100, help="first seed of ensemble B (A's are 0..runs-1)")
    ap.add_argument("--steps", type=int, default=300, help="deep-align training steps (both aligners)")
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    t0 = time.time()
    a = ensemble(os.path.join(args.work, "A"), args.runs, args.epochs, widths, 0)
    b = ensemble(os.path.join(args.work, "B"), args.runs, args.epochs, widths, args.seed_b)
    train_seconds = round(time.time() - t0, 1)
    files = {n: os.path.join(args.work, f"deep-align-{n}.pt") for n in "AB"}
    trained = {}
    for n, st in (("A", a), ("B", b)):
        if os.path.exists(files[n]):
            os.remove(files[n])  # a fresh training, timed
        spec = spec_for_model(st.model_spec, st.layout, study_model(st))
        trained[n] = make_aligner("deep-align", spec, st, device="cpu", progress=False, aligner_path=files[n],
                                  aligner_steps=args.steps)
        print(f"aligner {n}: {args.steps} steps in {trained[n].provenance['train_seconds_here']:.1f} s", flush=True)
    results = {}
    for n, st, other in (("B", b, "A"), ("A", a, "B")):
        spec = spec_for_model(st.model_spec, st.layout, study_model(st))
        crossed = make_aligner("deep-align", spec, st, device="cpu", aligner=files[other])  # used as it is
        assert crossed.provenance["train_seconds_here"] == 0.0 and not crossed.provenance["in_ensemble"]
        methods = {f"deep-align trained on {other} (never saw {n})": crossed,
                   f"deep-align trained on {n} (in-ensemble)": trained[n],
                   "weight-matching": make_aligner("weight-matching", spec, st), "none": None}
        results[n] = pairs(st, methods, args.eval_samples)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    doc = {"model": f"mlp 64-{'-'.join(map(str, widths))}-10 on digits", "runs": args.runs, "epochs": args.epochs,
           "seeds": {"A": [r.get("seed") for r in a.runs], "B": [r.get("seed") for r in b.runs]},
           "aligner_steps": args.steps, "eval_samples": args.eval_samples, "ensemble_train_seconds": train_seconds,
           "aligner_train_seconds": {n: trained[n].provenance["train_seconds_here"] for n in "AB"},
           "results": results, "peak_rss_gb": round(peak, 3), "threads": args.threads,
           "command": " ".join(sys.argv)}
    write_json(os.path.join(args.out, "align-generalization.json"), doc)
    md = markdown(doc)
    with open(os.path.join(args.out, "align-generalization.md"), "w") as f:
        f.write(md)
    print(md)


def markdown(doc: dict) -> str:
    lines = [f"`{doc['command']}` (peak RSS {doc['peak_rss_gb']} GB, {doc['threads']} thread(s))", "",
             f"{doc['model']}, {doc['runs']} runs x {doc['epochs']} epochs per ensemble; seeds A {doc['seeds']['A']}, "
             f"B {doc['seeds']['B']}; aligners {doc['aligner_steps']} steps (training: A "
             f"{doc['aligner_train_seconds']['A']:.1f} s, B {doc['aligner_train_seconds']['B']:.1f} s); barrier of "
             f"the straight line from each run's final model to run 0's, train loss, {doc['eval_samples']} samples.",
             "", "| pairs of | method | barrier mean | barrier max | s / pair |", "|---|---|---|---|---|"]
    for n, res in doc["results"].items():
        for m, d in res.items():
            lines.append(f"| {n} | {m} | {d['barrier_mean']:.4f} | {d['barrier_max']:.4f} | "
                         f"{d['pair_seconds_mean']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
