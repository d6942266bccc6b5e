"""Alignment methods side by side: weight matching, activation matching, deep-align, deep-align+wm, the Sinkhorn
re-basin refinements and the loss-guided ones (issues 15 and 21).

For each study, on the same pairs (every run's final model to run 0's), in one process:
  * barrier of the straight line to the reference before and after alignment: mean and max on train samples, mean
    on test samples (the loss-based refinements descend a loss on train samples; on digits that is all of them);
  * fraction of the units recovered on synthetic pairs with a known permutation: each run's final model and a
    randomly permuted copy with Gaussian noise of ``noise`` x each tensor's RMS added;
  * time to align one more pair (``find`` only: deep-align's forward pass + Hungarian, and how much of it is the
    Hungarian; activation matching includes its two activation passes) and deep-align's training time (fresh
    aligner, ``--steps`` steps). torch's and numpy's threads are both pinned to ``--threads``.
The studies are only read: the aligners are written under --work.

  python bench/bench_align.py --study /work/studies/demo --study /work/studies/mnist5k-8 --out bench/results
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import write_json  # noqa: E402

from globscope_core.alignment.deep_align import hungarian, weights_from_state  # noqa: E402
from globscope_core.alignment.methods import make_aligner  # noqa: E402
from globscope_core.alignment.permutation import flat_index, spec_for_model  # noqa: E402
from globscope_core.evaluation.many_models import eval_data  # noqa: E402
from globscope_core.evaluation.paths import barrier, interpolation_curve  # noqa: E402
from globscope_core.networks.batchnorm import BN_SEED, bn_subset, layout_has_bn  # noqa: E402
from globscope_core.networks.datasets import load_dataset  # noqa: E402
from globscope_core.networks.models import study_model  # noqa: E402
from globscope_core.storage.study import Study  # noqa: E402

METHODS = ("weight-matching", "activation-matching", "deep-align", "deep-align+wm", "sinkhorn",
           "weight-matching+sinkhorn", "deep-align+sinkhorn", "weight-matching+loss", "deep-align+loss")
# the Sinkhorn and loss-guided methods work on the loss between the two models (seconds a pair): the
# synthetic-recovery test, which is about matching a permuted copy, is left out for them (the table says so)
NO_SYNTHETIC = ("sinkhorn", "weight-matching+sinkhorn", "deep-align+sinkhorn", "weight-matching+loss",
                "deep-align+loss")


def bench_study(path: str, work: str, steps: int, noises, eval_samples: int, seed: int = 0, methods=METHODS,
                bn_samples: int = 0) -> dict:
    st = Study.open(path)
    spec = spec_for_model(st.model_spec, st.layout, study_model(st))
    name = os.path.basename(os.path.normpath(path))
    aligner_path = os.path.join(work, f"deep-align-{name}.pt")
    if os.path.exists(aligner_path):
        os.remove(aligner_path)  # a fresh training, timed
    x, y = eval_data(st, "train", eval_samples, seed=1)
    xt, yt = eval_data(st, "test", eval_samples, seed=1)  # data no method has seen (the loss-based ones train on x)
    # BatchNorm studies: barriers also with every point's statistics recomputed (the align stage's _bn_recomputed)
    bn_x = None
    if bn_samples and layout_has_bn(st.layout):
        bn_x = bn_subset(load_dataset(st.dataset_spec).train_x, bn_samples, BN_SEED)
    al = np.linspace(0.0, 1.0, 25)
    finals = [st.read_params([st.final_row(r)])[0] for r in range(len(st.runs))]
    states = [st.layout.unflatten(torch.from_numpy(f)) for f in finals]
    res = {"study": path, "model": st.model_spec["name"], "params": int(st.layout.size), "runs": len(st.runs),
           "eval_samples": int(len(x)), "methods": {}}
    before = [barrier(interpolation_curve(st, finals[r], finals[0], al, x, y), al)[0] for r in range(1, len(finals))]
    test = [barrier(interpolation_curve(st, finals[r], finals[0], al, xt, yt), al)[0] for r in range(1, len(finals))]
    res["barrier_before"] = {"mean": float(np.mean(before)), "max": float(np.max(before)), "runs": before,
                             "test_mean": float(np.mean(test))}
    if bn_x is not None:
        res["bn_samples"] = int(len(bn_x))
        before = [barrier(interpolation_curve(st, finals[r], finals[0], al, x, y, bn_x=bn_x), al)[0]
                  for r in range(1, len(finals))]
        res["barrier_before"]["mean_bn_recomputed"] = float(np.mean(before))

    aligners = {}
    for m in methods:
        t0 = time.perf_counter()
        aligners[m] = make_aligner(m, spec, st, seed=seed, device="cpu", progress=True, aligner_path=aligner_path,
                                   aligner_steps=steps)
        setup = time.perf_counter() - t0
        d = res["methods"][m] = {"setup_seconds": round(setup, 2)}
        if m == "deep-align":
            d["train_seconds"] = aligners[m].config.get("train_seconds")
            d["train_steps"] = steps
    rng = np.random.default_rng(seed)
    for m, aligner in aligners.items():
        d = res["methods"][m]
        bars, times, bars_bn, tests, hungarians = [], [], [], [], []
        for r in range(1, len(finals)):
            t0 = time.perf_counter()
            perms = aligner.find(states[0], states[r])
            times.append(time.perf_counter() - t0)
            aligned = finals[r][flat_index(spec, st.layout, perms)]
            bars.append(barrier(interpolation_curve(st, aligned, finals[0], al, x, y), al)[0])
            tests.append(barrier(interpolation_curve(st, aligned, finals[0], al, xt, yt), al)[0])
            if m == "deep-align" and hasattr(aligner, "layers"):  # the MLP aligner: how much of a pair is Hungarian
                hungarians.append(_hungarian_seconds(aligner, states[0], states[r]))
            if bn_x is not None:
                bars_bn.append(barrier(interpolation_curve(st, aligned, finals[0], al, x, y, bn_x=bn_x), al)[0])
        d.update({"barrier_mean": float(np.mean(bars)), "barrier_max": float(np.max(bars)), "barriers": bars,
                  "test_barrier_mean": float(np.mean(tests)), "test_barriers": tests,
                  "pair_seconds_mean": float(np.mean(times)), "pair_seconds": times})
        if hasattr(aligner, "moves"):
            d["moves"] = aligner.moves
        if hungarians:
            d["hungarian_seconds_mean"] = float(np.mean(hungarians))
        if bars_bn:
            d.update({"barrier_mean_bn_recomputed": float(np.mean(bars_bn)), "barriers_bn_recomputed": bars_bn})
        print(f"{name} {m}: barrier mean {d['barrier_mean']:.4f} max {d['barrier_max']:.4f}, "
              f"test {d['test_barrier_mean']:.4f}, "
              + (f"Hungarian {d['hungarian_seconds_mean']:.4f} s/pair, " if hungarians else "")
              + f"{d['pair_seconds_mean']:.3f} s/pair", flush=True)
    # synthetic pairs: the same permuted, noisy copies for every method
    for noise in noises:
        cases = []
        for r in range(len(finals)):
            perms = {p: rng.permutation(n) for p, n in spec.identity(st.layout).items()}
            copy = finals[r][flat_index(spec, st.layout, perms)].copy()
            for e in st.layout.entries:
                if e.name.endswith((".running_mean", ".running_var")):
                    continue  # statistics, not weights (noise made variances negative: NaN activations)
                seg = copy[e.offset : e.offset + e.numel]
                seg += noise * np.sqrt(np.mean(seg.astype(np.float64) ** 2)) * rng.standard_normal(e.numel)
            cases.append((states[r], st.layout.unflatten(torch.from_numpy(copy)), perms))
        for m, aligner in aligners.items():
            if m in NO_SYNTHETIC:
                continue
            fr = []
            for ref, other, perms in cases:
                found = aligner.find(ref, other)
                fr.append(np.mean([np.mean(perms[p][found[p]] == np.arange(len(found[p]))) for p in found]))
            res["methods"][m].setdefault("synthetic_recovered", {})[str(noise)] = float(np.mean(fr))
        print(f"{name} synthetic noise {noise}: " + ", ".join(
            f"{m} {res['methods'][m]['synthetic_recovered'][str(noise)]:.3f}"
            for m in aligners if m not in NO_SYNTHETIC), flush=True)
    wm = res["methods"]["weight-matching"]
    for m in (m for m in methods if m != "weight-matching"):
        d = res["methods"][m]
        d["barrier_mean_vs_wm"] = d["barrier_mean"] / max(wm["barrier_mean"], 1e-12)
        if wm["test_barrier_mean"] > 1e-6:  # on MNIST-5k every aligned midpoint tests better than its ends: 0
            d["test_barrier_mean_vs_wm"] = d["test_barrier_mean"] / wm["test_barrier_mean"]
        d["speedup_vs_wm"] = wm["pair_seconds_mean"] / max(d["pair_seconds_mean"], 1e-12)
    return res


def _hungarian_seconds(aligner, ref_state, other_state) -> float:
    """Seconds of the Hungarian projections alone in one deep-align pair (any aligner returning hard permutations
    solves one assignment per hidden layer)."""
    with torch.no_grad():
        sims = aligner.net.similarities(weights_from_state(ref_state, aligner.layers),
                                        weights_from_state(other_state, aligner.layers))
    t0 = time.perf_counter()
    for s in sims:
        hungarian(s[0])
    return time.perf_counter() - t0


def markdown(results: list) -> str:
    bn = any("bn_samples" in r for r in results)  # a column for barriers with recomputed BatchNorm statistics
    lines = ["| study | method | barrier mean | barrier max | vs WM (mean) | test barrier mean (vs WM) | "
             + ("barrier mean, BN recomputed | " if bn else "") + "s / pair | speed-up vs WM | "
             "synthetic recovered (noise " + " / ".join(results[0]["noises"]) + ") | training s |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if bn else "")]
    for res in results:
        name = os.path.basename(os.path.normpath(res["study"]))
        b = res["barrier_before"]
        bcol = (f" {b['mean_bn_recomputed']:.4f} |" if "mean_bn_recomputed" in b else " |") if bn else ""
        lines.append(f"| {name} | none (raw) | {b['mean']:.4f} | {b['max']:.4f} | | {b['test_mean']:.4f} |{bcol}"
                     " | | | |")
        for m, d in res["methods"].items():
            rec = " / ".join(f"{d['synthetic_recovered'][n]:.3f}" for n in res["noises"]) \
                if "synthetic_recovered" in d else "not measured"
            bcol = (f" {d['barrier_mean_bn_recomputed']:.4f} |" if "barrier_mean_bn_recomputed" in d else " |") \
                if bn else ""
            vs = f" ({d['test_barrier_mean_vs_wm']:.2f})" if "test_barrier_mean_vs_wm" in d else ""
            lines.append(f"| {name} | {m} | {d['barrier_mean']:.4f} | {d['barrier_max']:.4f} | "
                         f"{d.get('barrier_mean_vs_wm', 1.0):.2f} | {d['test_barrier_mean']:.4f}{vs} |{bcol} "
                         f"{d['pair_seconds_mean']:.4f} | "
                         f"{d.get('speedup_vs_wm', 1.0):.1f} | {rec} | {d.get('train_seconds', '') or ''} |")
    floors = [f"{os.path.basename(os.path.normpath(r['study']))}: {1000 * d['hungarian_seconds_mean']:.1f} ms of "
              f"deep-align's {1000 * d['pair_seconds_mean']:.1f} ms a pair are its Hungarian projections "
              f"(weight matching: {1000 * r['methods']['weight-matching']['pair_seconds_mean']:.1f} ms)"
              for r in results for m, d in r["methods"].items() if "hungarian_seconds_mean" in d]
    return "\n".join(lines) + "\n" + ("\n" + "; ".join(floors) + ".\n" if floors else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", action="append", required=True)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--work", default="/tmp/bench-align", help="where the trained aligners go (the studies are only read)")
    ap.add_argument("--steps", type=int, default=300, help="deep-align training steps")
    ap.add_argument("--noise", default="0,0.1,0.5", help="relative noise levels of the synthetic pairs")
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list (weight-matching is always run)")
    ap.add_argument("--bn-samples", type=int, default=0,
                    help="BatchNorm studies: barriers also with statistics recomputed on this many train samples")
    ap.add_argument("--name", default="align", help="result files OUT/NAME.json and OUT/NAME.md")
    ap.add_argument("--note", default="", help="a line on the conditions (e.g. a shared machine), kept in both files")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # numpy's BLAS too (weight matching's products): its default threads, on a shared machine, made weight matching
    # 10x slower than on one thread and its speed-ups here too flattering
    threadpool_limits(args.threads)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    noises = [float(v) for v in args.noise.split(",")]
    methods = ["weight-matching"] + [m for m in args.methods.split(",") if m and m != "weight-matching"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    results = []
    for s in args.study:
        res = bench_study(s, args.work, args.steps, noises, args.eval_samples, methods=methods,
                          bn_samples=args.bn_samples)
        res["noises"] = [str(n) for n in noises]
        results.append(res)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    doc = {"results": results, "peak_rss_gb": round(peak, 3), "threads": args.threads,
           "command": " ".join(sys.argv), **({"note": args.note} if args.note else {})}
    write_json(os.path.join(args.out, f"{args.name}.json"), doc)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(f"`{doc['command']}` (peak RSS {doc['peak_rss_gb']} GB, {args.threads} thread(s))\n\n")
        if args.note:
            f.write(f"{args.note}\n\n")
        f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
