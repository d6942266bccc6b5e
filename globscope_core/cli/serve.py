"""`globscope serve`: a browser view of a study (trame in ParaView's Python), with a point picker."""
from __future__ import annotations

from .args import port, study_dir


def register(sub):
    p = sub.add_parser("serve", help="a browser view of a study: landscapes, runs, merge tree, pick and decode points",
                       description="Serve the study's 2D and 3D landscapes, runs, merge trees and basins to a web "
                                   "browser (the views of `globscope render`, rendered here), with a point picker "
                                   "that decodes the model at a point, reports its loss and offers it as a download. "
                                   "It listens on 127.0.0.1: reach it from another computer through an SSH tunnel "
                                   "(the command prints the line).")
    p.add_argument("study", type=study_dir, nargs="+", help="study directory (several: the page offers each)")
    p.add_argument("--port", type=port, default=8080, help="port (0: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--out", help="directory for decoded models (default: a new temporary directory)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from ..stages.serve import serve_study

    def announce(text):
        print(text, flush=True)

    return serve_study(args.study, args.port, args.host, args.out, announce=announce)
