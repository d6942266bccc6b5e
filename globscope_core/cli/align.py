"""``globscope align``: permute every run of a study to a reference run (permutation symmetry)."""
from __future__ import annotations

from ..stages.fit import KINDS
from .args import at_least, device, existing_file, new_or_dir, nonnegative_int, positive_int, seed, study_dir


def register(sub):
    p = sub.add_parser("align", help="permute every run to a reference run (weight or activation matching)")
    p.add_argument("study", type=study_dir, help="study directory")
    p.add_argument("--reference", type=nonnegative_int, default=0, help="run the others are aligned to (default 0)")
    p.add_argument("--method", default="weight-matching",
                   help="weight-matching, activation-matching, deep-align (learned; MLPs, CNNs, ResNets), "
                        "deep-align+wm (deep-align refined by weight matching), sinkhorn (permutations learned on the loss between "
                        "the models, Pena et al.), deep-align+sinkhorn and weight-matching+sinkhorn (refined by it), "
                        "deep-align+loss and weight-matching+loss (refined by a descent of the loss between the "
                        "models), or a method registered in align.ALIGNERS")
    p.add_argument("--out", required=True, type=new_or_dir, help="directory of the aligned study (new)")
    p.add_argument("--alphas", type=at_least(2), default=25, help="interpolation weights for the barriers")
    p.add_argument("--eval-samples", type=positive_int, default=2000, help="train samples for the barrier losses")
    p.add_argument("--bn-samples", type=nonnegative_int, default=2000,
                   help="BatchNorm networks: barriers also with every point's statistics recomputed on this many "
                        "train samples (fixed subset; 0: only the models' own, interpolated statistics)")
    p.add_argument("--act-samples", type=positive_int, default=1024, help="train samples for activation matching")
    p.add_argument("--max-iter", type=positive_int, default=100,
                   help="weight matching: most sweeps over the permutations")
    p.add_argument("--aligner-steps", type=positive_int, default=None,
                   help="deep-align: training steps of the aligner saved in STUDY/aligners/ (default 300; "
                        "a saved one with fewer steps resumes)")
    p.add_argument("--aligner", type=existing_file("aligner file"), default=None,
                   help="deep-align: use this trained aligner (e.g. OTHER/aligners/deep-align.pt of a study of "
                        "the same MLP) as it is, without training")
    p.add_argument("--seed", type=seed, default=0, help="seed of the matching's random order")
    p.add_argument("--compare-basins", action="store_true",
                   help="also run fit, landscape and topology on both studies and compare their basins")
    p.add_argument("--reducer", default="pca", choices=KINDS,
                   help="reducer kind for --compare-basins")
    p.add_argument("--resolution", type=at_least(2), default=65, help="landscape resolution for --compare-basins")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N (activations, losses, landscapes)")
    p.set_defaults(func=cmd_align)


def cmd_align(args):
    from ..errors import GlobScopeError
    from ..stages.align import align_study

    if args.aligner is not None and not args.method.startswith("deep-align"):
        raise GlobScopeError(f"{args.aligner}: --aligner is for the deep-align methods (deep-align, deep-align+wm, "
                             f"deep-align+sinkhorn, deep-align+loss), not {args.method}")
    if args.aligner is not None and args.aligner_steps is not None:
        raise GlobScopeError(f"{args.aligner}: --aligner is used as it is; --aligner-steps would train it")
    rep = align_study(args.study, args.out, reference=args.reference, method=args.method, alphas=args.alphas,
                      eval_samples=args.eval_samples, seed=args.seed, max_iter=args.max_iter,
                      act_samples=args.act_samples, aligner_steps=args.aligner_steps, device=args.device,
                      bn_samples=args.bn_samples, **({"aligner": args.aligner} if args.aligner else {}))
    print(f"{args.out}: runs aligned to run {rep['reference']} by {rep['method']} ({rep['seconds']:.1f} s)"
          + ("; done before, nothing redone" if rep.get("already_done") else ""))
    print(f"  barrier of the straight line to the reference ({rep['split']} loss, {rep['eval_samples']} samples):")
    al = rep.get("aligner")
    if al:
        seeds = f" (runs of seeds {al['trained_on_seeds']})" if al.get("trained_on_seeds") else ""
        where = "this study" if al["in_ensemble"] else f"{al['trained_on']}{seeds}"
        print(f"  aligner {al['file']}: trained on {where}, {al['steps']} steps; "
              f"training here {al['train_seconds_here']:.1f} s; {rep['seconds_per_pair']:.3f} s per pair")
    bn = rep.get("batchnorm") or {}
    if bn:
        print("  BatchNorm: barriers with the models' own (interpolated) statistics"
              + (f", [in brackets] with every point's recomputed on {bn['recomputed_on']} ({bn['seconds']:.1f} s)"
                 if bn.get("samples") else " (--bn-samples 0: not recomputed)"))
    for d in rep["runs"]:
        again = f"   [{d['barrier_before_bn_recomputed']:.4f} -> {d['barrier_after_bn_recomputed']:.4f}]" \
            if "barrier_after_bn_recomputed" in d else ""
        print(f"  run {d['run']:3d}: {d['barrier_before']:.4f} -> {d['barrier_after']:.4f}{again}   "
              f"distance {d['distance_before']:.2f} -> {d['distance_after']:.2f}")
    again = f"   [{rep['mean_barrier_before_bn_recomputed']:.4f} -> {rep['mean_barrier_after_bn_recomputed']:.4f}]" \
        if "mean_barrier_after_bn_recomputed" in rep else ""
    print(f"  mean: {rep['mean_barrier_before']:.4f} -> {rep['mean_barrier_after']:.4f}{again}"
          + (f"   plot: {args.out}/{rep['plot']}" if rep.get("plot") else ""))
    if args.compare_basins:
        from ..stages.align import compare_basins

        cmp = compare_basins(args.study, args.out, reducer=args.reducer, resolution=args.resolution,
                             device=args.device)
        print(f"  basins of the final models: raw {cmp['raw']['n_basins']}, aligned {cmp['aligned']['n_basins']}"
              + (f"   side by side: {cmp['image']}" if cmp.get("image") else ""))
