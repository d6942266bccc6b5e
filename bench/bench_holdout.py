"""Held-out fidelity benchmark (issue 14): does a map decode checkpoints it was not fitted on?

  .venv/bin/python bench/bench_holdout.py --study DEMO --study MNIST5K --dims 2,3 --out bench/results/holdout

Protocol (reducers/holdout.py, fixed): in every run the checkpoints at positions 3, 7, 11, ... (every 4th,
never the first two nor the last) are held out; each reducer (basis included) is fitted on the rest with its
default seed (0), the held-out checkpoints are encoded and decoded and scored: MSE raw / standardized (by the
fitted rows' spread), relative test-loss gap (mean / median / max) on the fixed evaluation subset (test split,
2000 samples or the whole split if smaller, seed 0). Reference: the mean of each held-out checkpoint's two fitted
trajectory neighbours in weight space. Then each reducer is refitted on every checkpoint for the fitted columns
(nothing is saved: the study directories are only read); ae-gaussian is scored held-out only.

Rows: ae (the default: polyharmonic residual spline), ae-gaussian (the earlier Gaussian-kernel residual,
kernel_ridge 1e-6), pca, kpca, two-neighbour. Checks of the issue's goal (printed, not asserted): held-out
median gap and held-out MSE (raw and standardized) no worse than the two-neighbour reference, mean gap below
twice the reference's, fitted MSE standardized below 1e-8. Results: OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

VARIANTS = [("ae", "ae", {}), ("ae-gaussian", "ae", {"residual": "gaussian"}), ("pca", "pca", {}),
            ("kpca", "kpca", {})]


def run_study(study_dir, dim, eval_samples, variants):
    from globscope_core.reducers.holdout import HeldOutScorer
    from globscope_core.stages.fit import fit_study
    from globscope_core.storage.study import Study

    study = Study.open(study_dir)
    scorer = HeldOutScorer(study, eval_samples=eval_samples)
    rows = []
    for label, kind, cfg in variants:
        t0 = time.perf_counter()
        if label == "ae-gaussian":  # the earlier AE: held-out only (its fitted numbers: bench_reducers.py)
            from globscope_core.reducers.holdout import fit_held_out

            rh = fit_held_out(study, kind, dim, **cfg)
            rows.append({"map": f"{label}-{dim}d", "fit_mse_raw": None, "fit_mse_std": None, "fit_gap_mean": None,
                         "fit_gap_max": None, **{f"ho_{k}": v for k, v in scorer.score_reducer(rh).items()},
                         "ho_fit_seconds": time.perf_counter() - t0, "seconds_total": time.perf_counter() - t0})
            print(f"  {rows[-1]['map']}: done in {rows[-1]['seconds_total']:.0f} s", flush=True)
            continue
        _, info = fit_study(study_dir, kind, dim, progress=False, eval_samples=eval_samples, device="cpu",
                            holdout=True, save=False, scorer=scorer, **cfg)
        ho, rec, fs = info["held_out"], info["reconstruction"], info["function"]
        rows.append({"map": f"{label}-{dim}d", "fit_mse_raw": rec["mse_raw"], "fit_mse_std": rec["mse_std"],
                     "fit_gap_mean": fs["loss_gap_mean"], "fit_gap_max": fs["loss_gap_max"],
                     **{f"ho_{k}": ho[k] for k in ("mse_raw", "mse_std", "loss_gap_mean", "loss_gap_median",
                                                   "loss_gap_max")},
                     "ho_fit_seconds": ho["fit_seconds"], "fit_seconds": info["fit_seconds"],
                     "seconds_total": time.perf_counter() - t0})
        ref = ho["two_neighbour"]
        print(f"  {rows[-1]['map']}: done in {rows[-1]['seconds_total']:.0f} s", flush=True)
    rows.append({"map": "two-neighbour", **{f"ho_{k}": v for k, v in ref.items()}})
    return {"study": study_dir, "dim": dim, "n_checkpoints": study.n_checkpoints, "n_params": study.n_params,
            "runs": len(study.runs), "protocol": scorer.protocol, "rows": rows, "checks": checks(rows)}


def checks(rows):
    ref = rows[-1]
    out = {}
    for r in rows[:-1]:
        if not r["map"].startswith("ae"):
            continue
        out[r["map"]] = {
            "median_gap_vs_ref": r["ho_loss_gap_median"] / ref["ho_loss_gap_median"],
            "mse_raw_vs_ref": r["ho_mse_raw"] / ref["ho_mse_raw"],
            "mse_std_vs_ref": r["ho_mse_std"] / ref["ho_mse_std"],
            "mean_gap_vs_ref": r["ho_loss_gap_mean"] / ref["ho_loss_gap_mean"],
            "fit_mse_std": r["fit_mse_std"] if r["fit_mse_std"] is not None else float("nan")}
        c = out[r["map"]]
        if r["fit_mse_std"] is None:
            c["pass"] = None
            continue
        c["pass"] = bool(c["median_gap_vs_ref"] <= 1 and c["mse_raw_vs_ref"] <= 1 and c["mse_std_vs_ref"] <= 1
                         and c["mean_gap_vs_ref"] < 2 and c["fit_mse_std"] < 1e-8)
    return out


def g(v, spec):
    return "-" if v is None else format(v, spec)


def table(res) -> str:
    lines = [f"{os.path.basename(res['study'].rstrip('/'))}: {res['runs']} runs, {res['n_checkpoints']} checkpoints "
             f"x {res['n_params']:,} parameters, {res['dim']}D; held out {res['protocol']['held_out']}, "
             f"{res['protocol']['eval_samples']} {res['protocol']['split']} samples",
             "",
             "| map | fitted MSE std | fitted loss gap mean / max | held-out MSE raw | held-out MSE std | "
             "held-out loss gap mean / median / max |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        fit_gap = "-" if r.get("fit_gap_mean") is None else f"{r['fit_gap_mean']:.2%} / {r['fit_gap_max']:.1%}"
        lines.append(f"| {r['map']} | {g(r.get('fit_mse_std'), '.1e')} | {fit_gap} | {r['ho_mse_raw']:.2e} | "
                     f"{r['ho_mse_std']:.2e} | {r['ho_loss_gap_mean']:.1%} / {r['ho_loss_gap_median']:.1%} / "
                     f"{r['ho_loss_gap_max']:.1%} |")
    for name, c in res["checks"].items():
        lines.append(f"\n{name} vs two-neighbour: median gap x{c['median_gap_vs_ref']:.3f}, MSE raw "
                     f"x{c['mse_raw_vs_ref']:.3f}, MSE std x{c['mse_std_vs_ref']:.3f}, mean gap "
                     f"x{c['mean_gap_vs_ref']:.3f}, fitted MSE std {c['fit_mse_std']:.1e}: "
                     f"{ {True: 'PASS', False: 'FAIL', None: '(held-out only)'}[c['pass']]}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", action="append", required=True, help="study directory (read only); repeatable")
    ap.add_argument("--dims", default="2,3")
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "holdout"))
    a = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    want = a.variants.split(",")
    variants = [v for v in VARIANTS if v[0] in want]
    results = []
    for dim in [int(d) for d in a.dims.split(",")]:
        for s in a.study:
            print(f"== {s} {dim}D", flush=True)
            results.append(run_study(s, dim, a.eval_samples, variants))
            print(table(results[-1]), flush=True)
            # written after every table: a long run keeps what it has
            from machine import write_json

            from globscope_core.storage.safe_write import atomic_write_bytes

            write_json(a.out + ".json", results, default=float)
            atomic_write_bytes(a.out + ".md", ("\n\n".join(table(r) for r in results) + "\n").encode())


if __name__ == "__main__":
    main()
