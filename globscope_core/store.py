"""The study store: ``STUDY/study.h5`` (checkpoints and metadata) and ``STUDY/report.json``.

Layout of study.h5 (see shared/design.md):
  attrs   format="globscope-study", version, model_spec, dataset_spec, layout (JSON strings)
  params  float32 [N, P], chunked by rows: one flattened floating state per checkpoint
  checkpoints/{run, step, train_loss, train_acc, test_loss, test_acc, label}  one entry per row
  runs    one JSON object per run (seed, optimizer, lr, label, ...)

Crash safety: every write is a transaction on a copy (``study.h5.tmp-PID``) that replaces
study.h5 with an atomic rename only after it is complete and synced to disk. A process killed at
any moment leaves either the old or the new file, never a half-written one; stale temporaries are
removed by the next writer. Writers take an exclusive lock on ``STUDY/.lock``.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil

import h5py
import numpy as np

from .errors import GlobScopeError
from .flat import StateLayout

FORMAT = "globscope-study"
VERSION = 1
H5_NAME = "study.h5"
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")
_STR = h5py.string_dtype("utf-8")


def _row_chunks(n_params: int) -> tuple:
    # about 1 MiB per chunk, whole rows: reads are always by rows
    return (max(1, min(1024, (1 << 20) // max(1, 4 * n_params))), n_params)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write a file by temporary name + fsync + rename, so readers never see half of it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:  # a full disk leaves no stray temporary behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class Study:
    """A study directory. Metadata is read once; parameter rows are read on demand."""

    def __init__(self, directory: str):
        self.dir = os.path.abspath(directory)
        self.h5_path = os.path.join(self.dir, H5_NAME)
        self._load_meta()

    # --- opening ---------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str, model_spec: dict, dataset_spec: dict, layout: StateLayout) -> "Study":
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, H5_NAME)
        if os.path.exists(path):
            raise GlobScopeError(f"{path}: a study already exists here (use another --out, or --resume)")
        tmp = f"{path}.tmp-{os.getpid()}"
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["model_spec"] = json.dumps(model_spec)
            f.attrs["dataset_spec"] = json.dumps(dataset_spec)
            f.attrs["layout"] = layout.to_json()
            f.create_dataset("params", shape=(0, layout.size), maxshape=(None, layout.size), dtype="f4",
                             chunks=_row_chunks(layout.size))
            g = f.create_group("checkpoints")
            for name, dt in (("run", "i4"), ("step", "i8"), *((m, "f8") for m in METRICS), ("label", _STR)):
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))
            f.create_dataset("runs", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(256,))
        _fsync_path(tmp)
        os.replace(tmp, path)
        return cls(directory)

    @classmethod
    def open(cls, directory: str) -> "Study":
        path = os.path.join(directory, H5_NAME)
        if not os.path.isdir(directory):
            raise GlobScopeError(f"{directory}: study directory does not exist")
        if not os.path.exists(path):
            raise GlobScopeError(f"{path}: no study here (run 'globscope train --out {directory}' first)")
        return cls(directory)

    def _load_meta(self) -> None:
        try:
            with h5py.File(self.h5_path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise GlobScopeError(f"{self.h5_path}: not a GlobScope study (format attribute missing)")
                self.model_spec = json.loads(f.attrs["model_spec"])
                self.dataset_spec = json.loads(f.attrs["dataset_spec"])
                self.layout = StateLayout.from_json(f.attrs["layout"])
                g = f["checkpoints"]
                self.run = g["run"][:]
                self.step = g["step"][:]
                self.metrics = {m: g[m][:] for m in METRICS}
                self.labels = np.array([s.decode() if isinstance(s, bytes) else s for s in g["label"][:]], dtype=object)
                self.runs = [json.loads(s) for s in f["runs"].asstr()[:]]
                self.n_checkpoints, self.n_params = f["params"].shape
        except GlobScopeError:
            raise
        except (OSError, KeyError, ValueError) as exc:
            raise GlobScopeError(f"{self.h5_path}: unreadable study file: {exc}") from None

    # --- reading ---------------------------------------------------------------------------
    def read_params(self, rows=None) -> np.ndarray:
        """Parameter rows as float32 [k, P] (all rows if ``rows`` is None; keep that for small studies)."""
        with h5py.File(self.h5_path, "r") as f:
            d = f["params"]
            if rows is None:
                return d[:]
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            if rows.size == 0:
                return np.zeros((0, self.n_params), np.float32)
            order = np.argsort(rows, kind="stable")
            uniq, inverse = np.unique(rows[order], return_inverse=True)
            block = d[uniq]  # h5py wants increasing, unique indices
            out = np.empty((rows.size, self.n_params), np.float32)
            out[order] = block[inverse]
            return out

    def iter_params(self, block_rows: int | None = None, rows=None):
        """Yield ``(row_indices, block)`` of at most ``block_rows`` rows (about 256 MiB by default)."""
        if block_rows is None:
            block_rows = max(1, (256 << 20) // max(1, 4 * self.n_params))
        rows = np.arange(self.n_checkpoints) if rows is None else np.asarray(rows, dtype=np.int64)
        with h5py.File(self.h5_path, "r") as f:
            d = f["params"]
            for s in range(0, len(rows), block_rows):
                idx = rows[s : s + block_rows]
                contiguous = len(idx) and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1)
                yield idx, (d[idx[0] : idx[-1] + 1] if contiguous else self.read_params(idx))

    def run_rows(self, run: int, label: str | None = "train") -> np.ndarray:
        """Row indices of one run's checkpoints in step order (only rows with ``label`` if given)."""
        mask = self.run == run
        if label is not None:
            mask &= self.labels == label
        rows = np.nonzero(mask)[0]
        return rows[np.argsort(self.step[rows], kind="stable")]

    def final_rows(self, label: str | None = "train") -> dict:
        """{run: row of its last checkpoint} for every run that has checkpoints."""
        out = {}
        for r in range(len(self.runs)):
            rows = self.run_rows(r, label)
            if len(rows):
                out[r] = int(rows[-1])
        return out

    def build_model(self):
        from .models import build_model

        model = build_model(self.model_spec)
        if StateLayout.from_module(model) != self.layout:
            raise GlobScopeError(f"{self.h5_path}: the stored layout does not match model '{self.model_spec['name']}'")
        return model

    # --- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self):
        """``with study.transaction() as w: w.add_run(...); w.append(...)`` -- all or nothing."""
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for stale in glob.glob(self.h5_path + ".tmp-*"):
                os.remove(stale)
            tmp = f"{self.h5_path}.tmp-{os.getpid()}"
            shutil.copyfile(self.h5_path, tmp)
            try:
                with h5py.File(tmp, "r+") as f:
                    w = _Writer(f, self)
                    yield w
                    w._check_complete()
                _fsync_path(tmp)
                os.replace(tmp, self.h5_path)
                _fsync_path(self.dir)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        self._load_meta()

    # --- report.json -------------------------------------------------------------------------
    @property
    def report_path(self) -> str:
        return os.path.join(self.dir, "report.json")

    def read_report(self) -> dict:
        return read_report(self.dir)

    def update_report(self, key: str, value) -> None:
        update_report(self.dir, key, value)


