"""Faults in the files GlobScope derives from study.h5: landscapes, trajectories, merge trees, connect's views.

Each VTK file carries a checksum in its field data; every reader checks it (topology reads the landscape and
the trajectories, render reads everything its views show, before pvbatch starts). A damaged, truncated or
missing file is exit 2 and one line naming it, and nothing else changes. Also: the landscape's field data
passes through topology, and topology's four files replace the old four as a whole (full disk).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import file_digests, fill, leftovers, make_study, tmpfs

from globscope_core.cli import main
from globscope_core.stages import paraview_env
from globscope_core.storage import safe_write, study_files, vtk_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """2D and 3D landscapes, trajectories, merge trees (persistence 0: the default run writes other files) and
    one connect curve with its latent view and plane: every kind of VTK file a study holds."""
    from globscope_core.reducers import fit_reducer
    from globscope_core.stages.connect import connect
    from globscope_core.stages.landscape import compute_landscape
    from globscope_core.stages.topology import study_topology

    d = tmp_path_factory.mktemp("derived") / "study"
    s = make_study(d, runs=3, epochs=3, widths=(16,), eval_samples=256)
    for dim, res in ((2, 33), (3, 5)):  # 2D: a segmentation several times the size of the tree's files
        fit_reducer(s, "pca", dim)
        compute_landscape(s, f"pca-{dim}d", res, eval_samples=64, progress=False)
        study_topology(str(d), dim=dim, persistence=0.0, verbose=False)
    connect(str(d), runs=("0", "1"), epochs=1, points=5, eval_samples=64, plane_resolution=5,
            plane_eval_samples=64, progress=False)
    return str(d)


def cli(capfd, *argv):
    """Run a subcommand in-process: (exit status, every line on stderr, VTK's own log included)."""
    safe_write._NOTED.clear()  # notes are once per process: each call here is a new command
    capfd.readouterr()
    rc = main([str(a) for a in argv])
    err = capfd.readouterr().err
    # every line but the memory estimate a long stage prints at its start
    return rc, [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("memory: ")]


# --- damage ---------------------------------------------------------------------------------------------
def _flip_data(data: bytes) -> bytes:
    """One bit of the first point or cell array's binary values (base64 of zlib data) changed to another
    base64 letter: VTK's zlib reports a broken stream."""
    start = min(i for i in (data.find(b"<PointData"), data.find(b"<CellData")) if i >= 0)
    start = data.index(b">", data.index(b'format="binary"', start)) + 1
    end = data.index(b"<", start)
    for i in range((start + end) // 2, end):
        if chr(data[i] ^ 1).isalnum() and chr(data[i]).isalnum():
            return data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]
    raise AssertionError("no base64 letter to flip")


def _flip_header(data: bytes) -> bytes:
    """One byte of what VTK takes from the XML text and reads without complaint: a digit of an image's
    origin, or the first letter of the last point array's name (upper/lower case)."""
    if b'Origin="' in data:
        i = data.index(b'Origin="') + 8
        while not chr(data[i]).isdigit():
            i += 1
    else:
        i = data.rindex(b'Name="', 0, data.index(b"</PointData>")) + 6
    return data[:i] + bytes([data[i] ^ (1 if chr(data[i]).isdigit() else 0x20)]) + data[i + 1:]


DAMAGE = {"flip-data": _flip_data, "flip-header": _flip_header, "truncate": lambda data: data[: len(data) // 2]}

# file kind: (path in the study, the commands that read it)
TOPOLOGY = ("topology", "{d}", "--dim", "{dim}")
RENDER = ("render", "{d}", "--quick", "--out", "{out}")
CONNECT = ("connect", "{d}", "--runs", "0", "2", "--epochs", "1", "--points", "5", "--eval-samples", "64",
           "--plane-resolution", "0")  # refused before the curve trains
KINDS = {
    "landscape-2d": ("landscape-2d.vti", [TOPOLOGY, RENDER, CONNECT]),
    "landscape-3d": ("landscape-3d.vti", [TOPOLOGY]),
    "trajectories-2d": ("trajectories-2d.vtp", [TOPOLOGY, RENDER]),
    "nodes": ("topology-2d/nodes.vtu", [RENDER]),
    "arcs": ("topology-2d/arcs.vtu", [RENDER]),
    "segmentation": ("topology-2d/segmentation.vti", [RENDER]),
    "diagram": ("topology-2d/diagram.vtu", [RENDER]),
    "connect-2d": ("connect-0-1-2d.vtp", [RENDER]),
    "connect-plane": ("connect-0-1-plane.vti", [RENDER]),
}
CASES = [pytest.param(kind, damage, cmd[0], id=f"{kind}-{damage}-{cmd[0]}")
         for kind, (_, cmds) in KINDS.items() for damage in DAMAGE for cmd in cmds]
# a file missing where it matters: the trajectories for the basins, one of a merge tree's four for the views
CASES += [pytest.param("trajectories-2d", "missing", "topology", id="trajectories-2d-missing-topology"),
          pytest.param("nodes", "missing", "render", id="nodes-missing-render")]


def _command(kind, name, d, out):
    path = KINDS[kind][0]
    cmd = next(c for c in KINDS[kind][1] if c[0] == name)
    dim = "3" if "3d" in path else "2"
    return [a.format(d=d, dim=dim, out=out) for a in cmd]


@pytest.mark.parametrize("kind,damage,command", CASES)
def test_damaged_derived_file_is_one_line_and_changes_nothing(study, tmp_path, capfd, kind, damage, command):
    d = str(tmp_path / "s")
    shutil.copytree(study, d)
    path = os.path.join(d, KINDS[kind][0])
    if damage == "missing":
        os.remove(path)
    else:
        with open(path, "rb") as fh:
            data = fh.read()
        with open(path, "wb") as fh:
            fh.write(DAMAGE[damage](data))
    before = file_digests(d)
    out = str(tmp_path / "renders")
    rc, lines = cli(capfd, *_command(kind, command, d, out))
    assert rc == 2 and len(lines) == 1, (rc, lines)
    named = os.path.dirname(path) if kind == "nodes" and damage == "missing" else path  # the incomplete set
    assert named in lines[0] and "Traceback" not in lines[0], lines
    if damage == "missing":
        assert "does not exist" in lines[0] or "is incomplete" in lines[0], lines
    else:
        assert " is damaged (" in lines[0] and "rerun `globscope " in lines[0], lines
    assert file_digests(d) == before and not leftovers(d) and not os.path.exists(out)


def test_checksum_mismatch_names_the_file_and_the_command(study, tmp_path, capfd):
    """A changed origin reads without a word from VTK: only the checksum sees it."""
    d = str(tmp_path / "s")
    shutil.copytree(study, d)
    path = os.path.join(d, "landscape-2d.vti")
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(_flip_header(data))
    rc, lines = cli(capfd, "topology", d, "--dim", 2)
    assert rc == 2 and lines == [f"globscope topology: error: {path} is damaged (checksum mismatch): "
                                 f"rerun `globscope landscape {d} --reducer pca-2d`"], lines


CHECKSUM = "globscope_checksum"  # the field data array (spelled out: tests read files as ParaView does)


def _vtk_read(path):
    """A file read by VTK's own XML reader, as ParaView reads it: nothing of ours in between."""
    from vtkmodules import vtkIOXML

    ext = os.path.splitext(path)[1]
    r = {".vti": vtkIOXML.vtkXMLImageDataReader, ".vtp": vtkIOXML.vtkXMLPolyDataReader,
         ".vtu": vtkIOXML.vtkXMLUnstructuredGridReader}[ext]()
    r.SetFileName(path)
    r.Update()
    return r.GetOutputDataObject(0)


def _field_data(obj) -> dict:
    from vtkmodules.util import numpy_support as ns

    fd = obj.GetFieldData()
    out = {}
    for i in range(fd.GetNumberOfArrays()):
        a = fd.GetAbstractArray(i)
        out[a.GetName()] = ([a.GetValue(j) for j in range(a.GetNumberOfValues())] if a.IsA("vtkStringArray")
                            else ns.vtk_to_numpy(a).tolist())
    return out


def _without_checksum(path):
    """Rewrite ``path`` as an older GlobScope did: the same data, no checksum array."""
    from vtkmodules import vtkIOXML

    obj = _vtk_read(path)
    obj.GetFieldData().RemoveArray(CHECKSUM)
    w = {".vti": vtkIOXML.vtkXMLImageDataWriter, ".vtp": vtkIOXML.vtkXMLPolyDataWriter}[os.path.splitext(path)[1]]()
    w.SetFileName(path)
    w.SetInputData(obj)
    w.SetDataModeToBinary()
    w.SetCompressorTypeToZLib()
    assert w.Write() == 1


def test_files_without_checksum_are_read_with_one_note(study, tmp_path, capfd):
    d = str(tmp_path / "s")
    shutil.copytree(study, d)
    land, traj = os.path.join(d, "landscape-2d.vti"), os.path.join(d, "trajectories-2d.vtp")
    for p in (land, traj):
        _without_checksum(p)
    rc, lines = cli(capfd, "topology", d, "--dim", 2)
    notes = [ln for ln in lines if "note:" in ln]
    assert rc == 0, lines
    assert len(notes) == 2 and all("has no checksum (written before checksums" in n for n in notes), lines
    assert land in notes[0] and traj in notes[1], notes
    # what topology wrote carries checksums again
    for p in study_files.topology_files(study_files.topology_dir(d, 2)):
        assert CHECKSUM in _field_data(_vtk_read(p)), p


# --- field data through topology ------------------------------------------------------------------------
@pytest.mark.parametrize("output", study_files.TOPOLOGY_FILES)
def test_topology_outputs_keep_the_landscape_field_data(study, tmp_path, output):
    from globscope_core.stages.topology import study_topology

    d = str(tmp_path / "s")
    shutil.copytree(study, d)
    study_topology(d, dim=2, verbose=False)
    land = _field_data(_vtk_read(study_files.landscape_vti(d, 2)))
    land.pop(CHECKSUM, None)  # the landscape's own, not passed on
    assert {"study", "study_id", "reducer", "split", "eval_samples", "resolution", "nan_count", "beyond_hull",
            "precision"} <= set(land)
    got = _field_data(_vtk_read(os.path.join(study_files.topology_dir(d, 2), output)))
    for name, value in land.items():
        assert got.get(name) == value, (output, name, sorted(got))
    assert got["TreeType"] == ["join"] and got["scalar"] == ["log_loss"]
    assert got[CHECKSUM] != _field_data(_vtk_read(study_files.landscape_vti(d, 2)))[CHECKSUM]


# --- topology's four files replace the old four as a whole ------------------------------------------------
@pytest.mark.parametrize("where", ["study", "out-dir-with-other-files"])
def test_full_disk_during_topology_keeps_the_old_set(study, tmp_path, capfd, where):
    """The disk fills after nodes.vtu and arcs.vtu are written: the old four stay, as the message says."""
    from globscope_core.stages.topology import study_topology, topology_of_file

    # the new set's sizes, measured on a copy outside the small file system
    scratch = str(tmp_path / "scratch")
    shutil.copytree(study, scratch)
    if where == "study":
        study_topology(scratch, dim=2, verbose=False)
        new = study_files.topology_dir(scratch, 2)
    else:
        new = str(tmp_path / "scratch-out")
        topology_of_file(study_files.landscape_vti(scratch, 2), "loss", new, persistence=0.2, relative=True)
    sizes = {f: os.path.getsize(os.path.join(new, f)) for f in study_files.TOPOLOGY_FILES}
    page = 4096
    pages = lambda n: -(-n // page) * page  # noqa: E731 - tmpfs counts whole pages
    # room for the new nodes.vtu and arcs.vtu, not for the segmentation: before the fix the first two were
    # replaced (each freeing its old one) and the disk filled at the third
    room = pages(sizes["nodes.vtu"]) + pages(sizes["arcs.vtu"])
    assert pages(sizes["segmentation.vti"]) > room + page, sizes
    with tmpfs(tmp_path / "fs", size="8m") as fs:
        d = os.path.join(fs, "s")
        shutil.copytree(study, d)
        if where == "study":
            out, argv = study_files.topology_dir(d, 2), ["topology", d, "--dim", 2]
        else:
            out = os.path.join(fs, "out")
            topology_of_file(study_files.landscape_vti(d, 2), "loss", out)
            with open(os.path.join(out, "notes.txt"), "w") as fh:
                fh.write("the user's own file\n")
            argv = ["topology", study_files.landscape_vti(d, 2), "--out", out, "--persistence", 0.2, "--relative"]
        before = {**file_digests(d), **{f"out/{k}": v for k, v in file_digests(out).items()}}
        filler = fill(fs, room)
        rc, lines = cli(capfd, *argv)
        assert rc == 2 and len(lines) == 1, lines
        assert f"no space left on {out}: " in lines[0] and lines[0].endswith(" unchanged"), lines
        assert {**file_digests(d), **{f"out/{k}": v for k, v in file_digests(out).items()}} == before
        assert not leftovers(fs) and not [e for e in os.listdir(os.path.dirname(out)) if ".tmp-" in e]
        os.remove(filler)
        rc, lines = cli(capfd, *argv)  # with space again: the whole new set
        assert rc == 0, lines
        for f in study_files.TOPOLOGY_FILES:  # all four new: the old set was computed without simplification
            assert _field_data(_vtk_read(os.path.join(out, f)))["PersistenceThreshold"][0] > 0, f
        if where != "study":
            assert open(os.path.join(out, "notes.txt")).read() == "the user's own file\n"
        assert not leftovers(fs)


# --- ParaView opens a checksummed file unchanged ----------------------------------------------------------
PV_SCRIPT = r"""
import json, sys
sys.path.insert(0, {root!r})
from paraview import servermanager, simple as pv
from vtkmodules.util import numpy_support as ns
from globscope_core.storage import vtk_files
out = {{}}
for path in {paths!r}:
    obj = servermanager.Fetch(pv.OpenDataFile(path))
    arrays = {{}}
    for where, data in (("point", obj.GetPointData()), ("cell", obj.GetCellData()), ("field", obj.GetFieldData())):
        for i in range(data.GetNumberOfArrays()):
            a = data.GetAbstractArray(i)
            if a.IsA("vtkStringArray"):
                arrays[where + ":" + a.GetName()] = [a.GetValue(j) for j in range(a.GetNumberOfValues())]
            else:
                arrays[where + ":" + a.GetName()] = ns.vtk_to_numpy(a).tolist()
    out[path] = {{"arrays": arrays, "points": obj.GetNumberOfPoints(), "cells": obj.GetNumberOfCells(),
                 "checksum_here": vtk_files.data_checksum(obj)}}
print("JSON" + json.dumps(out))
"""


@pytest.mark.paraview
@pytest.mark.skipif(paraview_env.find("pvpython") is None, reason="Debian ParaView (pvpython) not installed")
def test_paraview_opens_checksummed_files_and_sees_the_same_arrays(study, tmp_path):
    import json

    paths = [os.path.join(study, p) for p in ("landscape-2d.vti", "trajectories-2d.vtp", "topology-2d/nodes.vtu",
                                              "topology-2d/diagram.vtu")]
    script = tmp_path / "open.py"
    script.write_text(PV_SCRIPT.format(root=ROOT, paths=paths))
    env = paraview_env.environment()
    env.pop("DISPLAY", None)  # reading only: no X server needed
    p = subprocess.run([paraview_env.find("pvpython"), str(script)], env=env, capture_output=True, text=True,
                       timeout=120)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("JSON")]
    assert p.returncode == 0 and line, (p.stdout[-2000:], p.stderr[-2000:])
    seen = json.loads(line[0][4:])
    for path in paths:
        obj = vtk_files.read_any(path)  # checked here
        stored = vtk_files.stored_checksum(obj)
        got = seen[path]
        assert stored and got["arrays"]["field:" + vtk_files.CHECKSUM] == [stored]
        # ParaView's VTK (9.2) computes the same checksum of the same data
        assert got["checksum_here"] == stored, path
        assert (got["points"], got["cells"]) == (obj.GetNumberOfPoints(), obj.GetNumberOfCells())
        for where, data in (("point", obj.GetPointData()), ("cell", obj.GetCellData())):
            mine = vtk_files.arrays_of(obj, where)
            theirs = {k.split(":", 1)[1]: v for k, v in got["arrays"].items() if k.startswith(where + ":")}
            assert sorted(theirs) == sorted(mine), (path, where)
            for name, values in mine.items():
                np.testing.assert_array_equal(np.asarray(theirs[name], dtype=values.dtype), values,
                                              err_msg=f"{path}: {name}")
        assert not re.search(r"\bERR\b|Error", p.stderr), p.stderr[-2000:]


@pytest.mark.paraview
@pytest.mark.skipif(paraview_env.find("pvpython") is None, reason="Debian ParaView (pvpython) not installed")
def test_the_plugin_reader_reports_a_damaged_landscape_and_shows_nothing_of_it(study, tmp_path):
    """A study opened in ParaView: the damaged landscape is one message in the output window, its port stays
    empty (no wrong picture), the other outputs load and ParaView goes on."""
    d = tmp_path / "s"
    shutil.copytree(study, d)
    vti = d / "landscape-2d.vti"
    vti.write_bytes(_flip_header(vti.read_bytes()))
    script = tmp_path / "open.py"
    script.write_text(f"""
from paraview import simple as pv
pv.LoadPlugin({paraview_env.PLUGIN!r}, ns=vars(pv))
r = pv.GlobScopeStudyReader(FileName={str(d / 'study.h5')!r})
r.UpdatePipeline()
print("points", r.GetDataInformation(0).GetNumberOfPoints(), r.GetDataInformation(1).GetNumberOfPoints(), flush=True)
""")
    env = paraview_env.environment()
    env.pop("DISPLAY", None)  # reading only: no X server needed
    p = subprocess.run([paraview_env.find("pvpython"), str(script)], env=env, capture_output=True, text=True,
                       timeout=120)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert f"{vti} is damaged (checksum mismatch): rerun `globscope landscape {d} --reducer pca-2d`" in log, log[-3000:]
    assert "points 0 " in log, log[-3000:]
