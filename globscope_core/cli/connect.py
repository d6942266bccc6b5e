"""``globscope connect``: a low-loss curve between two trained runs (see connect.py)."""
from __future__ import annotations

import argparse

from .args import (
    at_least,
    device,
    nonnegative_float,
    positive_float,
    positive_int,
    seed,
    study_dir,
    zero_or_at_least,
)


def _run_ref(text):
    """N or OTHER_STUDY_DIR:N (the run itself is looked up in the study later)."""
    where, _, num = text.rpartition(":")
    if not num.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not a run (N, or OTHER_STUDY_DIR:N with N >= 0)")
    if where:
        study_dir(where)
    return text


def register(sub):
    p = sub.add_parser("connect", help="train a low-loss curve between the final checkpoints of two runs "
                                       "(Garipov et al. 2018) and draw it in the latent view")
    p.add_argument("study", type=study_dir, help="study directory")
    p.add_argument("--runs", nargs=2, required=True, metavar=("A", "B"), type=_run_ref,
                   help="two runs: N (a run of STUDY) or OTHER_STUDY_DIR:N (same model and data)")
    p.add_argument("--curve", choices=("bezier", "polychain"), default="bezier", help="curve family")
    p.add_argument("--bends", type=positive_int, default=1,
                   help="free bends between the fixed ends (1: the paper's quadratic Bezier / one-bend polychain; "
                        "Garipov et al.'s code counts the ends too: their num_bends=3 is --bends 1)")
    p.add_argument("--epochs", type=positive_int, default=50, help="curve training epochs")
    p.add_argument("--lr", type=positive_float, help="learning rate (default: run A's)")
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), help="default: run A's optimizer")
    p.add_argument("--batch-size", type=positive_int, help="default: run A's batch size")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="weight decay of the curve's training")
    p.add_argument("--points", type=at_least(3), default=61,
                   help="evenly spaced t at which both paths are evaluated")
    p.add_argument("--eval-samples", type=positive_int, default=10000,
                   help="samples for the train/test loss at each point")
    p.add_argument("--reducer", action="append", metavar="NAME",
                   help="reducer for the latent view (e.g. ae-2d; repeatable, one per dimension). Default: the "
                        "reducer of each landscape-{2,3}d.vti, else ae-{2,3}d, else pca-{2,3}d")
    p.add_argument("--refit", action="store_true",
                   help="refit the reducer(s) with the curve and line points included (and recompute the "
                        "landscape and its merge tree where they exist), so the paths are drawn faithfully")
    p.add_argument("--plane-resolution", type=zero_or_at_least(2), default=41,
                   help="grid points per axis of the loss in the plane through A, B and the bend (0: none)")
    p.add_argument("--plane-eval-samples", type=positive_int, default=1024, help="samples for the plane's loss")
    p.add_argument("--bn-samples", type=positive_int, default=2000,
                   help="BatchNorm networks: train samples (a fixed subset) every point's statistics are recomputed "
                        "on; the report also gives the barriers with the points' own, interpolated statistics")
    p.add_argument("--no-line", action="store_true", help="do not store the straight-line points as checkpoints")
    p.add_argument("--seed", type=seed, default=0, help="seed of the curve's training")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_connect)


def cmd_connect(args):
    from ..stages.connect import connect

    r = connect(args.study, runs=args.runs, curve=args.curve, bends=args.bends, epochs=args.epochs, lr=args.lr,
                optimizer=args.optimizer, batch_size=args.batch_size, weight_decay=args.weight_decay,
                points=args.points, eval_samples=args.eval_samples, reducers=args.reducer, refit=args.refit,
                store_line=not args.no_line, seed=args.seed, device=args.device,
                plane_resolution=args.plane_resolution, plane_eval_samples=args.plane_eval_samples,
                bn_samples=args.bn_samples)
    c, line = r["curve_summary"], r["line_summary"]
    print(f"{r['key']}: {r['curve']} with {r['bends']} bend(s), {r['epochs']} epochs, {r['seconds']} s")
    for split in ("train", "test"):
        print(f"  {split} loss barrier: line {line[f'{split}_loss_barrier']:.4f} "
              f"(max {line[f'{split}_loss_max']:.4f}), curve {c[f'{split}_loss_barrier']:.4f} (max {c[f'{split}_loss_max']:.4f})")
    bn = r.get("batchnorm")
    if bn:
        oc, ol = bn["own_statistics"]["curve_summary"], bn["own_statistics"]["line_summary"]
        print(f"  BatchNorm statistics recomputed at every point on {bn['recomputed_on']} ({bn['seconds']} s); "
              f"with the points' own, interpolated statistics the train loss barrier is: line "
              f"{ol['train_loss_barrier']:.4f}, curve {oc['train_loss_barrier']:.4f}")
    if r["barrier_ratio_train"] is not None:
        print(f"  curve/line train barrier ratio: {r['barrier_ratio_train']:.3f}")
    for dim, v in r["latent"].items():
        if v.get("skipped"):
            print(f"  view {dim}: skipped: {v['skipped']}")
            continue
        gap = v.get("curve_landscape_gap")
        gap_txt = f"{gap:.4f}" if gap is not None else "n/a (no landscape)"
        print(f"  view {dim} ({v['reducer']}): mean |true - landscape| loss along the curve {gap_txt}, "
              f"|true - decoded| {v['curve_decoded_gap']:.4f}, landscape barrier on the line "
              f"{_fmt(v.get('line_landscape_barrier'))}, on the curve {_fmt(v.get('curve_landscape_barrier'))} "
              f"-> {v['file']}")
    print(f"  curve run {r['curve_run']}, line run {r['line_run']} of {r['points_file']}; plot {r['plot']}; report.json section {r['key']}")


def _fmt(v):
    return "n/a" if v is None else f"{v:.4f}"
