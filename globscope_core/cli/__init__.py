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
import contextlib
import functools
import importlib
import os
import re
import shlex
import signal
import sys

from ..errors import GlobScopeError, Terminated

# stage modules that contribute subcommands, in the order of the pipeline
STAGES = [
    "globscope_core.cli.train",
    "globscope_core.cli.import_",
    "globscope_core.cli.info",
    "globscope_core.cli.fit",        # fit, compare
    "globscope_core.cli.landscape",
    "globscope_core.cli.topology",
    "globscope_core.cli.decode",
    "globscope_core.cli.align",
    "globscope_core.cli.connect",
    "globscope_core.cli.render",     # render, paraview
    "globscope_core.cli.serve",
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


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated(signum)


_lost: list = []  # a stop signal that Python dropped, raised again at the next SIGALRM


def _resend_lost_interrupt(hook, unraisable=sys.__unraisablehook__) -> None:
    """Python drops an exception raised in a finalizer (h5py's weak-reference callbacks, a __del__) with a
    traceback: a Ctrl-C or SIGTERM that lands there was lost and the command ran on (CI saw it in train).
    Note it, quietly, and raise it again from a timer's signal a few milliseconds later (raised here, it
    would be dropped again; if that one lands in a finalizer too, it comes back here)."""
    exc = hook.exc_value
    if not isinstance(exc, KeyboardInterrupt):
        return unraisable(hook)
    _lost.append(getattr(exc, "signum", signal.SIGINT))
    signal.setitimer(signal.ITIMER_REAL, 0.005, 0.005)  # repeats until the handler ran


def _raise_lost(signum, frame):
    if _lost:
        lost = _lost.pop()
        _lost.clear()
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise KeyboardInterrupt if lost == signal.SIGINT else Terminated(lost)


# what an interrupted command keeps, and the command that continues it: (what is kept, how, an option it needs)
AFTER_INTERRUPT = {
    "train": ("the finished runs are kept", "continue with", "--resume"),
    "landscape": ("the finished chunks are kept", "continue with", None),  # and without --fresh
    "connect": ("the curve's training so far is kept", "continue with", None),
    "demo": ("the finished stages are kept", "continue with", None),
    "align": ("the aligned study was not written (a DEEP-ALIGN net keeps its training so far)", "rerun", None),
}
NOTHING_TO_CONTINUE = ("info", "paraview", "serve", "decode")


def interrupted_message(command: str, argv: list) -> str:
    """One line: what an interrupted ``globscope COMMAND ARGV`` kept and the exact command to go on with."""
    if command in NOTHING_TO_CONTINUE:
        return f"globscope {command}: interrupted"
    kept, how, option = AFTER_INTERRUPT.get(command, ("nothing was kept", "rerun", None))
    args = list(argv)
    if command == "landscape":  # --fresh again would throw away the chunks that are kept
        args = [a for a in args if not (len(a) > 3 and "--fresh".startswith(a))]
    if option and not any(len(a) > 3 and option.startswith(a) for a in args):
        args.append(option)
    return f"globscope {command}: interrupted: {kept}; {how}: {shlex.join(['globscope', *args])}"


def _interrupt_status(exc: KeyboardInterrupt) -> int:
    """128 + the signal, as a shell reports it: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + exc.signum if isinstance(exc, Terminated) else 130


def _close_progress_bars() -> None:
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


@contextlib.contextmanager
def stop_signals():
    """While the command runs: SIGTERM is raised like Ctrl-C (as Terminated), and a stop signal that Python
    dropped in a finalizer is raised again (``_resend_lost_interrupt``). Main thread only; elsewhere, nothing
    changes."""
    try:
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm),
                    signal.SIGALRM: signal.signal(signal.SIGALRM, _raise_lost)}
    except ValueError:
        yield
        return
    unraisable = sys.unraisablehook
    sys.unraisablehook = functools.partial(_resend_lost_interrupt, unraisable=unraisable)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.unraisablehook = unraisable
        _lost.clear()
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv=None) -> int:
    """The command line; SIGTERM is handled like Ctrl-C while it runs (exit status 143 instead of 130)."""
    try:
        with stop_signals():
            return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt as exc:  # before a command started (while parsing, importing)
        print("globscope: interrupted", file=sys.stderr)
        return _interrupt_status(exc)


def _main(argv: list) -> int:
    # two cores shared with pvbatch and friends: let torch use what the machine has, not more
    os.environ.setdefault("KMP_WARNINGS", "0")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a refused option (2, its line already printed)
        return (exc.code if isinstance(exc.code, int) else 2) if _flushed() else 141
    try:
        rc = args.func(args)
    except GlobScopeError as exc:
        print(f"globscope {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        _close_progress_bars()  # so the message is a line of its own, and the last one
        print(interrupted_message(args.command, argv), file=sys.stderr)
        return _interrupt_status(exc)
    except OSError as exc:  # the file system said no (permissions, missing path): the user can act on it
        if isinstance(exc, BrokenPipeError) and not _flushed(poll=True):
            return 141
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
    return int(rc or 0) if _flushed() else 141


def _flushed(poll: bool = False) -> bool:
    """Flush stdout; False when its reader went away (`globscope info STUDY | head -1`): the command then ends
    without a word and with 141 (128 + SIGPIPE), as Unix tools do, and stdout goes to /dev/null so that
    Python's own last flush is quiet too. ``poll``: also ask the pipe (a write that failed unbuffered left
    nothing to flush), to tell stdout's broken pipe from another one."""
    try:
        sys.stdout.flush()
        if poll:
            import select

            p = select.poll()
            p.register(sys.stdout.fileno(), select.POLLOUT)
            if any(ev & select.POLLERR for _, ev in p.poll(0)):
                raise BrokenPipeError
        return True
    except (OSError, ValueError) as exc:  # ValueError, io.UnsupportedOperation: no descriptor (captured output)
        if not isinstance(exc, BrokenPipeError):
            return True
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False


def _one_line(exc) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
