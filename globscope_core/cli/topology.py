"""``globscope topology``: merge tree, persistence and segmentation of a .vti field, or a study's basins."""
from __future__ import annotations

import json
import os

from ..errors import GlobScopeError
from ..storage.study_files import landscape_vti
from .args import nonnegative_float


def register(sub):
    p = sub.add_parser("topology", help="merge tree, persistence diagram and segmentation (TTK layout)",
                       description="FILE.vti: write DIR/nodes.vtu, arcs.vtu, segmentation.vti, diagram.vtu. "
                                   "A study directory: do its landscape-{2d,3d}.vti and report the basin of "
                                   "each run's final checkpoint (report.json, basins-2d/3d).")
    p.add_argument("input", type=_input, help="a .vti file, or a study directory")
    p.add_argument("--scalar", help="point array to use (default: loss for a file, log_loss for a study)")
    p.add_argument("--out", help="output directory (for a .vti input; a study writes STUDY/topology-{2d,3d})")
    p.add_argument("--persistence", type=nonnegative_float, help="remove leaf branches with persistence <= this "
                   "(default: 0 for a file, 0.05 relative for a study)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--relative", action="store_true", help="the threshold is a fraction of the field's range")
    scale.add_argument("--absolute", action="store_true", help="(study) the threshold is in units of the scalar")
    p.add_argument("--tree", choices=["join", "split"], default="join", help="join (minima) or split (maxima) tree")
    p.add_argument("--split-pairs", choices=["tree", "homology"], default="tree",
                   help="a split tree's diagram: the tree's own saddle-max pairs (as TTK's FTM backend) or "
                        "TTK's default backend's (homology: a maximum on the domain boundary makes no pair)")
    p.add_argument("--dim", type=int, choices=[2, 3], action="append", help="(study) which landscapes; default all present")
    p.add_argument("--all-points", action="store_true",
                   help="(study) include the untrusted (extrapolated) grid points in the merge tree and basins")
    p.add_argument("--nan-as-inf", action="store_true", help="treat NaN values as +inf instead of refusing (a study always does)")
    p.set_defaults(func=cmd_topology)


def _input(text):
    import argparse

    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    if not os.path.isdir(text) and not text.endswith(".vti"):
        raise argparse.ArgumentTypeError(f"{text}: expected a .vti file or a study directory")
    return text


def cmd_topology(args) -> int:
    from ..stages import topology as topology_stage

    if os.path.isdir(args.input):
        dims = args.dim or [d for d in (2, 3) if os.path.exists(landscape_vti(args.input, d))]
        if not dims:
            raise GlobScopeError(f"{args.input}: no landscape-2d.vti or landscape-3d.vti (run `globscope landscape` first)")
        pers = topology_stage.DEFAULT_PERSISTENCE if args.persistence is None else args.persistence
        relative = not args.absolute if args.persistence is None else (args.relative or not args.absolute)
        for d in dims:
            topology_stage.study_topology(args.input, d, pers, relative, args.scalar or "log_loss", args.tree,
                                       trusted_only=not args.all_points)
        return 0
    if not args.out:
        raise GlobScopeError("--out DIR is required for a .vti input")
    res = topology_stage.topology_of_file(args.input, args.scalar or "loss", args.out, args.persistence or 0.0, args.relative,
                                       args.tree, "inf" if args.nan_as_inf else "error", args.split_pairs)
    print(json.dumps(dict(topology_stage.summary(res), out=args.out)))
    return 0
