"""Subcommands `globscope render` (pvbatch images of a study) and `globscope paraview` (the GUI)."""
from __future__ import annotations

import sys

from .args import existing_dir, new_or_dir, positive_int


def register(sub):
    p = sub.add_parser("render", help="render the 2D, 3D and trajectory views of a study to PNG (pvbatch)")
    p.add_argument("study", type=existing_dir, help="study directory")
    p.add_argument("--out", type=new_or_dir, help="output directory (default STUDY/renders)")
    p.add_argument("--quick", action="store_true", help="matplotlib quick looks, even when ParaView is installed")
    p.add_argument("--timeout", type=positive_int, default=900, help="seconds before pvbatch is stopped")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("paraview", help="open the ParaView GUI on a study, plugin loaded and the 2D view applied")
    p.add_argument("study", type=existing_dir, help="study directory")
    p.set_defaults(func=cmd_paraview)


def cmd_render(args):
    from ..stages.render import RenderInterrupted, render_study

    try:
        render_study(args.study, args.out, paraview=False if args.quick else None, timeout=args.timeout)
    except RenderInterrupted as exc:  # pvbatch and its X server are stopped: say what the folder holds
        print(f"globscope render: interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    return 0


def cmd_paraview(args):
    from ..stages.render import open_gui

    return open_gui(args.study)
