"""Faults in what a study says about itself (storage/study.py, reducers/base.py), issue 24 items 7 and 8.

HDF5 keeps string attributes and string datasets in its global heap, which has no checksum: one flipped byte in
the stored plan read back as another valid plan. Every case here changes real bytes of a real study (or writes a
study exactly as the previous release wrote it) and asserts one line naming the file, nothing lost, and the
commands the issue names (info, fit, align, train --resume) doing the right thing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import make_study

from globscope_core.cli import main
from globscope_core.reducers import fit_reducer, load_reducer
from globscope_core.stages.connect import connect
from globscope_core.storage import safe_write
from globscope_core.storage import study_migration as migration
from globscope_core.storage.study import METRICS, Study
from globscope_core.storage.study_format import ATTR_SUMS

TRAIN = ["train", "--dataset", "digits", "--model", "mlp", "--model-arg", "widths=[16]", "--out"]
EVAL = 300  # the evaluation samples the studies here are trained with (the case)


def cli(capsys, *argv):
    """Run a subcommand in-process: (exit status, stdout, the lines on stderr that are not progress bars)."""
    safe_write._NOTED.clear()  # notes are once per process: each call here is a new command
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    lines = [ln.split("\r")[-1] for ln in err.splitlines()]
    lines = [ln for ln in lines if ln.strip() and "it/s" not in ln and "s/it" not in ln and "|" not in ln]
    return rc, out, lines


def one_error(capsys, *argv, match):
    rc, _, lines = cli(capsys, *argv)
    errors = [ln for ln in lines if ": error: " in ln]
    assert rc == 2 and len(errors) == 1, (argv, rc, lines)
    assert match in errors[0], (match, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """3 runs of a 64-16-10 MLP (2 epochs, 300 evaluation samples), pca-2d and pca-3d, and one connect (curve and
    line, 5 points each) between runs 0 and 1 in paths.h5, as this version writes it."""
    d = tmp_path_factory.mktemp("faults-study") / "study"
    s = make_study(d, runs=3, epochs=2, widths=(16,), eval_samples=EVAL)
    connect(str(d), runs=(0, 1), epochs=1, points=5, plane_resolution=0, progress=False)
    fit_reducer(s, "pca", 2)
    fit_reducer(s, "pca", 3)
    return str(d)


def _copy(base, dst):
    shutil.copytree(base, dst)
    return str(dst)


def _read(path):
    with open(path, "rb") as fh:
        return bytearray(fh.read())


def _flip_in(path, value: bytes, pick=None):
    """Change one byte inside the stored ``value`` (a digit to another digit, a letter to another letter: the text
    stays valid JSON, so only a checksum can tell). A value written more than once leaves its old copies in the
    file's free space: the same byte is changed in each, so the live one is surely hit."""
    data = _read(path)
    starts = [i for i in range(len(data)) if data.startswith(value, i)]
    assert starts, value[:40]
    alnum = [i for i in range(len(value)) if chr(value[i]).isalnum()]
    at = pick(value) if pick else alnum[len(alnum) // 2]
    for start in starts:
        c = chr(data[start + at])
        data[start + at] = ord(str((int(c) + 1) % 10) if c.isdigit() else
                               ("a" if c == "z" else "A" if c == "Z" else chr(ord(c) + 1)))
    with open(path, "wb") as fh:
        fh.write(data)


# --- item 7: the attributes, the run table and the labels carry a checksum ----------------------------------
PARTS = {"plan": "the stored training plan", "layout": "the stored state layout", "model_spec": "the stored model spec",
         "dataset_spec": "the stored data set spec", "format": "the format attribute", "runs": "the run table",
         "label": "the checkpoint labels", "version": "the format version"}


def _damage(path, part):
    with h5py.File(path, "r") as f:
        attrs = {k: f.attrs[k] for k in f.attrs}
        first_run = f["runs"].asstr()[0]
    if part == "plan":  # the case: "epochs": 2 becomes "epochs": 3
        value = attrs["plan"].encode()
        _flip_in(path, value, pick=lambda v: v.find(b'"epochs": ') + len(b'"epochs": '))
    elif part == "runs":
        _flip_in(path, first_run.encode())
    elif part == "label":  # each label is its own heap object, padded to 8 bytes
        data = _read(path)
        off = data.find(b"train\0\0\0")
        assert off > 0
        data[off + 2] = ord("b")  # "train" -> "trbin"
        with open(path, "wb") as fh:
            fh.write(data)
    elif part == "version":  # an integer lives in the object header (HDF5 checksums it): changed by another tool
        with h5py.File(path, "r+") as f:
            f.attrs["version"] = 2
    else:
        _flip_in(path, attrs[part].encode())


@pytest.mark.parametrize("part", list(PARTS))
def test_a_changed_attribute_is_one_line_in_every_command(base, tmp_path, capsys, part):
    d = _copy(base, tmp_path / "s")
    path = os.path.join(d, "study.h5")
    _damage(path, part)
    msg = f"{path}: {PARTS[part]} is damaged (checksum mismatch)"
    for argv in (["info", d], ["fit", d, "--reducer", "pca", "--no-eval"], [*TRAIN, d, "--resume", "--runs", 4]):
        one_error(capsys, *argv, match=msg)
    assert Study.open(base).n_checkpoints  # the source is intact (the copy alone was damaged)


def test_a_study_without_the_attribute_checksum_opens_with_a_note_and_gets_it_at_its_next_write(base, tmp_path,
                                                                                                 capsys):
    d = _copy(base, tmp_path / "s")
    path = os.path.join(d, "study.h5")
    with h5py.File(path, "r+") as f:  # as this version's predecessor wrote it
        del f.attrs[ATTR_SUMS]
    rc, out, lines = cli(capsys, "info", d)
    assert rc == 0 and len([ln for ln in lines if "before GlobScope checked its attributes" in ln]) == 1, lines
    s = Study.open(d)
    s.set_plan(dict(s.plan))  # any write seals it
    with h5py.File(path, "r") as f:
        assert ATTR_SUMS in f.attrs
    rc, out, lines = cli(capsys, "info", d)
    assert rc == 0 and not lines, lines
    _damage(path, "plan")  # and from now on it is checked
    one_error(capsys, "info", d, match=f"{path}: the stored training plan is damaged (checksum mismatch)")


COLUMNS = {"run-float": ("run", np.float64, "column checkpoints/run holds float64 values, not integers"),
           "run-string": ("run", str, "column checkpoints/run holds string values, not integers"),
           "step-float": ("step", np.float32, "column checkpoints/step holds float32 values, not integers"),
           "loss-string": ("train_loss", str, "column checkpoints/train_loss holds string values, not floating"),
           "label-int": ("label", np.int32, "column checkpoints/label holds int32 values, not strings")}


@pytest.mark.parametrize("case", list(COLUMNS))
def test_a_column_of_another_type_is_one_line(base, tmp_path, capsys, case):
    col, dtype, text = COLUMNS[case]
    d = _copy(base, tmp_path / "s")
    path = os.path.join(d, "study.h5")
    with h5py.File(path, "r+") as f:  # written by another tool: valid HDF5, checksums intact
        g = f["checkpoints"]
        vals = g[col][:]
        del g[col]
        if dtype is str:
            g.create_dataset(col, data=np.array([str(v) for v in vals], dtype=h5py.string_dtype()))
        else:
            g.create_dataset(col, data=np.arange(len(vals), dtype=dtype) if col == "label" else vals.astype(dtype))
    for argv in (["info", d], ["fit", d, "--reducer", "pca", "--no-eval"]):
        one_error(capsys, *argv, match=f"{path}: damaged study file: {text}")


MISLABELLED = {"3d-as-2d": ("pca-3d", "pca-2d"), "2d-as-3d": ("pca-2d", "pca-3d"), "pca-as-kpca": ("pca-2d", "kpca-2d")}


@pytest.mark.parametrize("case", list(MISLABELLED))
def test_a_reducer_under_another_name_is_refused(base, tmp_path, capsys, case):
    src, dst = MISLABELLED[case]
    d = _copy(base, tmp_path / "s")
    rdir = os.path.join(d, "reducers")
    shutil.copyfile(os.path.join(rdir, f"{src}.pt"), os.path.join(rdir, f"{dst}.pt"))
    files = lambda: sorted(f for f in os.listdir(d) if not f.startswith("."))  # noqa: E731 (locks aside)
    before = files()
    one_error(capsys, "landscape", d, "--reducer", dst, "--resolution", 5, "--eval-samples", 64, "--no-progress",
              match=f"{rdir}/{dst}.pt: holds a {src[-2]}-dimensional pca reducer ({src}), not what its name says")
    assert files() == before and not [f for f in before if f.startswith("landscape-")]  # no landscape written
    with pytest.raises(Exception, match="not what its name says"):
        load_reducer(Study.open(d), dst)


# --- item 8: a study of the previous release is migrated once -------------------------------------------------
def _old_study(base, dst, order, superseded=()):
    """study.h5 exactly as the previous release (0f6e9e5, store.py + connect.py) wrote it: default HDF5 format, no
    checksums, no plan; connect's curve and line appended as runs labelled curve and line, an earlier curve between
    the same runs marked superseded. ``order``: ("study" | "paths", run) in the order the runs were stored."""
    os.makedirs(dst)
    for name in ("reducers", "report.json"):
        src = os.path.join(base, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, os.path.join(dst, name))
    new_of = {}
    with h5py.File(os.path.join(base, "study.h5"), "r") as s, h5py.File(os.path.join(base, "paths.h5"), "r") as p, \
            h5py.File(os.path.join(dst, "study.h5"), "w") as f:
        for k in ("format", "version", "model_spec", "dataset_spec", "layout"):
            f.attrs[k] = s.attrs[k]
        n_params = s["params"].shape[1]
        f.create_dataset("params", shape=(0, n_params), maxshape=(None, n_params), dtype="f4",
                         chunks=(max(1, min(1024, (1 << 20) // (4 * n_params))), n_params))
        g = f.create_group("checkpoints")
        text = h5py.string_dtype("utf-8")
        for name, dt in (("run", "i4"), ("step", "i8"), *((m, "f8") for m in METRICS), ("label", text)):
            g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))
        f.create_dataset("runs", shape=(0,), maxshape=(None,), dtype=text, chunks=(256,))
        for k, (which, r) in enumerate(order):
            src = s if which == "study" else p
            info = json.loads(src["runs"].asstr()[r])
            if k in superseded:
                info["superseded"] = True
            f["runs"].resize((k + 1,))
            f["runs"][k] = json.dumps(info)
            rows = np.nonzero(src["checkpoints/run"][:] == r)[0]
            n, m = f["params"].shape[0], len(rows)
            f["params"].resize((n + m, n_params))
            f["params"][n:] = src["params"][rows[0] : rows[-1] + 1]
            for c in ("run", "step", "label", *METRICS):
                g[c].resize((n + m,))
                g[c][n:] = np.full(m, k) if c == "run" else (
                    src["checkpoints"][c].asstr()[rows[0] : rows[-1] + 1] if c == "label"
                    else src["checkpoints"][c][rows[0] : rows[-1] + 1])
            new_of[(which, r)] = k
    # the report's connect section as the previous release wrote it: runs of study.h5, no points_file
    with open(os.path.join(dst, "report.json")) as fh:
        report = json.load(fh)
    sec = report.pop("connect-0-1")
    if ("paths", 0) in new_of:
        sec.pop("points_file")
        sec["curve_run"], sec["line_run"] = new_of[("paths", 0)], new_of.get(("paths", 1))
        report["connect-0-1"] = sec
    with open(os.path.join(dst, "report.json"), "w") as fh:
        json.dump(report, fh)
    return str(dst)


def _rows(h5, runs):
    """{run number in the file: (params, steps, labels, train_acc)} of the given runs."""
    with h5py.File(h5, "r") as f:
        col = f["checkpoints/run"][:]
        return {r: (f["params"][col == r], f["checkpoints/step"][col == r],
                    list(f["checkpoints/label"].asstr()[:][col == r]), f["checkpoints/train_acc"][col == r])
                for r in runs}


def _same_rows(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a[:2] + a[3:], b[:2] + b[3:])) and a[2] == b[2]


OLD = {  # case: (runs in the order the previous release stored them, superseded ones, connect paths moved)
    "curve-and-line": ([("study", 0), ("study", 1), ("paths", 0), ("paths", 1)], (), 2),
    "curve-only": ([("study", 0), ("study", 1), ("paths", 0)], (), 1),  # connect --no-line
    "run-trained-after-connect": ([("study", 0), ("study", 1), ("paths", 0), ("paths", 1), ("study", 2)], (), 2),
    "connected-twice": ([("study", 0), ("study", 1), ("paths", 0), ("paths", 1), ("paths", 0), ("paths", 1)],
                        (2, 3), 4),
    "no-connect": ([("study", 0), ("study", 1)], (), 0),  # only the plan is missing
}


@pytest.mark.parametrize("case", list(OLD))
def test_a_study_of_the_previous_release_is_migrated_once(base, tmp_path, capsys, case):
    order, superseded, n_moved = OLD[case]
    d = _old_study(base, tmp_path / "old", order, superseded)
    trained = [r for w, r in order if w == "study"]
    path, paths = os.path.join(d, "study.h5"), os.path.join(d, "paths.h5")
    # the first command migrates it, with one note ...
    rc, out, lines = cli(capsys, "info", d)
    notes = [ln for ln in lines if "written by an earlier GlobScope" in ln]
    assert rc == 0 and len(notes) == 1, lines
    plan = f"stored the plan its runs were trained with (epochs 2, {EVAL} evaluation samples)"
    assert notes[0].endswith(f"{path}: moved {n_moved} connect paths to paths.h5 (written by an earlier GlobScope); "
                             f"{plan}; fit its reducers again" if n_moved else
                             f"{path}: {plan} (written by an earlier GlobScope)"), notes[0]
    assert f"runs       {len(trained)}\n" in out and out.count("  run ") == len(trained), out
    assert (f"paths      {n_moved} connect paths, {5 * n_moved} points in {paths}" in out) == bool(n_moved), out
    # ... and the second says nothing (but that a study without checksums has none, when it was not rewritten)
    rc, out2, lines = cli(capsys, "info", d)
    assert rc == 0 and out2 == out and [ln for ln in lines if "stored checksums" not in ln or n_moved] == [], lines
    # nothing lost: the trained rows in study.h5 (renumbered in order), connect's in paths.h5, bit for bit
    src_s, src_p = _rows(os.path.join(base, "study.h5"), [0, 1, 2]), _rows(os.path.join(base, "paths.h5"), [0, 1])
    now_s, now_p = _rows(path, range(len(trained))), _rows(paths, range(n_moved)) if n_moved else {}
    assert all(_same_rows(now_s[k], src_s[r]) for k, r in enumerate(trained))
    moved = [r for w, r in order if w == "paths"]
    assert all(_same_rows(now_p[k], src_p[r]) for k, r in enumerate(moved))
    s = Study.open(d)
    if n_moved:
        p = Study(d, "paths.h5")
        was = [i for i, (w, _) in enumerate(order) if w == "paths"]  # where each moved path was in study.h5
        assert [bool(r.get("superseded")) for r in p.runs] == [i in superseded for i in was]
        assert [r["moved_run"] for r in p.runs] == was and all(r["moved_from"] == "study.h5" for r in p.runs)
        report = s.read_report()["connect-0-1"]
        assert report["points_file"] == "paths.h5"
        assert p.runs[report["curve_run"]]["label"] == "curve" and not p.runs[report["curve_run"]].get("superseded")
        if report["line_run"] is not None:
            assert p.runs[report["line_run"]]["label"] == "line" and not p.runs[report["line_run"]].get("superseded")
    else:
        assert not os.path.exists(paths)
    # fit sees the trained rows only
    assert cli(capsys, "fit", d, "--reducer", "pca", "--no-eval")[0] == 0
    assert load_reducer(Study.open(d), "pca-2d").embedding_.shape[0] == s.n_checkpoints == sum(
        len(src_s[r][1]) for r in trained)
    # align counts the real runs
    assert cli(capsys, "align", d, "--out", tmp_path / "aligned", "--alphas", 3, "--eval-samples", 64)[0] == 0
    assert len(Study.open(str(tmp_path / "aligned")).runs) == len(trained)
    # --resume continues the runs' plan: their 300 evaluation samples, not today's default 10,000
    rc, _, lines = cli(capsys, *TRAIN, d, "--resume", "--runs", len(trained) + 1)
    assert rc == 0, lines
    s = Study.open(d)
    assert s.plan["eval_samples"] == EVAL and len(s.runs) == len(trained) + 1
    acc = np.concatenate([s.metrics[m][s.run == len(trained)] for m in ("train_acc", "test_acc")])
    assert np.allclose(acc * EVAL, np.round(acc * EVAL), atol=1e-6), acc * EVAL


def test_an_interrupted_migration_is_finished_by_the_next_open(base, tmp_path, capsys, monkeypatch):
    d = _old_study(base, tmp_path / "old", OLD["curve-and-line"][0])
    real = migration.write_store
    calls = []

    def fail_on_study_h5(path, attrs, parts):  # killed after paths.h5, before study.h5 was rewritten
        calls.append(os.path.basename(path))
        if path.endswith("study.h5"):
            raise KeyboardInterrupt
        return real(path, attrs, parts)

    monkeypatch.setattr(migration, "write_store", fail_on_study_h5)
    with pytest.raises(KeyboardInterrupt):
        Study.open(d)
    assert calls == ["paths.h5", "study.h5"] and len(Study(d, "paths.h5").runs) == 2
    monkeypatch.setattr(migration, "write_store", real)
    rc, out, lines = cli(capsys, "info", d)
    assert rc == 0 and "runs       2\n" in out and "paths      2 connect paths, 10 points" in out, (out, lines)
    assert len(Study(d, "paths.h5").runs) == 2  # not moved twice
    assert not [f for f in os.listdir(d) if ".tmp-" in f]


def test_two_first_opens_at_once_migrate_once(base, tmp_path):
    d = _old_study(base, tmp_path / "old", OLD["curve-and-line"][0])
    exe = os.path.join(os.path.dirname(sys.executable), "globscope")
    procs = [subprocess.Popen([exe, "info", d], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert sum("moved 2 connect paths" in err for _, err in outs) == 1, outs
    assert all("runs       2\n" in out for out, _ in outs), outs
    assert len(Study(d, "paths.h5").runs) == 2 and len(Study.open(d).runs) == 2


def test_a_read_only_study_of_the_previous_release_is_one_line(base, tmp_path, capsys):
    mnt = tmp_path / "ro"  # a read-only mount (root ignores permission bits: chmod proves nothing)
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'})")
    try:
        d = _old_study(base, mnt / "old", OLD["curve-and-line"][0])
        r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        one_error(capsys, "info", d, match=f"{d}/study.h5: written by an earlier GlobScope that kept 2 connect paths "
                                           "in it")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
