"""The ``globscope`` command: one subcommand per stage, plus ``demo``.

Each module of this package defines ``register(subparsers)``, which adds its subcommand and sets
``func`` to a function taking the parsed arguments. Errors the user can fix are
GlobScopeError: printed as one line, exit status 2. The modules import torch and the
algorithms inside the command functions, so `topology`, `info`, `render` and `paraview` start fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import GlobScopeError

# stage modules that contribute subcommands, in the order of the pipeline
STAGES = [
    "globscope_core.cli.train",      # train, import, info
    "globscope_core.cli.fit",        # fit, compare
    "globscope_core.cli.landscape",
    "globscope_core.cli.topology",
    "globscope_core.cli.align",
    "globscope_core.cli.connect",
    "globscope_core.cli.render",     # render, paraview
    "globscope_core.cli.demo",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="globscope", description="A global view of neural-network loss landscapes.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        importlib.import_module(name).register(sub)
    return p


def main(argv=None) -> int:
    # two cores shared with pvbatch and friends: let torch use what the machine has, not more
    os.environ.setdefault("KMP_WARNINGS", "0")
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except GlobScopeError as exc:
        print(f"globscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file problem no stage turned into a GlobScopeError: still one line
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"globscope {args.command}: error: {where}{exc.strerror or str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"globscope {args.command}: interrupted (finished work is kept; rerun to resume)", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
