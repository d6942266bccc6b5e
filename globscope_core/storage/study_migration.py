"""Migration of a study.h5 written by the previous release (see ``storage.study``'s ``Study`` for when it runs).

That release kept connect's curve and line as runs of study.h5 (fit, info and align took them for the ensemble) and
stored no plan (``train --resume`` took today's defaults, e.g. 10,000 evaluation samples for runs evaluated on 300).
These helpers find those runs, recover the plan the runs were trained with, and write stores in today's layout.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
from fractions import Fraction

import h5py
import numpy as np

from ..errors import GlobScopeError
from ..resources import format_bytes
from .safe_write import atomic_file, free_bytes
from .safe_write import reserve as _reserve
from .study_files import STUDY_H5, paths_h5
from .study_format import (
    ATTR_SUMS,
    FORMAT,
    LIBVER,
    METRICS,
    check_sums,
    damaged_parts,
    first_line,
    new_datasets,
    seal,
    verify_h5,
)


def connect_runs(runs) -> list:
    """Runs that connect kept in study.h5 before paths.h5 existed: labelled curve or line, with their connect key."""
    return [i for i, r in enumerate(runs) if isinstance(r, dict) and r.get("label") in ("curve", "line")
            and r.get("connect")]


def trained_run(r) -> bool:
    # a run of a training plan, as stages/train.py tells them (not imported, not a stored path), and not a run
    # of an aligned study (which copies its source's run objects)
    return isinstance(r, dict) and bool(r.get("complete")) and isinstance(r.get("seed"), int) \
        and isinstance(r.get("index"), int) and not r.get("imported") and r.get("label") not in ("curve", "line") \
        and "aligned_to" not in r


def _denominator(acc) -> int | None:
    """n when every accuracy is some k/n (evaluation stores correct / n); None when they do not tell."""
    n = 1
    for v in np.unique(np.asarray(acc, dtype=np.float64)):
        if not 0.0 <= v <= 1.0:  # NaN too
            return None
        n = math.lcm(n, Fraction(float(v)).limit_denominator(1 << 24).denominator)
        if n > 1 << 24:
            return None
    return n if n > 1 else None


def earlier_plan(study) -> dict | None:
    """The plan the previous release's runs were trained with (it stored none): their own settings, and the
    number of evaluation samples, which it kept nowhere: each accuracy is correct / n on the same n samples
    (n = min(--eval-samples, the split's size) per split, so the larger of the two counts is the setting or
    covers the whole split, which is the same subset)."""
    trained = [i for i, r in enumerate(study.runs) if trained_run(r)]
    if not trained:
        return None
    r = study.runs[trained[0]]
    plan = {"seed": r["seed"] - r["index"], **{k: r.get(k) for k in ("epochs", "batch_size", "every", "weight_decay")}}
    rows = np.isin(study.run, trained) & (study.labels == "train")
    counts = [n for n in (_denominator(study.metrics[m][rows]) for m in ("train_acc", "test_acc")) if n]
    if counts:
        plan["eval_samples"] = max(counts)
    return {k: v for k, v in plan.items() if v is not None}


def _need_space(directory: str, need: int, name: str) -> None:
    free = free_bytes(directory)
    if free is not None and free < need:
        raise GlobScopeError(f"no space left on {directory}: {name} unchanged (the new version needs about "
                             f"{format_bytes(need)}, {format_bytes(free)} free)")


def store_plan(study, plan: dict) -> None:
    """study.h5 with the plan of its runs (the caller holds the study's lock)."""
    need = os.path.getsize(study.h5_path) + (1 << 20)
    _need_space(study.dir, need, STUDY_H5)
    with atomic_file(study.h5_path, verify=verify_h5) as tmp:
        shutil.copyfile(study.h5_path, tmp)
        _reserve(tmp, need)
        with h5py.File(tmp, "r+") as f:
            f.attrs["plan"] = json.dumps(plan, sort_keys=True)
            seal(f)
            f.flush()


def attrs_of(h5_path: str, drop=()) -> dict:
    with h5py.File(h5_path, "r") as f:
        return {k: f.attrs[k] for k in f.attrs if k != ATTR_SUMS and k not in drop}


def move_paths(study, moved: list) -> dict:
    """Put the study's connect runs into paths.h5 (after the paths already there); {run in study.h5: in paths.h5}."""
    path = paths_h5(study.dir)
    before = []
    if os.path.exists(path):
        try:
            with h5py.File(path, "r") as f:
                check_sums(f, path)
                before = [json.loads(s) for s in f["runs"].asstr()[:]]
        except GlobScopeError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise GlobScopeError(f"{path}: unreadable paths file (damaged?) ({first_line(exc)})") from None
    where = {r.get("moved_run"): j for j, r in enumerate(before) if r.get("moved_from") == STUDY_H5}
    todo = [r for r in moved if r not in where]
    if not todo:
        return where
    # a curve that this version's connect stored later between the same runs supersedes the moved one
    newer = {(r.get("connect"), r.get("label")) for r in before if r.get("moved_from") != STUDY_H5
             and not r.get("superseded")}
    infos = []
    for r in todo:
        info = dict(study.runs[r], moved_from=STUDY_H5, moved_run=r)
        if (info.get("connect"), info.get("label")) in newer:
            info["superseded"] = True
        infos.append(info)
    parts = [(path, list(range(len(before))), before)] if before else []
    attrs = attrs_of(path) if before else attrs_of(study.h5_path, drop=("plan",))
    write_store(path, attrs, parts + [(study.h5_path, todo, infos)])
    where.update({r: len(before) + k for k, r in enumerate(todo)})
    return where


def _read_rows(d, idx):
    return d[int(idx[0]) : int(idx[-1]) + 1] if idx[-1] - idx[0] + 1 == len(idx) else d[idx]


def write_store(path: str, attrs: dict, parts: list) -> None:
    """A fresh store at ``path`` in today's layout (checksums, v110): ``attrs`` and, part after part, the runs
    ``(file, [run numbers], [run objects])`` names, renumbered in that order, with their rows in file order.
    Rows are copied in blocks and compared with their source after the file is closed, before it replaces
    ``path`` (which may be one of the sources)."""
    sel = []  # (file, rows, {old run: new run})
    first, n_params = 0, None
    for src, runs, infos in parts:
        with h5py.File(src, "r") as f:
            rows = np.nonzero(np.isin(f["checkpoints/run"][:], runs))[0]
            n_params = f["params"].shape[1]
        sel.append((src, rows, {r: first + k for k, r in enumerate(runs)}))
        first += len(runs)
    need = int(1.05 * sum(len(rows) for _, rows, _ in sel) * n_params * 4) + (1 << 20)
    _need_space(os.path.dirname(path), need, os.path.basename(path))
    block = max(1, (64 << 20) // (4 * n_params))

    def blocks():
        for src, rows, renum in sel:
            with h5py.File(src, "r") as s:
                for lo in range(0, len(rows), block):
                    idx = rows[lo : lo + block]
                    cols = {c: _read_rows(s["checkpoints"][c], idx) for c in ("run", "step", "label", *METRICS)}
                    cols["run"] = np.array([renum[int(r)] for r in cols["run"]], np.int32)
                    cols["label"] = [x.decode() if isinstance(x, bytes) else str(x) for x in cols["label"]]
                    yield _read_rows(s["params"], idx), cols

    def verify(tmp):
        try:
            with h5py.File(tmp, "r") as f:
                if f.attrs.get("format") != FORMAT or damaged_parts(f) != []:
                    raise OSError(errno.EIO, "attributes read back differently")
                n = 0
                for params, cols in blocks():
                    k = len(params)
                    same = np.array_equal(f["params"][n : n + k], params, equal_nan=True) and all(
                        np.array_equal(f["checkpoints"][c][n : n + k], cols[c], equal_nan=True)
                        for c in ("run", "step", *METRICS))
                    if not same or list(f["checkpoints/label"].asstr()[n : n + k]) != cols["label"]:
                        raise OSError(errno.EIO, f"rows {n}-{n + k - 1} read back differently")
                    n += k
                if n != f["params"].shape[0]:
                    raise OSError(errno.EIO, "rows lost")
        except (KeyError, ValueError) as exc:
            raise OSError(errno.EIO, f"the new file does not read back ({first_line(exc)})") from None

    with atomic_file(path, verify=verify) as tmp:
        with h5py.File(tmp, "w", libver=LIBVER) as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            new_datasets(f, n_params)
        _reserve(tmp, need)
        with h5py.File(tmp, "r+", libver=LIBVER) as f:
            infos = [json.dumps(i) for _, _, ins in parts for i in ins]
            f["runs"].resize((len(infos),))
            if infos:
                f["runs"][:] = infos
            n = 0
            for params, cols in blocks():
                k = len(params)
                f["params"].resize((n + k, n_params))
                f["params"][n:] = params
                for c, vals in cols.items():
                    f["checkpoints"][c].resize((n + k,))
                    f["checkpoints"][c][n:] = vals
                n += k
            seal(f)
            f.flush()
