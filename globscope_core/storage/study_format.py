"""The file format of study.h5 and paths.h5: datasets, the read-back check, and what guards what HDF5 leaves
unguarded.

The parameter rows and numeric columns carry HDF5's fletcher32 checksum and the file's metadata uses the v110
format, whose superblock and object headers carry checksums. HDF5 keeps string attributes and string datasets in
its global heap, which has no checksum: the attributes (plan, layout, specs, format), the run table and the
checkpoint labels carry a BLAKE2 checksum of their own (attribute ``checksums``), renewed by every write and checked
at every open; the numeric columns' types are checked at every open too.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os

import h5py
import numpy as np

from ..errors import GlobScopeError

FORMAT = "globscope-study"
VERSION = 1
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")
_STR = h5py.string_dtype("utf-8")
LIBVER = ("v110", "v110")  # superblock v3 and object headers with checksums; readable by HDF5 >= 1.10
def _row_chunks(n_params: int) -> tuple:
    # about 1 MiB per chunk, whole rows: reads are always by rows
    return (max(1, min(1024, (1 << 20) // max(1, 4 * n_params))), n_params)


def new_datasets(f: h5py.File, n_params: int) -> None:
    """The empty datasets of a store in today's layout (every numeric column with its fletcher32 checksum)."""
    f.create_dataset("params", shape=(0, n_params), maxshape=(None, n_params), dtype="f4",
                     chunks=_row_chunks(n_params), fletcher32=True)
    g = f.create_group("checkpoints")
    for col, dt in (("run", "i4"), ("step", "i8"), *((m, "f8") for m in METRICS)):
        g.create_dataset(col, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,), fletcher32=True)
    g.create_dataset("label", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(4096,))
    f.create_dataset("runs", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(256,))


