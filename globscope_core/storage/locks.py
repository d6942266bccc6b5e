"""Locks of a study's outputs: one writer per output at a time, never a stale lock.

A stage takes the lock of every output it writes before its work: ``output_lock(STUDY, "landscape-2d")`` is an
exclusive ``flock`` on ``STUDY/.landscape-2d.lock``. The kernel releases a flock when its process dies, even by
SIGKILL, so a lock is never stale and lock files are never removed (removing one would let two processes lock two
different files of the same name). The holder writes its pid and what it does into the file, for the one line
that whoever comes second prints: it waits ("waiting for another topology-2d on STUDY (pid N) ...") or is refused
in one line (``wait=False``, or ``refuse_same`` when the holder does the very same long, resumable work).
Locks are re-entrant within a process (``connect --refit`` runs a landscape and a topology while it holds its own
locks). Order, so that no two stages wait for each other: connect (a pair) and align (its study, then the source's
aligners), then topology, then landscape, then fit, and last ``.lock`` (study.h5 transactions) and ``.report.lock``
(report.json), which are held only for one write.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys

from ..errors import GlobScopeError

_HELD: dict = {}  # lock file (real path) -> depth, in this process
_NO_LOCK_NEEDED = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


def lock_name(output: str) -> str:
    """``landscape-2d`` -> ``.landscape-2d.lock`` (names that already start with a dot are lock files)."""
    return output if output.startswith(".") else f".{output}.lock"


def holder(path: str) -> tuple:
    """(pid, what) written by the process that holds ``path`` now, or (None, None) when unknown or gone."""
    try:
        with open(path, "rb") as fh:
            pid, _, what = fh.read(4096).decode("utf-8", "replace").strip().partition(" ")
        pid = int(pid)
        os.kill(pid, 0)
    except ProcessLookupError:
        return None, None
    except PermissionError:  # another user's process: alive
        pass
    except (OSError, ValueError):
        return None, None
    return pid, what or None


@contextlib.contextmanager
def dir_lock(directory: str, name: str = ".lock", wait: bool = True, what: str = "another writer",
             refuse_same: bool = False, hint: str = "", output: str | None = None, optional: bool = False,
             make_dir: bool = True):
    """An exclusive lock on ``directory/name`` for the ``with`` block.

    ``what`` says what the holder does (e.g. "landscape-2d"): it goes into the lock file and into the messages.
    ``wait``: wait for a holder with a one-line message on stderr; ``False`` refuses at once in one line
    ("DIR: another X is working on this study now (pid N); wait for it to finish" + ``hint``), and so does
    ``refuse_same`` when the holder does the same ``what``. A lock file that cannot be created (read-only or full
    directory) is one line naming ``output`` (default study.h5); with ``optional`` the block runs unlocked
    instead: nothing can be written there, so nothing needs protecting, and the stage's own check of its output
    says what is not written (so does a directory that does not exist, unless ``make_dir`` creates it).
    """
    from .safe_write import write_error
    from .study_files import study_h5

    path = os.path.join(directory, name)
    key = os.path.realpath(path)
    if key in _HELD:  # this process holds it already (a stage inside a stage)
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    try:
        if make_dir:
            os.makedirs(directory, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if optional and exc.errno in (*_NO_LOCK_NEEDED, errno.ENOENT, errno.ENOTDIR):
            yield  # nothing can be written there, so there is nothing to protect: the stage says why
            return
        raise write_error(exc, output or study_h5(directory)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, doing = holder(path)
            who = f"pid {pid}" if pid else "another process"
            label = what if what.startswith("another") else f"another {what}"
            if not wait or (refuse_same and doing == what):
                raise GlobScopeError(f"{directory}: {label} is working on this study now ({who}); wait for it "
                                     f"to finish{hint}") from None
            print(f"globscope: waiting for {label if doing in (None, what) else doing} on {directory} ({who}) ...",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C and SIGTERM interrupt the wait (cli/__init__.py)
        with contextlib.suppress(OSError):  # who holds it, for the messages above (a full disk: no record)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def output_lock(study_dir, output: str, what: str | None = None, wait: bool = True, refuse_same: bool = False,
                hint: str = "", reading: bool = False):
    """The lock of one output of a study (``STUDY/.{output}.lock``), e.g. ``output_lock(study, "landscape-2d")``.

    ``study_dir``: a directory or a Study; ``what``: what the caller does (default: ``output``). A directory that
    cannot hold the lock file (missing, read-only, full) is left to the stage, which refuses to write there in
    its own words. ``reading``: the caller reads the output and only waits for a writer: no writer ever ran
    where there is no lock file, so none is made.
    """
    directory = os.path.abspath(getattr(study_dir, "dir", study_dir))
    if reading and not os.path.exists(os.path.join(directory, lock_name(output))):
        return contextlib.nullcontext()
    return dir_lock(directory, lock_name(output), wait=wait, what=what or output, refuse_same=refuse_same,
                    hint=hint, optional=True, make_dir=False)


def holding(*locks):
    """Decorator: each call runs holding output locks, taken in the order given. Each of ``locks`` maps the
    call's arguments (a dict by name, defaults filled in) to ``(study_dir, output, options for output_lock)``,
    or to None for no lock (e.g. ``fit(save=False)`` writes nothing)."""
    import functools
    import inspect

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with contextlib.ExitStack() as held:
                for of in locks:
                    spec = of(bound.arguments)
                    if spec is not None:
                        held.enter_context(output_lock(spec[0], spec[1], **(spec[2] if len(spec) > 2 else {})))
                return fn(*args, **kwargs)

        return call

    return decorate
