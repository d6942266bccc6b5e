"""The one write path of GlobScope: every result file replaces the old one only when complete and verified.

``atomic_file(path, verify=...)`` yields a temporary name; the file written there is fsynced, checked
non-empty, verified (read back) and only then renamed over ``path``. Any failure removes the
temporary and leaves ``path`` as it was; a full disk or a read-only directory becomes one line
(``write_error``): "no space left on DIR: NAME unchanged". A temporary left by a writer that was killed
(``NAME.tmp-PID``, that process gone) is removed by the next write of the same file. ``check_writable`` refuses long work
whose results could not be written. ``file_set`` does the same for files that only make sense together (a merge
tree's four): all of the new set, or the old set as it was. Standard library only: ParaView's Python can import it.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import sys

from ..errors import GlobScopeError
from ..resources import format_bytes

_NOTED: set = set()


def note(message: str) -> None:
    """A one-line notice on stderr, once per process and message (not an error: the stage goes on)."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"globscope: note: {message}", file=sys.stderr, flush=True)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reserve(path: str, size: int) -> None:
    """Allocate ``size`` bytes for ``path`` before HDF5 writes to it.

    HDF5 reports a full disk only as a warning when it closes a file, and then its state is broken
    (zeros written, crashes). With the space allocated in advance the disk cannot fill under it:
    a full disk fails here, as a plain OSError, before HDF5 has written anything. HDF5 truncates
    the file to its real end when it closes it.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, max(int(size), os.fstat(fd).st_size))
    finally:
        os.close(fd)


def free_bytes(directory: str) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _probe_writable(directory: str) -> OSError | None:
    """Whether a file can be created in ``directory`` (root ignores permission bits: try it)."""
    probe = os.path.join(directory, f".globscope-probe-{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.remove(probe)
        return None
    except OSError as exc:
        return exc


def write_error(exc: BaseException, path: str) -> GlobScopeError:
    """One line for a failed write of ``path``: full disk, read-only directory, or the OS's reason."""
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    state = "unchanged" if os.path.exists(path) else "not written"
    code = getattr(exc, "errno", None)
    if code is None:  # HDF5 and torch report a full disk in their own words, without errno
        try:  # measured now, not through free_bytes (which the checks before the work use)
            free = shutil.disk_usage(directory).free
        except OSError:
            free = None
        probe = _probe_writable(directory) if os.path.isdir(directory) else None
        if free is not None and free < (1 << 20) or "no space" in str(exc).lower():
            code = errno.ENOSPC
        elif probe is not None:
            code, exc = probe.errno, probe
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return GlobScopeError(f"no space left on {directory}: {name} {state}")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return GlobScopeError(f"{directory} is not writable ({os.strerror(code)}): {name} {state}")
    text = str(exc).strip()
    reason = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
    return GlobScopeError(f"{path}: cannot write ({reason}): {name} {state}")


def check_writable(directory: str, need_bytes: int = 0, what: str = "") -> None:
    """Refuse long work whose results could not be written: a read-only directory, or too little space."""
    try:
        os.makedirs(directory, exist_ok=True)
        exc = _probe_writable(directory)
    except OSError as err:
        exc = err
    if exc is not None and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise GlobScopeError(f"no space left on {directory}" + (f": {what} not started" if what else ""))
    if exc is not None:
        raise GlobScopeError(f"{directory} is not writable ({exc.strerror})" + (f": {what} not started" if what else ""))
    free = free_bytes(directory)
    if need_bytes and free is not None and free < need_bytes:
        raise GlobScopeError(f"no space left on {directory}: {what or 'the results'} need about {format_bytes(need_bytes)}, "
                             f"{format_bytes(free)} free")


def check_utf8_path(path: str, what: str) -> None:
    """Refuse, before any work, a path that is not valid UTF-8: VTK's writers and readers (and ParaView) take
    file names as UTF-8 text and fail on such a path only when the results are written."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        shown = raw.decode("utf-8", "backslashreplace")
        raise GlobScopeError(f"{shown}: the path is not valid UTF-8 (byte 0x{raw[exc.start]:02x}), and VTK and "
                             f"ParaView cannot use it: {what} not started; rename or link it to a UTF-8 path") from None


@contextlib.contextmanager
def atomic_file(path: str, suffix: str = "", verify=None):
    """``with atomic_file(p) as tmp: write(tmp)``: ``p`` is replaced only by a complete, verified file.

    The temporary is fsynced, checked to be non-empty and passed to ``verify(tmp)`` (which raises
    when the file does not read back) before it is renamed over ``path``; on any failure it is removed
    and ``path`` is left as it was. Write failures (full disk, read-only directory, and what HDF5,
    torch or VTK report in their own words) become one line, ``write_error``. A ``path`` that is a symbolic
    link stays one: the file it points to is replaced (its temporary lies next to it).
    """
    target = os.path.realpath(path) if os.path.islink(path) else path
    directory = os.path.dirname(os.path.abspath(target))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, path) from None
    _remove_orphans(target)
    tmp = f"{target}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        if not os.path.exists(tmp) or os.path.getsize(tmp) == 0:
            raise OSError(errno.EIO, "the written file is empty")
        _fsync_path(tmp)
        if verify is not None:
            verify(tmp)
        os.replace(tmp, target)
        _fsync_path(directory)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise write_error(exc, path) from None
        if isinstance(exc, (RuntimeError, ValueError)):  # torch and VTK say "disk full" in their own words
            err = write_error(exc, path)
            if str(err).startswith("no space") or " is not writable" in str(err):
                raise err from None
        raise


def _remove_orphans(path: str) -> None:
    """Remove ``path.tmp-PID*`` left by a writer that was killed (its process is gone) before it renamed."""
    for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
        pid = tmp[len(path) + 5:].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write a file by temporary name + fsync + verify + rename, so readers never see half of it."""
    def same(tmp):
        if os.path.getsize(tmp) != len(data):
            raise OSError(errno.EIO, f"wrote {os.path.getsize(tmp)} of {len(data)} bytes")

    with atomic_file(path, verify=same) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def remove_file(path) -> None:
    """Remove ``path`` if it exists (``None``: nothing to remove)."""
    if path and os.path.exists(path):
        os.remove(path)


