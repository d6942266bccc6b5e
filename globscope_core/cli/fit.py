"""``globscope fit`` (one reducer) and ``globscope compare`` (all reducers, the poster's table)."""
from __future__ import annotations

from ..stages.fit import KINDS, compare_study, fit_study, format_table
from ..storage.study_files import compare_png, reducer_file
from .args import csv_of, device, one_of, positive_float, positive_int, seed, study_dir


def _ae_config(args) -> dict:
    cfg = {}
    for key in ("width", "depth", "epochs", "lr", "seed", "residual"):
        v = getattr(args, key, None)
        if v is not None:
            cfg[key] = v
    return cfg


def register(sub):
    p = sub.add_parser("fit", help="fit a reducer (latent space + decoder) on a study's checkpoints")
    p.add_argument("study", type=study_dir, help="study directory")
    p.add_argument("--reducer", default="ae", choices=KINDS, help="reducer kind")
    p.add_argument("--dim", type=int, choices=(2, 3), default=2, help="latent dimension: 2 or 3")
    _add_ae_args(p)
    p.add_argument("--eval-samples", type=positive_int, default=2000, help="samples for the decoded models' loss")
    p.add_argument("--no-eval", action="store_true", help="skip the metrics (fit and save only)")
    _add_holdout_arg(p)
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--max-rank", type=positive_int,
                   help="keep only the K leading basis directions (default: every direction of the span, exact)")
    p.add_argument("--basis", choices=("auto", "memory", "streamed"), default="auto",
                   help="hold the basis V [k, P] in memory, or stream it from the checkpoints (exact too; every "
                        "decode reads the study); auto: in memory when it fits in GLOBSCOPE_BASIS_BYTES (2 GiB) "
                        "and the memory there")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("compare", help="fit every reducer and compare them (table, report.json, PNG)")
    p.add_argument("study", type=study_dir, help="study directory")
    p.add_argument("--dim", type=int, choices=(2, 3), default=2, help="latent dimension: 2 or 3")
    p.add_argument("--reducers", type=csv_of(one_of(*KINDS)), default=list(KINDS),
                   help=f"comma list of reducers (default: {','.join(KINDS)})")
    _add_ae_args(p)
    p.add_argument("--eval-samples", type=positive_int, default=2000, help="samples for the decoded models' loss")
    _add_holdout_arg(p)
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--max-rank", type=positive_int,
                   help="keep only the K leading basis directions (default: every direction of the span, exact)")
    p.set_defaults(func=cmd_compare)


def _add_holdout_arg(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-holdout", action="store_true",
                   help="skip the held-out fidelity (an extra fit on 3/4 of each run's checkpoints, scored on "
                        "the rest); for huge studies")
    g.add_argument("--holdout", action="store_true",
                   help="require the held-out fidelity: refuse a study with no run of 5 or more checkpoints "
                        "(by default such a study is fitted without it, with a note)")


def _holdout(args):
    """True: required; False: off; None (neither option): when the study has checkpoints to hold out."""
    return True if args.holdout else (False if args.no_holdout else None)


def _add_ae_args(p):
    g = p.add_argument_group("autoencoder")
    g.add_argument("--width", type=positive_int, help="hidden width (default 128)")
    g.add_argument("--depth", type=positive_int, help="hidden layers in encoder and decoder (default 2)")
    g.add_argument("--epochs", type=positive_int, help="full-batch epochs (default 1500)")
    g.add_argument("--lr", type=positive_float, help="peak learning rate (default 2e-3)")
    g.add_argument("--seed", type=seed, help="seed (default 0)")
    g.add_argument("--residual", choices=("polyharmonic", "gaussian"),
                   help="interpolant of the residual at the checkpoints (default polyharmonic: phi(r) = r spline)")


def cmd_fit(args):
    cfg = _ae_config(args) if args.reducer == "ae" else ({"seed": args.seed} if args.seed is not None else {})
    if args.max_rank:
        cfg["max_rank"] = args.max_rank
    if args.basis != "auto":
        cfg["basis"] = args.basis
    r, info = fit_study(args.study, args.reducer, args.dim, evaluate=not args.no_eval,
                        eval_samples=args.eval_samples, device=args.device, holdout=_holdout(args), **cfg)
    print(f"{reducer_file(args.study, r.name)}: fitted in {info['fit_seconds']:.1f} s, "
          f"peak memory {info['peak_rss_mb']:.0f} MB")
    if info.get("basis_explained", 1.0) < 1.0 - 1e-9:  # only a truncated basis (--max-rank) leaves variance out
        print(f"  basis: {info['basis_rank']} directions (--max-rank) leave out "
              f"{100 * (1 - info['basis_explained']):.3g}% of the standardized variance: the floor of every error below")
    if "reconstruction" in info:
        rec, fs, st = info["reconstruction"], info["function"], info["structure"]
        print(f"  reconstruction MSE: raw {rec['mse_raw']:.3e}, standardized {rec['mse_std']:.3e}")
        print(f"  decoded loss gap: mean {fs['loss_gap_mean']:.2e}, max {fs['loss_gap_max']:.2e}, "
              f"within 1%: {fs['within_1pct'] * 100:.0f}% of checkpoints")
        print(f"  trustworthiness {st['trustworthiness']:.3f}, continuity {st['continuity']:.3f}, "
              f"distance Spearman {st['distance_spearman']:.3f}, finals apart {st['finals_apart']}")
    ho = info.get("held_out")
    if ho and ho.get("skipped"):
        print(f"  held-out: skipped: {ho['skipped']}")
    elif ho:
        p = ho["protocol"]
        print(f"  held-out ({p['held_out']} of {p['held_out'] + p['fitted']} checkpoints: every 4th of each run, "
              f"never its first two nor its last; fitted on the rest):")
        for name, h in ((info["reducer"], ho), ("two-neighbour", ho["two_neighbour"])):
            print(f"    {name:<14} MSE raw {h['mse_raw']:.3e}, standardized {h['mse_std']:.3e}; loss gap mean "
                  f"{h['loss_gap_mean']:.2e}, median {h['loss_gap_median']:.2e}, max {h['loss_gap_max']:.2e}")


def cmd_compare(args):
    kinds = list(dict.fromkeys(args.reducers))  # checked by the option's type; each once
    rows = compare_study(args.study, args.dim, kinds, eval_samples=args.eval_samples, device=args.device,
                         max_rank=args.max_rank, holdout=_holdout(args), **_ae_config(args))
    print(format_table(rows))
    print(f"saved: {compare_png(args.study, args.dim)}, report.json[compare-{args.dim}d]")
