"""BatchNorm reset on a ResNet-20 study (issue 21, part 4): how barriers, basins and the merge tree change when
every interpolated or decoded model gets BatchNorm statistics recomputed on a fixed training subset instead of
its own (interpolated / decoded) running statistics, and what that costs.

One process, side by side, on one study trained here (real training, no stored numbers):
  1. train  ResNet-20 (BatchNorm after every convolution) on mnist-5k, ``--runs`` runs of ``--epochs`` epochs;
  2. fit    pca-2d and ae-2d (the autoencoder reproduces every checkpoint, statistics included; PCA does not);
  3. for each reducer, landscape with ``--bn decoded`` and with ``--bn recompute`` (same grid, same evaluation
     subset): seconds, points/s, the time spent recomputing, peak memory (ru_maxrss after each), loss range over
     the trusted grid, the loss at the runs' final checkpoints;
  4. topology of each field: merge-tree size, leaves, basins holding runs and which runs share one; the recomputed
     field also at the decoded field's absolute persistence threshold (one threshold for both, as
     ``align --compare-basins`` does);
  5. align (weight matching, ResNet block permutations): line barriers to the reference, before and after
     alignment, with the models' own statistics and recomputed;
  6. connect runs 0 and 1 (Bezier, one bend): line and curve barriers with both.

  OMP_NUM_THREADS=1 python bench/bench_batchnorm.py --work /tmp/bn-bench --out bench/results
  python bench/bench_batchnorm.py --markdown bench/results/batchnorm.json   # the .md again from the .json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import write_json  # noqa: E402

from globscope_core.networks import datasets  # noqa: E402
from globscope_core.reducers import fit_reducer  # noqa: E402
from globscope_core.stages.align import align_study  # noqa: E402
from globscope_core.stages.connect import connect  # noqa: E402
from globscope_core.stages.landscape import compute_landscape  # noqa: E402
from globscope_core.stages.topology import study_topology  # noqa: E402
from globscope_core.stages.train import train_study  # noqa: E402
from globscope_core.storage import study_files  # noqa: E402
from globscope_core.storage.vtk_files import read_vti  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def field_numbers(study_dir: str) -> dict:
    f = read_vti(study_files.landscape_vti(study_dir, 2))
    loss, trusted = f.point_arrays["loss"], f.point_arrays["trusted"] > 0.5
    return {"loss_min_trusted": float(np.nanmin(loss[trusted])), "loss_max_trusted": float(np.nanmax(loss[trusted])),
            "loss_median_trusted": float(np.nanmedian(loss[trusted])), "trusted_fraction": float(trusted.mean())}, loss


def tree_numbers(section: dict) -> dict:
    groups = sorted(sorted(b["runs"]) for b in section["basins"])
    return {"nodes": section["nodes"], "leaves": section["leaves"], "pairs": section["pairs"],
            "pairs_kept": section["pairs_kept"], "threshold": section["threshold"],
            "basins_with_runs": section["n_basins_with_runs"], "runs_by_basin": groups,
            "run_basin_min_loss": [r["basin_minimum_loss"] for r in section["runs"]],
            "run_final_loss_on_grid": [r["final_loss_on_grid"] for r in section["runs"]]}


def markdown(r: dict) -> str:
    """bench/results/batchnorm.md: the tables of one run."""
    st, c = r["study"], r["config"]
    f3 = (lambda v: f"{v:.3g}")  # noqa: E731
    lines = ["# BatchNorm reset on a ResNet-20 study", "",
             f"`python bench/bench_batchnorm.py --runs {c['runs']} --epochs {c['epochs']} --width {c['width']} "
             f"--resolution {c['resolution']} --eval-samples {c['eval_samples']} --bn-samples {c['bn_samples']} "
             f"--connect-epochs {c['connect_epochs']} --barrier-samples {c['barrier_samples']}` "
             f"(OMP_NUM_THREADS=1; {r['machine']['cpu']}, {r['machine']['cpu_count']} cores, shared).", "",
             f"Study: {st['model']} ({st['n_params']:,} parameters, 19 BatchNorm layers) on {st['dataset']}, "
             f"{st['runs']} runs x {st['epochs']} epochs (SGD 0.05, batch 128), {st['checkpoints']} checkpoints; "
             f"final test accuracy {', '.join(f'{a:.3f}' for a in st['final_test_acc'])}, final train loss "
             f"(own statistics) {', '.join(f'{v:.3f}' for v in st['final_train_loss'])}. "
             f"Statistics recomputed on {c['bn_samples']} train samples (seed 3); "
             "barriers are Entezari et al.'s (max rise above the straight interpolation of the ends' losses).", "",
             "## Landscapes and merge trees", "",
             f"{c['resolution']}x{c['resolution']} grid, {c['eval_samples']} test samples, pca-2d and ae-2d; "
             "topology with the default persistence (5% of each field's range) and the recomputed field also at "
             "the decoded field's absolute threshold.", "",
             "'Loss at the runs' finals': the field at the grid vertex of each run's final checkpoint.", "",
             "| reducer | --bn | eval s | recompute s (share) | trusted loss min / median / max | loss at the "
             "runs' finals | leaves | basins with runs (runs) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, land in r["landscape"].items():
        trees = r["topology"][name]
        for bn in ("decoded", "recompute"):
            L, T, b = land[bn], trees[bn], land[bn]["batchnorm"]
            share = f"{b['seconds']:.1f} ({b['fraction_of_evaluation']:.0%})" if "seconds" in b else "-"
            lines.append(f"| {name} | {bn} | {L['eval_seconds']:.1f} | {share} | {f3(L['loss_min_trusted'])} / "
                         f"{f3(L['loss_median_trusted'])} / {f3(L['loss_max_trusted'])} | "
                         f"{', '.join(f3(v) for v in T['run_final_loss_on_grid'])} | {T['leaves']} | "
                         f"{T['basins_with_runs']} ({T['runs_by_basin']}) |")
        T = trees["recompute_at_decoded_threshold"]
        lines.append(f"| {name} | recompute, decoded's threshold | | | | | {T['leaves']} | "
                     f"{T['basins_with_runs']} ({T['runs_by_basin']}) |")
    lines += ["", "Evaluation time with `recompute` over `decoded`: "
              + ", ".join(f"{n} {land['recompute_over_decoded_seconds']}x" for n, land in r["landscape"].items())
              + f" (at {c['eval_samples']} evaluation and {c['bn_samples']} statistics samples; the recomputation "
              "is a train-mode forward over the subset per grid point). Median change of log10 loss over the grid: "
              + ", ".join(f"{n} {land['log10_loss_change']['median']:+.2f} decades" for n, land in r["landscape"].items())
              + ".", "", "## Barriers", "",
              "| path | split | own (interpolated) statistics | recomputed |", "|---|---|---|---|"]
    a = r["align"]
    for run in a["runs"]:
        for key in ("before", "after"):
            lines.append(f"| line run {run['run']} -> run 0, {key} weight matching | train | "
                         f"{run[f'barrier_{key}']:.3f} | {run[f'barrier_{key}_bn_recomputed']:.3f} |")
    lines.append(f"| mean of the lines to run 0, before -> after weight matching | train | "
                 f"{a['mean_barrier_before']:.3f} -> {a['mean_barrier_after']:.3f} | "
                 f"{a['mean_barrier_before_bn_recomputed']:.3f} -> {a['mean_barrier_after_bn_recomputed']:.3f} |")
    k = r["connect"]
    for path in ("line", "curve"):
        for split in ("train", "test"):
            lines.append(f"| connect 0-1 {path} ({k['epochs']} epochs of curve training) | {split} | "
                         f"{k[f'{path}_{split}_loss_barrier_own']:.3f} | {k[f'{path}_{split}_loss_barrier_recomputed']:.3f} |")
    lift = {}
    for n, trees in r["topology"].items():
        ratio = np.asarray(trees["decoded"]["run_final_loss_on_grid"]) / np.asarray(trees["recompute"]["run_final_loss_on_grid"])
        lift[n] = (float(ratio.min()), float(ratio.max()))
    lines += ["", f"Cost: align spent {a['batchnorm']['seconds']:.0f} s of {a['seconds']:.0f} s recomputing, connect "
              f"{k['bn_seconds']:.0f} s of {k['seconds']:.0f} s. Peak memory of the whole run "
              f"{r['peak_rss_mib']:.0f} MiB (ru_maxrss; after each landscape: "
              + ", ".join(f"{n} {land['decoded']['peak_rss_mib_after']:.0f} / {land['recompute']['peak_rss_mib_after']:.0f}"
                          for n, land in r["landscape"].items()) + " MiB decoded / recompute).", "",
              "## Reading", "",
              "- With their own statistics, interpolated and decoded models are judged mostly by the collapse of "
              "their activations (REPAIR): the straight-line barriers with interpolated statistics are several times "
              "the recomputed ones, and a trained curve, low with recomputed statistics (Garipov et al. evaluate "
              "after update_bn), looks like a barrier of its own with interpolated ones.",
              "- In the landscapes the decoded statistics lift the grid's loss at the runs' final models "
              + ", ".join(f"{lo:.0f}-{hi:.0f}x ({n})" for n, (lo, hi) in lift.items())
              + " above the recomputed one (the 'loss at the runs' finals' column), and they change the merge tree: other leaves, and with ae-2d other basins holding the runs. The "
              "recomputed fields put every run's final model in a low basin of its own.",
              f"- Even the trained models' own running statistics lag their weights (momentum 0.1, {st['epochs']} short "
              f"epochs): run 0's train loss is {k['line_train_loss_own'][0]:.3f} with them and "
              f"{k['line_train_loss_recomputed'][0]:.3f} recomputed (connect's line at t = 0).",
              f"- Weight matching (ResNet block permutations only: the residual stream is not permuted) looks "
              f"useless with interpolated statistics (mean barrier {a['mean_barrier_before']:.2f} -> "
              f"{a['mean_barrier_after']:.2f}) and helps with recomputed ones ({a['mean_barrier_before_bn_recomputed']:.2f}"
              f" -> {a['mean_barrier_after_bn_recomputed']:.2f}).",
              f"- Cost: recomputing is a train-mode forward over the {c['bn_samples']} samples per model, so the "
              f"evaluation takes about (bn_samples + eval_samples) / eval_samples as long: "
              f"{(c['bn_samples'] + c['eval_samples']) / c['eval_samples']:.1f}x here, 3x at the landscape's "
              "defaults (2000 and 1024). The machine's 2 cores were shared with other work during the run, so the "
              "seconds are upper bounds and the measured ratios scatter around that.",
              "- Hence `landscape --bn recompute` is the default for BatchNorm networks; `--bn decoded` stays for "
              "speed and for the numbers of earlier versions. A model without BatchNorm is not touched.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", metavar="JSON", help="only write the .md next to this result file")
    ap.add_argument("--work", help="scratch directory (the study is trained here)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--width", type=int, default=16, help="ResNet-20 width (16: the paper's)")
    ap.add_argument("--resolution", type=int, default=15)
    ap.add_argument("--eval-samples", type=int, default=256, help="landscape evaluation subset (test split)")
    ap.add_argument("--bn-samples", type=int, default=2000, help="train samples statistics are recomputed on")
    ap.add_argument("--reducers", default="pca,ae", help="reducer kinds, comma separated")
    ap.add_argument("--connect-epochs", type=int, default=2)
    ap.add_argument("--barrier-samples", type=int, default=1000, help="align/connect evaluation subsets")
    args = ap.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as fh:
            text = markdown(json.load(fh))
        with open(args.markdown[: -len(".json")] + ".md", "w") as fh:
            fh.write(text)
        return 0
    if not args.work:
        ap.error("--work is required")

    out = {"config": {k: v for k, v in vars(args).items() if k != "markdown"}}
    os.makedirs(args.work, exist_ok=True)
    d = os.path.join(args.work, "study")
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(os.path.join(args.work, "aligned"), ignore_errors=True)

    t = time.time()
    study = train_study(d, datasets.make_spec("mnist-5k"), "resnet20", {"width": args.width}, runs=args.runs,
                        epochs=args.epochs, batch_size=128, lrs=[0.05], eval_samples=1000, device="cpu",
                        progress=False)
    fin = study.final_rows()
    out["study"] = {"model": f"resnet20 width {args.width}", "n_params": study.n_params, "dataset": "mnist-5k",
                    "runs": args.runs, "epochs": args.epochs, "checkpoints": study.n_checkpoints,
                    "final_test_acc": [float(study.metrics["test_acc"][r]) for r in fin.values()],
                    "final_train_loss": [float(study.metrics["train_loss"][r]) for r in fin.values()],
                    "train_seconds": round(time.time() - t, 1)}
    print("trained", out["study"], flush=True)

    out["landscape"], out["topology"] = {}, {}
    for kind in args.reducers.split(","):
        name = f"{kind}-2d"
        t = time.time()
        fit_reducer(study, kind, 2)
        land, trees, fields = {"fit_seconds": round(time.time() - t, 1)}, {}, {}
        for bn in ("decoded", "recompute"):
            t = time.time()
            info = compute_landscape(study, name, args.resolution, eval_samples=args.eval_samples, device="cpu",
                                     progress=False, fresh=True, bn=bn, bn_samples=args.bn_samples)
            numbers, fields[bn] = field_numbers(d)
            land[bn] = {"seconds": round(time.time() - t, 2), "eval_seconds": info["eval_seconds"],
                        "points_per_second": info["points_per_second"], "batchnorm": info["batchnorm"],
                        "peak_rss_mib_after": round(peak_mib(), 1), **numbers}
            sec = study_topology(d, dim=2, verbose=False)
            trees[bn] = tree_numbers(sec)
            if bn == "recompute":  # the decoded field's absolute threshold: one threshold for both fields
                sec = study_topology(d, dim=2, verbose=False, relative=False,
                                     persistence=trees["decoded"]["threshold"])
                trees["recompute_at_decoded_threshold"] = tree_numbers(sec)
            print(name, bn, land[bn], trees[bn], flush=True)
        dec, rec = fields["decoded"], fields["recompute"]
        land["recompute_over_decoded_seconds"] = round(land["recompute"]["eval_seconds"]
                                                       / land["decoded"]["eval_seconds"], 2)
        land["log10_loss_change"] = {"median": float(np.nanmedian(np.log10(rec) - np.log10(dec))),
                                     "max_abs": float(np.nanmax(np.abs(np.log10(rec) - np.log10(dec))))}
        out["landscape"][name], out["topology"][name] = land, trees

    t = time.time()
    rep = align_study(d, os.path.join(args.work, "aligned"), alphas=11, eval_samples=args.barrier_samples,
                      bn_samples=args.bn_samples, progress=False, plot=False, device="cpu")
    out["align"] = {"seconds": round(time.time() - t, 1), "batchnorm": rep["batchnorm"],
                    "runs": [{k: v for k, v in r.items() if not k.startswith("loss_")} for r in rep["runs"]],
                    **{k: rep[k] for k in rep if k.startswith("mean_barrier")}}
    print("align", out["align"], flush=True)

    t = time.time()
    r = connect(d, runs=(0, 1), epochs=args.connect_epochs, points=21, eval_samples=args.barrier_samples,
                plane_resolution=0, bn_samples=args.bn_samples, progress=False, device="cpu")
    own = r["batchnorm"]["own_statistics"]
    out["connect"] = {"seconds": round(time.time() - t, 1), "epochs": args.connect_epochs, "points": 21,
                      "bn_seconds": r["batchnorm"]["seconds"],
                      **{f"{path}_{split}_loss_barrier_{how}": s[f"{split}_loss_barrier"]
                         for path in ("line", "curve") for split in ("train", "test")
                         for how, s in (("own", own[f"{path}_summary"]), ("recomputed", r[f"{path}_summary"]))},
                      "line_train_loss_own": own["along"]["line"]["train_loss"],
                      "line_train_loss_recomputed": r["along"]["line"]["train_loss"]}
    print("connect", out["connect"], flush=True)
    out["peak_rss_mib"] = round(peak_mib(), 1)

    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "batchnorm.json"), out)
    with open(os.path.join(args.out, "batchnorm.md"), "w") as fh:
        fh.write(markdown(json.load(open(os.path.join(args.out, "batchnorm.json")))))
    print(f"wrote {os.path.join(args.out, 'batchnorm.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
