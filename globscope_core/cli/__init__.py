"""The ``globscope`` command: one subcommand per stage, plus ``demo``.

Each module of this package defines ``register(subparsers)``, which adds its subcommand and sets
``func`` to a function taking the parsed arguments. Errors the user can fix are
GlobScopeError: printed as one line, exit status 2. The modules import torch and the
algorithms inside the command functions, so `topology`, `info`, `render` and `paraview` start fast.

Options are checked by the types of ``cli/args.py`` while parsing, and argparse's own errors are one line
(no usage block), so every bad value is refused before any work. Anything else that escapes a command is a
bug: main prints one line with a hint (GLOBSCOPE_DEBUG=1 shows the traceback) and exits 3.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from ..errors import GlobScopeError

# stage modules that contribute subcommands, in the order of the pipeline
STAGES = [
    "globscope_core.cli.train",
    "globscope_core.cli.import_",
    "globscope_core.cli.info",
    "globscope_core.cli.fit",        # fit, compare
    "globscope_core.cli.landscape",
    "globscope_core.cli.topology",
    "globscope_core.cli.align",
    "globscope_core.cli.connect",
    "globscope_core.cli.render",     # render, paraview
    "globscope_core.cli.demo",
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after an option's help, unless there is no default or the help already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if d is None or d is False or d == "" or d == argparse.SUPPRESS or "default" in text or not action.option_strings:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``globscope train: error: argument --epochs: must be ...``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # values like "-2,2,-1e3,5" (--bounds) are values, not options: argparse only knows "-2" and "-.5"
        if hasattr(self, "_negative_number_matcher"):
            self._negative_number_matcher = re.compile(r"^-\.?\d[\d.eE+,-]*$")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="globscope", description="A global view of neural-network loss landscapes.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name in STAGES:
        importlib.import_module(name).register(sub)
    return p


def main(argv=None) -> int:
    # two cores shared with pvbatch and friends: let torch use what the machine has, not more
    os.environ.setdefault("KMP_WARNINGS", "0")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a refused option (2, its line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        rc = args.func(args)
    except GlobScopeError as exc:
        print(f"globscope {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"globscope {args.command}: interrupted (finished work is kept; rerun to resume)", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system said no (permissions, missing path): the user can act on it
        if os.environ.get("GLOBSCOPE_DEBUG"):
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"globscope {args.command}: error: {where}{exc.strerror or _one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: one line for the user, the traceback on request
        if os.environ.get("GLOBSCOPE_DEBUG"):
            raise
        print(f"globscope {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)[:300]} "
              "(a bug; rerun with GLOBSCOPE_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 3
    return int(rc or 0)


def _one_line(exc) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
