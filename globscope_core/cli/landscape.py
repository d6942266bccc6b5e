"""``globscope landscape STUDY --reducer ae-2d --resolution 65``: the loss field on a latent grid.

Also runs under ``torchrun --nproc-per-node N -m globscope_core.cli landscape ...`` (chunks shared out).
"""
from __future__ import annotations

import argparse

from .args import at_least, bounds, device, nonnegative_float, nonnegative_int, positive_int, study_dir


def register(sub):
    p = sub.add_parser("landscape", help="evaluate the loss on a latent grid; write landscape-Xd.vti and trajectories-Xd.vtp")
    p.add_argument("study", type=study_dir, help="study directory")
    p.add_argument("--reducer", required=True, help="fitted reducer name (ae-2d, pca-3d, ...) or a .pt path")
    p.add_argument("--resolution", type=at_least(2), help="grid points per axis (default 65 in 2D, 33 in 3D)")
    p.add_argument("--split", choices=("train", "test"), default="test", help="data split to evaluate on")
    p.add_argument("--eval-samples", type=nonnegative_int, default=1024,
                   help="evaluation subset size (0 = the whole split)")
    p.add_argument("--margin", type=nonnegative_float, default=0.05,
                   help="grid bounds: box around the encoded checkpoints (their hull) widened by this fraction of "
                        "its extent; points outside the hull are marked untrusted (arrays extrapolation, trusted)")
    p.add_argument("--beyond-hull", choices=("clamp", "extrapolate"), default="clamp",
                   help="grid points outside the hull of the encoded checkpoints: evaluated at the hull boundary "
                        "(clamp, default: the decoder stays where it was fitted) or decoded where they are")
    p.add_argument("--bounds", type=bounds, help="explicit bounds lo,hi per axis (overrides --margin)")
    p.add_argument("--chunk-points", type=positive_int,
                   help="grid points per chunk (one batch of decoded models; default: ~256 MiB of parameters)")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32",
                   help="evaluation precision: fp32 (default); bf16 (CPUs with AMX/AVX-512-BF16, GPUs; CNNs and "
                        "ViT 2-3.4x faster on an AMX CPU, loss within a few 1e-3 relative, see README) or tf32 "
                        "(CUDA only)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (CNNs on the CPU: 1.2-1.3x faster, after 10-25 s of "
                        "compilation, so for large grids; needs a C++ compiler on the CPU; MLPs keep their path)")
    p.add_argument("--bn", choices=("decoded", "recompute"), default=None,
                   help="BatchNorm networks: recompute (default) re-estimates each decoded model's running statistics "
                        "on a fixed train subset before evaluating it (a train-mode forward over --bn-samples per grid "
                        "point: 3x the time at the default sizes); decoded evaluates the decoded statistics (faster, "
                        "but mixed statistics collapse the activations). Resuming: the unfinished landscape's setting")
    p.add_argument("--bn-samples", type=positive_int, default=None,
                   help="train samples (fixed subset) for --bn recompute (default 2000)")
    p.add_argument("--fresh", action="store_true", help="discard unfinished results instead of resuming")
    p.add_argument("--max-chunks", type=nonnegative_int, help=argparse.SUPPRESS)  # stop early: tests of resume
    p.add_argument("--no-trajectories", action="store_true", help="do not write trajectories-Xd.vtp")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_landscape)


def cmd_landscape(args):
    import os

    from ..stages.landscape import compute_landscape

    if args.precision == "bf16" and int(os.environ.get("RANK", "0")) == 0:  # said once, by rank 0
        _warn_bf16_cpu(args.device)
    info = compute_landscape(args.study, args.reducer, args.resolution, split=args.split,
                             eval_samples=args.eval_samples or None, margin=args.margin, bounds=args.bounds,
                             device=args.device, progress=not args.no_progress, chunk_points=args.chunk_points,
                             fresh=args.fresh, max_chunks=args.max_chunks, trajectories=not args.no_trajectories,
                             beyond_hull=args.beyond_hull, precision=args.precision, compile=args.compile,
                             bn=args.bn, bn_samples=args.bn_samples)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if not info.get("complete"):
        print(f"{args.study}: stopped after {info['chunks_done']} of {info['chunks']} chunks; "
              f"rerun the same command to resume ({info['partial']})")
        return 0
    rate, ev = info.get("points_per_second"), info.get("evaluation", {})
    how = ", ".join([ev.get("path", "?"), ev.get("precision", "fp32")]
                    + ([f"compiled in {ev['compile_seconds']} s"] if ev.get("compile_seconds") else []))
    speed = "" if not rate else f", {rate:.0f} points/s ({how})" if rate >= 10 else f", {rate:.2g} points/s ({how})"
    print(f"{info['vti']}: {info['dims'][0]}^{len(info['bounds']) // 2} points, loss "
          f"{info['loss_min']} .. {info['loss_max']}, {info['nan_count']} NaN, "
          f"{info['eval_samples']} {info['split']} samples" + speed)
    bn = info.get("batchnorm") or {}
    if bn.get("note"):
        print(f"  {bn['note']}")
    elif bn.get("setting") == "recompute":
        share = bn.get("fraction_of_evaluation")
        print(f"  BatchNorm statistics recomputed for every decoded model on {bn['samples']} train samples: "
              f"{bn['seconds']:.1f} s" + (f", {share * 100:.0f}% of the evaluation time" if share is not None else ""))
    elif bn.get("setting") == "decoded":
        print(f"  BatchNorm: decoded running statistics as they are ({bn['layers']} layers; --bn recompute "
              "re-estimates them per decoded model)")
    if info["nan_count"]:
        print(f"  warning: {info['nan_count']} grid points gave a non-finite loss (kept as NaN)")
    ex, sp = info.get("extrapolated", {}), info.get("spikes", {})
    print(f"  trusted (inside the hull of the encoded checkpoints): {info.get('trusted_fraction', 1) * 100:.0f}% "
          f"of the grid; isolated spikes (> 0.5 decades above every neighbour): {sp.get('trusted', 0)} trusted, "
          f"{sp.get('all', 0)} in all")
    if ex.get("above_2x_worst_checkpoint"):
        how = "decoded where they are" if info.get("beyond_hull") == "extrapolate" else "evaluated at the hull boundary"
        top = "NaN" if ex.get("loss_max") is None else f"{ex['loss_max']:.3g}"
        print(f"  warning: {ex['above_2x_worst_checkpoint']} of {ex['points']} untrusted points (outside the hull of "
              f"the encoded checkpoints, {how}) have a loss above twice the worst checkpoint's "
              f"({2 * ex['worst_checkpoint_loss']:.3g}; max {top}); views fade them, the merge tree leaves them out")
    if info.get("trajectories"):
        print(f"{info['trajectories']}")
    return 0


def _warn_bf16_cpu(device: str) -> None:
    """bf16 on a CPU without bf16 units is emulated, several times slower than fp32: say so (not an error)."""
    import sys

    from ..networks.device import bf16_cpu_warning, resolve_device

    msg = bf16_cpu_warning() if resolve_device(device).type == "cpu" else None
    if msg:
        print(f"globscope landscape: warning: {msg}", file=sys.stderr, flush=True)