class _Writer:
    def __init__(self, f: h5py.File, study: Study):
        self.f, self.study = f, study
        self.n_params = f["params"].shape[1]

    def add_run(self, **info) -> int:
        d = self.f["runs"]
        n = d.shape[0]
        d.resize((n + 1,))
        d[n] = json.dumps(info)
        return n

    def set_run(self, run: int, **info) -> None:
        d = self.f["runs"]
        cur = json.loads(d.asstr()[run])
        cur.update(info)
        d[run] = json.dumps(cur)

    def append(self, run: int, steps, params, label: str = "train", **metrics) -> None:
        """Append rows: ``params`` [k, P] (or [P]), ``steps`` [k], metrics named as in METRICS."""
        params = np.asarray(params, dtype=np.float32)
        if params.ndim == 1:
            params = params[None]
        k = params.shape[0]
        if params.shape[1] != self.n_params:
            raise GlobScopeError(f"{self.study.h5_path}: rows have {params.shape[1]} parameters, study has {self.n_params}")
        if not 0 <= run < self.f["runs"].shape[0]:
            raise GlobScopeError(f"{self.study.h5_path}: no run {run}")
        d = self.f["params"]
        n = d.shape[0]
        d.resize((n + k, self.n_params))
        d[n:] = params
        g = self.f["checkpoints"]
        cols = {"run": np.full(k, run), "step": np.broadcast_to(np.asarray(steps), (k,)),
                "label": [label] * k}
        for m in METRICS:
            cols[m] = np.broadcast_to(np.asarray(metrics.get(m, np.nan), dtype=np.float64), (k,))
        for name, vals in cols.items():
            g[name].resize((n + k,))
            g[name][n:] = vals

    def _check_complete(self) -> None:
        n = self.f["params"].shape[0]
        for name, d in self.f["checkpoints"].items():
            if d.shape[0] != n:
                raise GlobScopeError(f"{self.study.h5_path}: internal error, column {name} has {d.shape[0]} rows, params {n}")


def read_report(directory: str) -> dict:
    path = os.path.join(directory, "report.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise GlobScopeError(f"{path}: unreadable report: {exc}") from None


def update_report(directory: str, key: str, value) -> None:
    """Set ``report[key] = value`` atomically (other keys are kept)."""
    with open(os.path.join(directory, ".report.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = read_report(directory)
        report[key] = value
        atomic_write_bytes(os.path.join(directory, "report.json"),
                           json.dumps(report, indent=2, default=_json_default).encode())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o)}")


def final_summary(study: Study) -> list[dict]:
    """One dict per run: its last checkpoint's step and metrics."""
    out = []
    for r, row in study.final_rows().items():
        d = {"run": r, "step": int(study.step[row])}
        d.update({m: float(study.metrics[m][row]) for m in study.metrics})
        d.update({k: study.runs[r].get(k) for k in ("seed", "optimizer", "lr", "label")})
        out.append(d)
    return out