def first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def copy_without_runs(src: str, tmp: str, drop) -> None:
    """``src`` written anew to ``tmp`` without the rows of the runs ``drop`` (the run table is kept whole).

    A new file, not a copy with rows removed: HDF5 does not give back the space of removed chunks, so a
    store whose rows are replaced (connect rerun on the same pair) would grow at every rerun.
    """
    with h5py.File(src, "r") as s, h5py.File(tmp, "w", libver=LIBVER) as d:
        for k, v in s.attrs.items():
            d.attrs[k] = v
        n_params = s["params"].shape[1]
        new_datasets(d, n_params)
        for name in s:  # anything beyond the store's own datasets goes along as it is
            if name not in d:
                s.copy(name, d)
        runs = s["runs"].asstr()[:]
        d["runs"].resize((len(runs),))
        if len(runs):
            d["runs"][:] = runs
        keep = np.nonzero(~np.isin(s["checkpoints/run"][:], np.asarray(list(drop), dtype=np.int64)))[0]
        n = len(keep)
        d["params"].resize((n, n_params))
        block = max(1, (64 << 20) // max(1, 4 * n_params))
        for i in range(0, n, block):
            d["params"][i : i + block] = s["params"][keep[i : i + block]]
        for name, col in s["checkpoints"].items():
            if name not in d["checkpoints"]:
                continue
            out = d["checkpoints"][name]
            out.resize((n,))
            if n:
                out[:] = (col.asstr()[:] if name == "label" else col[:])[keep]


def _same_bits(a: np.ndarray, b: np.ndarray, step: int = 1 << 22) -> bool:
    """Float32 vectors equal bit for bit (NaN payloads, signed zeros): a file holds exactly what was written."""
    a, b = a.view(np.uint32), b.view(np.uint32)
    return a.shape == b.shape and all(np.array_equal(a[c : c + step], b[c : c + step]) for c in range(0, a.size, step))


def verify_h5(tmp: str, written=()) -> None:
    """Read a just-written study file back: its metadata, every column, and the rows appended now."""
    try:
        with h5py.File(tmp, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise OSError(errno.EIO, "format attribute lost")
            if damaged_parts(f):
                raise OSError(errno.EIO, "attributes read back differently")
            json.loads(f.attrs["layout"])
            n = f["params"].shape[0]
            for name, d in f["checkpoints"].items():
                if d.shape[0] != n or len(d[:]) != n:
                    raise OSError(errno.EIO, f"column {name} lost rows")
            f["runs"].asstr()[:]
            back = np.empty((1, f["params"].shape[1]), np.float32)  # pages are touched only when rows are read
            for first, rows in written:  # a row at a time into one buffer, compared bit for bit in slices:
                for i, row in enumerate(rows):  # array_equal(equal_nan) made 2.75 rows of temporaries
                    f["params"].read_direct(back, np.s_[first + i : first + i + 1])
                    if not _same_bits(back[0], row):
                        raise OSError(errno.EIO, f"row {first + i} read back differently")
    except (KeyError, ValueError) as exc:
        raise OSError(errno.EIO, f"the new file does not read back ({first_line(exc)})") from None


# --- what the study says about itself: one checksum over its attributes, run table and labels -------------------
# HDF5 keeps variable-length strings in its global heap, which has no checksum: a flipped byte in the plan
# (e.g. "epochs": 40 -> 43) reads back as another valid plan. Numeric columns carry fletcher32, these do not.
ATTR_SUMS = "checksums"
_PARTS = {"plan": "the stored training plan", "layout": "the stored state layout", "model_spec": "the stored model spec",
          "dataset_spec": "the stored data set spec", "format": "the format attribute", "version": "the format version",
          "/runs": "the run table", "/checkpoints/label": "the checkpoint labels",
          ATTR_SUMS: f"the checksum attribute ({ATTR_SUMS})"}


def _blake(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _value_bytes(v) -> bytes:
    """An attribute value or string as h5py reads it, as bytes (a damaged UTF-8 string keeps its own bytes)."""
    if isinstance(v, str):
        return b"s" + v.encode("utf-8", "surrogateescape")
    if isinstance(v, bytes):
        return b"b" + v
    a = np.asarray(v)
    if a.dtype.kind == "O":
        return b"o" + b"".join(_value_bytes(x) for x in a.reshape(-1))
    return b"a" + a.dtype.str.encode() + repr(a.shape).encode() + a.tobytes()


def _sums(f: h5py.File) -> dict:
    out = {}
    for k in f.attrs:
        if k != ATTR_SUMS:
            try:
                out[k] = _blake(_value_bytes(f.attrs[k]))
            except (OSError, ValueError, TypeError):
                out[k] = "unreadable"
    for name in ("runs", "checkpoints/label"):
        d = f.get(name)
        if isinstance(d, h5py.Dataset):
            a = d[:]
            if a.dtype.kind == "O":  # strings: their lengths, then their bytes (one pass, no per-item hashing)
                vals = a.reshape(-1).tolist()
                if not all(map(bytes.__instancecheck__, vals)):
                    vals = [v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogateescape") for v in vals]
                out["/" + name] = _blake(np.fromiter(map(len, vals), np.int64, len(vals)).tobytes() + b"".join(vals))
            else:
                out["/" + name] = _blake(_value_bytes(a))
    return out


def seal(f: h5py.File) -> None:
    """Store the checksum of what the study says about itself (every write ends with it)."""
    sums = _sums(f)
    f.attrs[ATTR_SUMS] = json.dumps({"blake2b": sums, "self": _blake(json.dumps(sums, sort_keys=True).encode())},
                                    sort_keys=True)


def damaged_parts(f: h5py.File) -> list | None:
    """The parts that no longer match their checksum ([] when none); None for a file written before them."""
    if ATTR_SUMS not in f.attrs:
        return None
    try:
        stored = json.loads(f.attrs[ATTR_SUMS])
        sums = stored["blake2b"]
        if stored["self"] != _blake(json.dumps(sums, sort_keys=True).encode()):
            return [ATTR_SUMS]
    except (ValueError, TypeError, KeyError, OSError):
        return [ATTR_SUMS]
    now = _sums(f)
    return [k for k in sums if now.get(k) != sums[k]]


def check_sums(f: h5py.File, path: str) -> bool:
    """One line naming what changed; False for a file written before these checksums."""
    bad = damaged_parts(f)
    if bad:
        words = [_PARTS.get(k, f"attribute {k}") for k in bad]
        raise GlobScopeError(f"{path}: {', '.join(words)} {'is' if len(words) == 1 else 'are'} damaged (checksum "
                             f"mismatch); restore {os.path.basename(path)} from a backup")
    return bad is not None


_KINDS = {"run": ("iu", "integers"), "step": ("iu", "integers"), **{m: ("f", "floating-point numbers") for m in METRICS}}


def column_error(f: h5py.File) -> str | None:
    """A column or table of another type than GlobScope writes (None: all as they should be; missing ones
    are reported when they are read)."""
    g = f.get("checkpoints")
    cols = []
    if isinstance(g, h5py.Group):
        cols = [(f"column checkpoints/{c}", g.get(c), kinds, what) for c, (kinds, what) in _KINDS.items()]
        cols.append(("column checkpoints/label", g.get("label"), "S", "strings"))
    cols += [("run table runs", f.get("runs"), "S", "strings"),
             ("dataset params", f.get("params"), "f", "floating-point numbers")]
    for name, d, kinds, what in cols:
        if not isinstance(d, h5py.Dataset):
            continue
        text = h5py.check_string_dtype(d.dtype) is not None
        if not (text if kinds == "S" else not text and d.dtype.kind in kinds):
            return f"{name} holds {'string' if text else d.dtype.name} values, not {what}"
        if d.ndim != (2 if name == "dataset params" else 1):
            return f"{name} has {d.ndim} dimensions"
    return None
