"""`globscope decode`: a point of a landscape (coordinates, a basin's minimum, a saddle) as a model file."""
from __future__ import annotations

import json
import sys

from .args import csv_of, device, finite_float, nonnegative_int, study_dir


def register(sub):
    p = sub.add_parser("decode", help="decode a latent point (or a basin's minimum, a saddle) into a model file",
                       description="Decode a point of a study's landscape into the full model and evaluate it on "
                                   "the landscape's evaluation subset. The point is given by --at, or named by the "
                                   "merge tree (`globscope topology`): --basin N is the minimum of the basin whose "
                                   "minimum has NodeId N in topology-{2d,3d}/nodes.vtu, --saddle A,B the saddle "
                                   "where basins A and B join. Points off the grid are refused, and so are "
                                   "untrusted ones (beyond the hull of the encoded checkpoints) without --force.")
    p.add_argument("study", type=study_dir, help="study directory")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--at", type=csv_of(finite_float), metavar="X,Y[,Z]", help="latent coordinates")
    what.add_argument("--basin", type=nonnegative_int, metavar="N", help="the minimum of basin N (its NodeId)")
    what.add_argument("--saddle", type=csv_of(nonnegative_int), metavar="A,B",
                      help="the saddle joining basins A and B")
    what.add_argument("--basins", action="store_true", help="list the basins of the merge tree and exit")
    what.add_argument("--stdin", action="store_true",
                      help="answer JSON requests, one per line, on stdout (what `serve` and the ParaView plugin use)")
    p.add_argument("--dim", type=int, choices=[2, 3], help="which landscape (default: from --at or --reducer, else 2)")
    p.add_argument("--reducer", help="the reducer, e.g. ae-2d (default: the one the landscape was computed with)")
    p.add_argument("--out", help="model file, .safetensors or .pt (a state_dict; default: "
                   "STUDY/decoded/REDUCER-WHAT.safetensors)")
    p.add_argument("--force", action="store_true", help="decode an untrusted point too")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu or cuda[:N]")
    p.set_defaults(func=cmd_decode)


def cmd_decode(args) -> int:
    from ..errors import GlobScopeError
    from ..stages.decode import PointDecoder, answer_requests, check_format, summary

    if args.saddle is not None and len(args.saddle) != 2:
        raise GlobScopeError(f"--saddle needs two basins A,B, got {len(args.saddle)}")
    if not (args.at or args.basin is not None or args.saddle or args.basins or args.stdin):
        raise GlobScopeError("say which point: --at X,Y[,Z], --basin N or --saddle A,B (or --basins to list them)")
    if args.out:
        check_format(args.out)
    dim = args.dim or (len(args.at) if args.at and len(args.at) in (2, 3) else None)
    decoder = PointDecoder(args.study, dim, args.reducer, args.device)
    if args.stdin:
        answer_requests(decoder, sys.stdin, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        return 0
    if args.basins:
        basins = decoder.basins()
        if args.json:
            print(json.dumps(basins))
        for b in [] if args.json else basins:
            print(f"basin {b['node']}: minimum at ({', '.join(f'{v:.6g}' for v in b['at'])}), "
                  f"log10 loss {b['scalar']:.4g}")
        return 0
    info = decoder.request(args.at, args.basin, args.saddle, args.force, args.out)
    print(json.dumps(info) if args.json else summary(info))
    return 0
