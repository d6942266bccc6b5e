"""The study store: ``STUDY/study.h5`` (checkpoints and metadata) and ``STUDY/report.json``.

Layout of study.h5 (see shared/design.md):
  attrs   format="globscope-study", version, model_spec, dataset_spec, layout (JSON strings)
  params  float32 [N, P], chunked by rows: one flattened floating state per checkpoint
  checkpoints/{run, step, train_loss, train_acc, test_loss, test_acc, label}  one entry per row
  runs    one JSON object per run (seed, optimizer, lr, label, ...)

Crash safety: every write is a transaction on a copy (``study.h5.tmp-PID``) that replaces
study.h5 with an atomic rename only after it is complete, flushed (an HDF5 error at flush is an
error, never a warning), read back and compared, and synced to disk. A process killed at any
moment leaves either the old or the new file, never a half-written one; stale temporaries are
removed by the next writer. Writers take an exclusive lock on ``STUDY/.lock``. Every other file of
a study (reducers, landscapes, trees, images, report.json) goes through ``atomic_file``, the same
rule: a full disk or a read-only directory is one line naming the directory, and the old file
stays as it was.

Damage: ``study_format`` holds the datasets' checksums, the checksum of what HDF5 leaves unguarded (attributes,
run table, labels) and the column checks, all checked at every open. A study.h5 of the previous release (connect's
curve and line kept in it as runs, no stored plan) is migrated once, at its first open, under the lock
(``_upgrade`` here, its pieces in ``study_migration``).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil

import h5py
import numpy as np

from ..errors import GlobScopeError
from ..resources import format_bytes
from . import study_migration as migration
from .locks import dir_lock

# the shared write path (stdlib only, so vtk_files and render use it without h5py or torch)
from .safe_write import _probe_writable, atomic_file, atomic_write_bytes, free_bytes, note
from .safe_write import reserve as _reserve
from .state_layout import StateLayout
from .study_files import PATHS_H5, STUDY_H5, paths_h5, reducers_dir, report_json
from .study_format import (
    FORMAT,
    LIBVER,
    METRICS,
    VERSION,
    check_sums,
    column_error,
    copy_without_runs,
    first_line,
    new_datasets,
    seal,
    verify_h5,
)


class Study:
    """A study directory. Metadata is read once; parameter rows are read on demand.

    ``name`` is the HDF5 file in the directory: study.h5 (the ensemble), or paths.h5, where
    ``connect`` keeps its curve and line points apart from the ensemble (same layout).
    """

    def __init__(self, directory: str, name: str = STUDY_H5):
        self.dir = os.path.abspath(directory)
        self.h5_path = os.path.join(self.dir, name)
        self._load_meta()
        if name == STUDY_H5:
            self._upgrade_earlier()
        self._notes()

    # --- opening ---------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str, model_spec: dict, dataset_spec: dict, layout: StateLayout,
               plan: dict | None = None, name: str = STUDY_H5) -> "Study":
        path = os.path.join(directory, name)
        if os.path.exists(path):
            raise GlobScopeError(f"{path}: a study already exists here (use another --out, or --resume)")
        import io

        buf = io.BytesIO()  # an empty study is small: built in memory, so HDF5 never meets a full disk
        with h5py.File(buf, "w", libver=LIBVER) as f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["model_spec"] = json.dumps(model_spec)
            f.attrs["dataset_spec"] = json.dumps(dataset_spec)
            f.attrs["layout"] = layout.to_json()
            if plan is not None:
                f.attrs["plan"] = json.dumps(plan, sort_keys=True)
            new_datasets(f, layout.size)
            seal(f)
        with dir_lock(directory):  # two creators at once: the second is refused, never replaces the first's study
            if os.path.exists(path):
                raise GlobScopeError(f"{path}: a study already exists here (use another --out, or --resume)")
            atomic_write_bytes(path, buf.getvalue())
        return cls(directory, name)

    @classmethod
    def open(cls, directory: str, name: str = STUDY_H5) -> "Study":
        path = os.path.join(directory, name)
        if not os.path.isdir(directory):
            raise GlobScopeError(f"{directory}: study directory does not exist")
        if not os.path.exists(path):
            raise GlobScopeError(f"{path}: no study here (run 'globscope train --out {directory}' first)")
        return cls(directory, name)

    def _load_meta(self) -> None:
        try:
            with h5py.File(self.h5_path, "r") as f:
                bad = column_error(f)  # a column of another type reads as no runs, no rows: never silently
                if bad:
                    raise GlobScopeError(f"{self.h5_path}: damaged study file: {bad}")
                self.attrs_checked = check_sums(f, self.h5_path)
                if f.attrs.get("format") != FORMAT:
                    raise GlobScopeError(f"{self.h5_path}: not a GlobScope study (format attribute missing)")
                self.model_spec = json.loads(f.attrs["model_spec"])
                self.dataset_spec = json.loads(f.attrs["dataset_spec"])
                self.layout = StateLayout.from_json(f.attrs["layout"])
                self.plan = json.loads(f.attrs["plan"]) if "plan" in f.attrs else None
                g = f["checkpoints"]
                self.run = g["run"][:]
                self.step = g["step"][:]
                self.metrics = {m: g[m][:] for m in METRICS}
                self.labels = np.array([s.decode() if isinstance(s, bytes) else s for s in g["label"][:]], dtype=object)
                self.runs = [json.loads(s) for s in f["runs"].asstr()[:]]
                self.n_checkpoints, self.n_params = f["params"].shape
                self.checksums = bool(f["params"].fletcher32)
                n = self.n_checkpoints
                bad = [c for c in ("run", "step", "label", *METRICS) if g[c].shape[0] != n]
                if bad:
                    raise GlobScopeError(f"{self.h5_path}: damaged study file: columns {', '.join(bad)} do not have "
                                         f"one entry per checkpoint ({n})")
        except GlobScopeError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise GlobScopeError(f"{self.h5_path}: unreadable study file (damaged?) "
                                 f"({first_line(exc)})") from None

    def _upgrade_earlier(self) -> None:
        """Migrate a study.h5 of the previous release once (see ``_upgrade``)."""
        if migration.connect_runs(self.runs) or (self.plan is None and any(map(migration.trained_run, self.runs))):
            _upgrade(self)

    def _notes(self) -> None:
        if not self.checksums:
            note(f"{self.h5_path} was written before GlobScope stored checksums: damage to its parameters "
                 "cannot be detected")
        elif not self.attrs_checked:
            note(f"{self.h5_path} was written before GlobScope checked its attributes (plan, layout, specs): "
                 "damage to them is detected from its next write on")

    # --- reading ---------------------------------------------------------------------------
    def _rows_error(self, d, rows, exc) -> GlobScopeError:
        """Name the rows whose chunks no longer match their checksum (or cannot be read)."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        per = d.chunks[0] if d.chunks else max(1, len(rows))
        bad = []
        for c in np.unique(rows // per):
            lo, hi = int(c * per), int(min((c + 1) * per, d.shape[0]))
            try:
                d[lo:hi]
            except OSError:
                bad.append(f"{lo}-{hi - 1}" if hi - 1 > lo else str(lo))
        what = "checksum mismatch" if "filter" in str(exc).lower() or "checksum" in str(exc).lower() else "unreadable"
        where = f"rows {', '.join(bad)}" if bad else "parameter rows"
        return GlobScopeError(f"{self.h5_path}: {where} damaged ({what}); restore the file from a backup "
                              "or re-import those runs")

    def _open_params(self):
        try:
            return h5py.File(self.h5_path, "r")
        except OSError as exc:
            raise GlobScopeError(f"{self.h5_path}: unreadable study file (damaged?) ({first_line(exc)})") from None

    def read_params(self, rows=None) -> np.ndarray:
        """Parameter rows as float32 [k, P] (all rows if ``rows`` is None; keep that for small studies)."""
        with self._open_params() as f:
            d = f["params"]
            if rows is None:
                try:
                    return d[:]
                except OSError as exc:
                    raise self._rows_error(d, np.arange(d.shape[0]), exc) from None
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            if rows.size == 0:
                return np.zeros((0, self.n_params), np.float32)
            order = np.argsort(rows, kind="stable")
            uniq, inverse = np.unique(rows[order], return_inverse=True)
            try:
                block = d[uniq]  # h5py wants increasing, unique indices
            except OSError as exc:
                raise self._rows_error(d, uniq, exc) from None
            if uniq.size == rows.size and np.array_equal(order, np.arange(rows.size)):
                # increasing rows: h5py's array as it is (12 rows of 1.2e8 parameters are 6 GB a copy)
                return np.asarray(block, np.float32)
            out = np.empty((rows.size, self.n_params), np.float32)
            for i, j in zip(order, inverse):  # row by row: out[order] = block[inverse] made a third copy
                out[i] = block[j]
            return out

    def iter_params(self, block_rows: int | None = None, rows=None, reuse: bool = False):
        """Yield ``(row_indices, block)`` of at most ``block_rows`` rows (about 256 MiB by default).

        ``reuse``: the caller is done with each block before it asks for the next, and may overwrite it; every
        block is then read into one buffer. A fresh block per read is fresh memory while the one before it is
        still referenced: with HDF5's chunk buffer, three rows at once (1.5 GB at 1.2e8 parameters), not two."""
        if block_rows is None:
            block_rows = max(1, (256 << 20) // max(1, 4 * self.n_params))
        rows = np.arange(self.n_checkpoints) if rows is None else np.asarray(rows, dtype=np.int64)
        buf = np.empty((min(block_rows, len(rows)), self.n_params), np.float32) if reuse and len(rows) else None
        with self._open_params() as f:
            d = f["params"]
            for s in range(0, len(rows), block_rows):
                idx = rows[s : s + block_rows]
                contiguous = len(idx) and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1)
                try:
                    if buf is not None:  # (first row in block, first and last + 1 in the file) of each read
                        block = buf[: len(idx)]
                        spans = [(0, idx[0], idx[-1] + 1)] if contiguous else [(i, r, r + 1) for i, r in enumerate(idx)]
                        for i, lo, hi in spans:
                            d.read_direct(block, np.s_[lo:hi], np.s_[i : i + hi - lo])
                    elif contiguous:
                        block = d[idx[0] : idx[-1] + 1]
                    else:
                        block = self.read_params(idx)
                except OSError as exc:
                    raise self._rows_error(d, idx, exc) from None
                yield idx, block

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

    def final_row(self, run: int) -> int:
        """Row of ``run``'s last checkpoint (its last training checkpoint when it has any)."""
        if not 0 <= run < len(self.runs):
            raise GlobScopeError(f"{self.h5_path}: no run {run} (the study has {len(self.runs)} runs)")
        rows = self.run_rows(run)
        if not len(rows):
            rows = self.run_rows(run, label=None)
        if not len(rows):
            raise GlobScopeError(f"{self.h5_path}: run {run} has no checkpoints")
        return int(rows[-1])

    # --- writing ---------------------------------------------------------------------------
    def lock(self, name: str = ".lock", wait: bool = True, what: str = "another writer"):
        return dir_lock(self.dir, name, wait, what)

    @contextlib.contextmanager
    def transaction(self, extra_bytes: int = 0, drop_runs=()):
        """``with study.transaction() as w: w.add_run(...); w.append(...)`` -- all or nothing.

        The new file is flushed, closed, read back (metadata, and the appended rows compared with what
        was written) before it replaces the old one; ``extra_bytes`` (the size of what will be added)
        lets a full disk be refused before the copy is made. ``drop_runs``: runs whose rows the new file
        leaves out (their entries stay, so run numbers hold; ``w.replace_run`` gives them new contents).
        """
        with self.lock():
            for stale in glob.glob(self.h5_path + ".tmp-*"):
                with contextlib.suppress(OSError):
                    os.remove(stale)
            # the copy, what is added (chunks round up: +5%), and HDF5's metadata
            need = os.path.getsize(self.h5_path) + int(1.05 * extra_bytes) + (1 << 20)
            free = free_bytes(self.dir)
            if free is not None and free < need:
                raise GlobScopeError(f"no space left on {self.dir}: {os.path.basename(self.h5_path)} unchanged "
                                     f"(the new version needs about {format_bytes(need)}, {format_bytes(free)} free)")
            written = []
            with atomic_file(self.h5_path, verify=lambda tmp: verify_h5(tmp, written)) as tmp:
                if drop_runs:
                    copy_without_runs(self.h5_path, tmp, drop_runs)
                else:
                    shutil.copyfile(self.h5_path, tmp)
                _reserve(tmp, need)
                with h5py.File(tmp, "r+", libver=LIBVER if self.checksums else None) as f:
                    w = _Writer(f, self, written)
                    yield w
                    w._check_complete()
                    seal(f)
                    f.flush()  # raises here, instead of a warning at close, when the disk is full
        self._load_meta()

    # --- the training plan -----------------------------------------------------------------------
    def set_plan(self, plan: dict) -> None:
        with self.transaction() as w:
            w.f.attrs["plan"] = json.dumps(plan, sort_keys=True)

    # --- report.json -------------------------------------------------------------------------
    @property
    def report_path(self) -> str:
        return report_json(self.dir)

    def read_report(self) -> dict:
        return read_report(self.dir)

    def update_report(self, key: str, value) -> None:
        update_report(self.dir, key, value)


def paths_store(study: Study, create: bool = False) -> Study | None:
    """``STUDY/paths.h5`` (connect's points) as a Study, or None when there is none (created if asked)."""
    path = paths_h5(study.dir)
    if os.path.exists(path):
        return Study(study.dir, PATHS_H5)
    if not create:
        return None
    return Study.create(study.dir, study.model_spec, study.dataset_spec, study.layout, name=PATHS_H5)


class RowUnion:
    """The rows of several stores as one read-only source (e.g. the ensemble plus connect's paths),
    for fitting a reducer on both; row numbers run through the parts in order."""

    def __init__(self, *parts: Study):
        self.parts = parts
        s0 = parts[0]
        self.dir, self.h5_path, self.layout, self.n_params = s0.dir, s0.h5_path, s0.layout, s0.n_params
        self.model_spec, self.dataset_spec = s0.model_spec, s0.dataset_spec
        self.offsets = np.cumsum([0] + [p.n_checkpoints for p in parts])
        self.n_checkpoints = int(self.offsets[-1])
        self.metrics = {m: np.concatenate([p.metrics[m] for p in parts]) for m in METRICS}

    def read_params(self, rows=None) -> np.ndarray:
        rows = np.arange(self.n_checkpoints) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.n_params), np.float32)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        for k, p in enumerate(self.parts):
            sel = np.nonzero(part == k)[0]
            if len(sel):
                out[sel] = p.read_params(rows[sel] - self.offsets[k])
        return out

    def iter_params(self, block_rows: int | None = None, rows=None, reuse: bool = False):
        if rows is not None:  # rows in any order across the parts: a fresh block each time (reuse allows that)
            rows = np.asarray(rows, dtype=np.int64)
            step = block_rows or max(1, (256 << 20) // max(1, 4 * self.n_params))
            for s in range(0, len(rows), step):
                yield rows[s : s + step], self.read_params(rows[s : s + step])
            return
        for k, p in enumerate(self.parts):
            for idx, block in p.iter_params(block_rows, reuse=reuse):
                yield idx + self.offsets[k], block


class _Writer:
    def __init__(self, f: h5py.File, study: Study, written: list | None = None):
        self.f, self.study = f, study
        self.n_params = f["params"].shape[1]
        self.written = written if written is not None else []  # (first row, rows) to compare after close

    def add_run(self, **info) -> int:
        d = self.f["runs"]
        n = d.shape[0]
        d.resize((n + 1,))
        d[n] = json.dumps(info)
        return n

    def replace_run(self, run: int, **info) -> None:
        """The run's entry becomes ``info`` (an entry whose rows ``drop_runs`` left out, reused)."""
        self.f["runs"][run] = json.dumps(info)

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
        self.written.append((n, params))
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
    """report.json, or {} when it is missing or damaged: it is derived, so damage costs a note, not the stage."""
    path = report_json(directory)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as fh:
            report = json.load(fh)
        if not isinstance(report, dict):
            raise ValueError("not a JSON object")
        return report
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        note(f"{path} is damaged ({first_line(exc)}); it is rebuilt from the sections written from now on")
        return {}


def update_report(directory: str, key: str, value) -> None:
    """Set ``report[key] = value`` atomically (other keys are kept): read, change and write under one lock."""
    with dir_lock(directory, ".report.lock", what="report.json writer", output=report_json(directory), make_dir=False):
        path = report_json(directory)
        report = read_report(directory)
        if not report and os.path.exists(path) and os.path.getsize(path):
            with contextlib.suppress(OSError):  # damaged: keep it aside for the curious, rebuild the rest
                os.replace(path, path + ".damaged")
        report[key] = value
        atomic_write_bytes(report_json(directory),
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


# --- a study.h5 of the previous release ----------------------------------------------------------------------
def _upgrade(study: Study) -> None:
    """Migrate a study.h5 written by the previous release, once, under the study's lock.

    That release kept connect's curve and line as runs of study.h5 (fit, info and align took them for the
    ensemble) and stored no plan (``train --resume`` took today's defaults, e.g. 10,000 evaluation samples
    for runs evaluated on 300). The paths go to paths.h5 first, each marked with the run it was (an
    interrupted migration is finished by the next open, never repeated), the report's connect sections
    follow them, then study.h5 is rewritten without them and with the plan of its runs (and checksums).
    """
    moved = migration.connect_runs(study.runs)
    if _probe_writable(study.dir) is not None:
        if moved:
            raise GlobScopeError(f"{study.h5_path}: written by an earlier GlobScope that kept {len(moved)} connect "
                                 f"paths in it; {study.dir} is not writable, so they cannot be moved to {PATHS_H5} "
                                 "(copy the study somewhere writable)")
        return  # only the plan is missing: stored at the first open with write access
    with study.lock():
        study._load_meta()  # another command may have migrated it while this one waited
        moved = migration.connect_runs(study.runs)
        plan = migration.earlier_plan(study) if study.plan is None else None
        if not moved and plan is None:
            return
        if moved:
            where = migration.move_paths(study, moved)
            _follow_in_report(study, where)
            gone = set(moved)
            keep = [r for r in range(len(study.runs)) if r not in gone]
            attrs = migration.attrs_of(study.h5_path)
            if plan is not None:
                attrs["plan"] = json.dumps(plan, sort_keys=True)
            migration.write_store(study.h5_path, attrs, [(study.h5_path, keep, [study.runs[r] for r in keep])])
        else:
            try:
                migration.store_plan(study, plan)
            except GlobScopeError as exc:  # a full disk: the study reads as before; the plan waits for the next open
                note(f"{exc} (the plan of its runs is stored at the next open)")
                return
    study._load_meta()
    said = [f"epochs {plan['epochs']}" if "epochs" in (plan or {}) else "",
            f"{plan['eval_samples']} evaluation samples" if "eval_samples" in (plan or {}) else ""]
    stored = plan is not None and f"stored the plan its runs were trained with ({', '.join(w for w in said if w)})"
    if not moved:
        note(f"{study.h5_path}: {stored} (written by an earlier GlobScope)")
        return
    rdir = reducers_dir(study.dir)
    refit = os.path.isdir(rdir) and any(n.endswith(".pt") for n in os.listdir(rdir))  # fitted with the paths
    note("; ".join([f"{study.h5_path}: moved {len(moved)} connect paths to {PATHS_H5} (written by an earlier "
                    "GlobScope)", *([stored] if stored else []), *(["fit its reducers again"] if refit else [])]))


def _follow_in_report(study: Study, where: dict) -> None:
    """The report's connect sections name their runs in paths.h5, as connect writes them today."""
    for key, sec in read_report(study.dir).items():
        if isinstance(sec, dict) and sec.get("key") == key and "points_file" not in sec \
                and sec.get("curve_run") in where:
            update_report(study.dir, key, dict(sec, points_file=PATHS_H5, curve_run=where[sec["curve_run"]],
                                               line_run=where.get(sec.get("line_run"))))