def save_torch(obj, path: str) -> None:
    """torch.save through ``atomic_file``, read back (weights only) before it replaces ``path``."""
    import torch

    def readable(tmp):
        try:
            torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)  # mmap: not a second copy in memory
        except Exception as exc:
            raise OSError(errno.EIO, f"the written file does not read back ({type(exc).__name__})") from None

    with atomic_file(path, verify=readable) as tmp:
        torch.save(obj, tmp)


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors' save_file through ``atomic_file``, read back (every tensor equal) before it replaces ``path``."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    def same(tmp):
        try:
            back = load_file(tmp)
            ok = back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
        except Exception as exc:
            raise OSError(errno.EIO, f"the written file does not read back ({type(exc).__name__})") from None
        if not ok:
            raise OSError(errno.EIO, "the written file reads back different tensors")

    with atomic_file(path, verify=same) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as exc:  # its own error, a full disk included: one line through atomic_file
            raise OSError(str(exc)) from None


def save_figure(fig, path: str, **kw) -> None:
    """matplotlib's savefig through ``atomic_file`` (PNG)."""
    def png(tmp):
        with open(tmp, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                raise OSError(errno.EIO, "the written file is not a PNG")

    with atomic_file(path, suffix=".png", verify=png) as tmp:
        fig.savefig(tmp, format="png", **kw)


# --- sets of files written together ---------------------------------------------------------------
@contextlib.contextmanager
def file_set(out_dir: str, names):
    """``with file_set(d, names) as tmp: write each of names into tmp``: they replace ``d``'s old set as a whole.

    A merge tree's four files only make sense together, so they are written into a temporary folder next to
    ``d`` (``.d.tmp-PID``) and swapped in by renames only when all are written and verified: after a full disk,
    a read-only folder or any other failure the old set is there as it was, and the temporary is gone. ``d``
    holding only this set is exchanged with the temporary in one step (Linux ``renameat2``; elsewhere two
    renames, undone by the next write after a crash between them); otherwise (other files in ``d``, or ``d``
    the working directory) each file is renamed into it. A ``d`` that is a symbolic link stays one: the folder
    it points to is the one replaced.
    """
    shown = os.path.abspath(out_dir)
    out_dir = os.path.realpath(out_dir) if os.path.islink(out_dir) else shown
    parent, base = os.path.dirname(out_dir), os.path.basename(out_dir)
    names = list(names)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}")
    try:
        os.makedirs(parent, exist_ok=True)
        _recover_sets(parent, base)
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp)
    except OSError as exc:
        raise _set_error(exc, shown, names, tmp) from None
    try:
        yield tmp
        missing = [n for n in names if not os.path.isfile(os.path.join(tmp, n))]
        if missing:
            raise OSError(errno.EIO, f"{', '.join(missing)} not written")
        _fsync_path(tmp)
        _swap_in(tmp, out_dir, names)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, GlobScopeError)):
            raise _set_error(exc, shown, names, tmp) from None
        raise


def _set_error(exc, out_dir, names, tmp) -> GlobScopeError:
    """One line for a failed set: where, why, and that the old files are unchanged (or none were written)."""
    what = f"{', '.join(names)} {'unchanged' if os.path.isdir(out_dir) else 'not written'}"
    text = str(exc)
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or text.startswith("no space left on"):
        return GlobScopeError(f"no space left on {out_dir}: {what}")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return GlobScopeError(f"{os.path.dirname(out_dir)} is not writable ({os.strerror(code)}): {what}")
    if isinstance(exc, GlobScopeError):  # the message of one file's write, with the folder it will be in
        return GlobScopeError(text.replace(tmp, out_dir))
    return GlobScopeError(f"{out_dir}: cannot write ({getattr(exc, 'strerror', None) or text}): {what}")


def _swap_in(tmp: str, out_dir: str, names: list) -> None:
    parent = os.path.dirname(out_dir)
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
    elif set(os.listdir(out_dir)) <= set(names) and os.path.realpath(out_dir) != os.path.realpath(os.getcwd()):
        if not _exchange(tmp, out_dir):
            old = os.path.join(parent, f".{os.path.basename(out_dir)}.old-{os.getpid()}")
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except OSError:
                os.rename(old, out_dir)
                raise
            tmp = old
        shutil.rmtree(tmp, ignore_errors=True)  # the old set
    else:  # a folder with other files: each of ours renamed into it (no space needed, nothing else touched)
        for n in names:
            os.replace(os.path.join(tmp, n), os.path.join(out_dir, n))
        shutil.rmtree(tmp, ignore_errors=True)
        _fsync_path(out_dir)
    _fsync_path(parent)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def _recover_sets(parent: str, base: str) -> None:
    """Clean up after a writer that was killed: its temporary folder goes; an old set it had moved aside
    (killed between two renames) comes back when the folder is missing."""
    for entry in os.listdir(parent):
        m = re.fullmatch(rf"\.{re.escape(base)}\.(tmp|old)-(\d+)", entry)
        if not m or int(m[2]) == os.getpid() or _alive(int(m[2])):
            continue
        path = os.path.join(parent, entry)
        if m[1] == "old" and not os.path.lexists(os.path.join(parent, base)):
            os.rename(path, os.path.join(parent, base))
        else:
            shutil.rmtree(path, ignore_errors=True)
