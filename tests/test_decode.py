"""`globscope decode`: basin minima, saddles and coordinates of a real 9x9 landscape decoded into model files,
their losses against the landscape and against a plain torch evaluation, the --stdin protocol, the one-line
refusals, and the pure helpers (critical_points, interpolate, trusted_points) on hand-made inputs."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import file_digests, fill, leftovers, make_ready_study, one_line_error, run_cli, tmpfs

from globscope_core.errors import GlobScopeError
from globscope_core.reducers.latent_grid import interpolate
from globscope_core.storage import study_files
from globscope_core.storage.vtk_files import arrays_of, read_any, read_vti
from globscope_core.topology import critical_points

MINIMUM = 0


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def csv(pt):
    return ",".join(repr(float(v)) for v in pt)


@pytest.fixture(scope="module")
def land(tmp_path_factory):
    """The ready study (never written to: every decode here names an --out elsewhere), its landscape, merge tree
    and basins as `--basins --json` lists them, and the grid points the tests decode."""
    root = tmp_path_factory.mktemp("decode")
    study, _ = make_ready_study(root / "study")
    field = read_vti(study_files.landscape_vti(study, 2))
    nodes_vtu, arcs_vtu = study_files.topology_files(study_files.topology_dir(study, 2))[:2]
    rc, out, err = run_cli("decode", study, "--basins", "--json")
    assert rc == 0, err
    nx, ny, _ = field.dims
    f = {k: np.asarray(v, np.float64) for k, v in field.point_arrays.items()}
    lo, step = np.array(field.origin[:2]), np.array(field.spacing[:2])
    trusted = f["trusted"].reshape(ny, nx) > 0.5
    # a cell whose four corners are trusted: the trusted region is convex, so the point inside it is trusted too
    cells = [(i, j) for j in range(ny - 1) for i in range(nx - 1) if trusted[j:j + 2, i:i + 2].all()]
    assert cells and not trusted.all() and (f["extrapolation"] == 0).any()
    return SimpleNamespace(dir=study, root=root, field=field, f=f, nx=nx, ny=ny, lo=lo, step=step, cell=cells[0],
                           nodes=arrays_of(read_any(nodes_vtu)), arcs=arrays_of(read_any(arcs_vtu), "cell"),
                           basins=json.loads(out), inside=int(np.flatnonzero(f["extrapolation"] == 0)[0]),
                           untrusted=int(np.flatnonzero(f["trusted"] < 0.5)[0]))


def point_of(L, v):
    return L.lo + np.array([v % L.nx, v // L.nx]) * L.step


def vertex_of(L, at):
    ij = np.rint((np.asarray(at) - L.lo) / L.step).astype(int)
    assert np.allclose(L.lo + ij * L.step, at), at  # on a grid vertex
    return int(ij[0] + ij[1] * L.nx)


def between(L):
    i, j = L.cell
    return L.lo + (np.array([i, j]) + [0.25, 0.6]) * L.step


@pytest.fixture(scope="module")
def served(land):
    """One `decode --stdin` process answering every decode the tests check, with bad requests among them."""
    out = land.root / "out"
    out.mkdir()
    reqs = [(f"basin-{b['node']}", {"basin": b["node"], "out": str(out / f"basin-{b['node']}.safetensors")})
            for b in land.basins]
    reqs += [("bad-json", "{not json"), ("blank", "  "), ("off-grid", {"at": [1e3, 0.0]}),
             ("list", {"basins": True}), ("not-object", [1, 2]), ("three", {"at": [0.0, 0.0, 0.0]}),
             ("bad-out", {"at": point_of(land, land.inside).tolist(), "out": str(out / "m.txt")})]
    reqs += [(f"saddle-{a}-{b}", {"saddle": [a, b], "out": str(out / f"saddle-{a}-{b}.safetensors")})
             for a, b in itertools.combinations([b["node"] for b in land.basins], 2)]
    at = point_of(land, land.inside).tolist()
    reqs += [("inside", {"at": at, "out": str(out / "inside.safetensors")}),
             ("inside-pt", {"at": at, "out": str(out / "inside.pt")}),
             ("between", {"at": between(land).tolist(), "out": str(out / "between.safetensors")})]
    before = file_digests(land.dir)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for _, r in reqs)
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "globscope"), "decode", land.dir, "--stdin"],
                       input=text, capture_output=True, text=True, timeout=300)
    lines = p.stdout.splitlines()
    named = [n for n, r in reqs if n != "blank"]
    answers = dict(zip(named, map(json.loads, lines))) if len(lines) == len(named) else {}
    return SimpleNamespace(rc=p.returncode, err=p.stderr, lines=lines, n=len(named), a=answers, out=out,
                           study_unchanged=before == file_digests(land.dir))


def torch_loss(land, path, info):
    """The file loaded strictly into a fresh model, evaluated on the landscape's subset with plain torch."""
    from safetensors.torch import load_file

    from globscope_core.evaluation.many_models import eval_data
    from globscope_core.networks.models import build_model
    from globscope_core.storage.study import Study

    study = Study.open(land.dir)
    model = build_model(study.model_spec)
    model.load_state_dict(load_file(path), strict=True)
    fd = land.field.field_data
    x, y = eval_data(study, str(fd["split"]), int(np.ravel(fd["eval_samples"])[0]), seed=0)
    assert (info["split"], info["eval_samples"]) == (str(fd["split"]), len(x))
    with torch.no_grad():
        return F.cross_entropy(model.eval()(x), y).item()


def up_path(arcs, node):
    up = dict(zip(arcs["downNodeId"].tolist(), arcs["upNodeId"].tolist()))
    path = [node]
    while path[-1] in up:
        path.append(up[path[-1]])
    return path


def test_stdin_protocol(land, served):
    assert served.rc == 0 and "Traceback" not in served.err, served.err
    assert len(served.lines) == served.n  # one JSON line per request, none for the blank line
    a = served.a
    for name, needle in [("bad-json", " "), ("off-grid", "outside the landscape's grid"), ("not-object", "JSON object"),
                         ("three", "needs 2 coordinates"), ("bad-out", ".safetensors or .pt")]:
        assert a[name]["ok"] is False and needle in a[name]["error"] and "\n" not in a[name]["error"], a[name]
    assert a["list"] == {"ok": True, "basins": land.basins}
    assert all(v["ok"] for k, v in a.items() if k.startswith(("basin-", "saddle-", "inside", "between")))
    assert not (served.out / "m.txt").exists()
    assert served.study_unchanged  # an --out elsewhere writes nothing into the study


def test_basins_list(land):
    n = land.nodes
    minima = np.flatnonzero(n["CriticalType"] == MINIMUM)
    assert len(land.basins) >= 2 and sorted(b["node"] for b in land.basins) == sorted(n["NodeId"][minima].tolist())
    assert [b["scalar"] for b in land.basins] == sorted(b["scalar"] for b in land.basins)
    for b in land.basins:
        assert b["vertex"] == n["VertexId"][list(n["NodeId"]).index(b["node"])]
        assert np.allclose(b["at"], point_of(land, b["vertex"]))


def test_basin_minima(land, served):
    loss, logl, nx, ny = land.f["loss"], land.f["log_loss"], land.nx, land.ny
    for b in land.basins:
        a = served.a[f"basin-{b['node']}"]
        v = vertex_of(land, a["at"])
        assert v == b["vertex"] and a["trusted"] and f"basin {b['node']}" in a["what"]
        assert rel(a["loss"], loss[v]) < 1e-4 and rel(a["landscape_loss"], loss[v]) < 1e-9
        assert abs(b["scalar"] - logl[v]) < 1e-6
        i, j = v % nx, v // nx  # no trusted grid neighbour lies lower: the vertex is a minimum of the landscape
        nbrs = [(i + di) + (j + dj) * nx for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1))
                if 0 <= i + di < nx and 0 <= j + dj < ny]
        assert all(logl[v] <= logl[u] for u in nbrs if land.f["trusted"][u] > 0.5), (v, nbrs)
        assert rel(torch_loss(land, a["out"], a), a["loss"]) < 1e-4


def test_basin_cli_default_out(land, served, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    shutil.copytree(land.dir, tmp_path / "s")
    n = land.basins[0]["node"]
    rc, out, err = run_cli("decode", tmp_path / "s", "--basin", n)
    path = study_files.decoded_file(str(tmp_path / "s"), f"pca-2d-basin-{n}.safetensors")
    assert rc == 0 and f"wrote {path}" in out and f"the minimum of basin {n}" in out, (out, err)
    mine, served_file = load_file(path), load_file(served.a[f"basin-{n}"]["out"])
    assert mine.keys() == served_file.keys() and all(torch.equal(mine[k], served_file[k]) for k in mine)
    with safe_open(path, "pt") as fh:
        assert json.loads(fh.metadata()["loss"]) == pytest.approx(served.a[f"basin-{n}"]["loss"], rel=1e-6)


def test_saddles(land, served):
    n = land.nodes
    for a, b in itertools.combinations([x["node"] for x in land.basins], 2):
        s = served.a[f"saddle-{a}-{b}"]
        v = vertex_of(land, s["at"])
        node = int(n["NodeId"][list(n["VertexId"]).index(v)])
        assert n["CriticalType"][list(n["NodeId"]).index(node)] != MINIMUM and f"(node {node})" in s["what"]
        pa, pb = up_path(land.arcs, a), up_path(land.arcs, b)
        assert node in pa and node in pb and node == next(x for x in pa if x in pb)  # the first common ancestor
        assert s["loss"] >= served.a[f"basin-{a}"]["loss"] and s["loss"] >= served.a[f"basin-{b}"]["loss"]
        assert rel(s["loss"], land.f["loss"][v]) < 1e-4


def test_at_points(land, served):
    a, v = served.a["inside"], land.inside
    assert rel(a["loss"], land.f["loss"][v]) < 1e-4 and a["trusted"] and not a["clamped"] and a["extrapolation"] == 0
    from safetensors.torch import load_file

    st = load_file(a["out"])
    pt = torch.load(served.a["inside-pt"]["out"], weights_only=True)
    assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in st)
    b = served.a["between"]
    (i, j), f = land.cell, land.f["loss"].reshape(land.ny, land.nx)
    hand = (.75 * .4 * f[j, i] + .25 * .4 * f[j, i + 1] + .75 * .6 * f[j + 1, i] + .25 * .6 * f[j + 1, i + 1])
    assert np.allclose(b["at"], between(land)) and b["trusted"] and rel(b["landscape_loss"], hand) < 1e-9
    assert np.isfinite(b["loss"]) and rel(torch_loss(land, b["out"], b), b["loss"]) < 1e-4


def test_interpolate_synthetic():
    rng = np.random.default_rng(0)
    vals = rng.normal(size=6)  # dims (3, 2, 1): x fastest
    origin, spacing = (1.0, -1.0, 0.0), (0.5, 2.0, 1.0)
    f = vals.reshape(2, 3)
    hand = .6 * .25 * f[0, 1] + .4 * .25 * f[0, 2] + .6 * .75 * f[1, 1] + .4 * .75 * f[1, 2]
    assert interpolate(vals, (3, 2, 1), origin, spacing, (1.7, 0.5)) == pytest.approx(hand, rel=1e-12)
    assert interpolate(vals, (3, 2, 1), origin, spacing, (2.0, 1.0)) == pytest.approx(vals[5], rel=1e-12)  # corner
    c = rng.normal(size=8)  # trilinear interpolation reproduces any function of this form exactly

    def g(x, y, z):
        return c[0] + c[1] * x + c[2] * y + c[3] * z + c[4] * x * y + c[5] * x * z + c[6] * y * z + c[7] * x * y * z
    dims, origin, spacing = (2, 3, 4), (0.0, 1.0, -2.0), (1.5, 0.5, 0.25)
    k, j, i = np.meshgrid(range(4), range(3), range(2), indexing="ij")
    grid = g(origin[0] + i * spacing[0], origin[1] + j * spacing[1], origin[2] + k * spacing[2]).ravel()
    for p in [(0.3, 1.9, -1.4), (1.5, 2.0, -1.25), (0.0, 1.0, -2.0)]:
        assert interpolate(grid, dims, origin, spacing, p) == pytest.approx(g(*p), rel=1e-9, abs=1e-12)
    vals[1] = np.nan
    assert np.isnan(interpolate(vals, (3, 2, 1), origin[:2], spacing[:2], (0.7, 0.5)))


def test_trusted_points_match_landscape(land):
    from globscope_core.reducers import load_reducer
    from globscope_core.reducers.latent_grid import grid_points, trusted_points
    from globscope_core.stages.landscape import encode_checkpoints
    from globscope_core.storage.study import Study

    study = Study.open(land.dir)
    Z = encode_checkpoints(study, load_reducer(study, "pca-2d"))
    fl = land.field
    pts = grid_points(np.arange(land.nx * land.ny), fl.dims, fl.origin, fl.spacing, 2)
    trusted, extrapolation = trusted_points(Z, pts, fl.spacing)
    assert np.array_equal(trusted, land.f["trusted"] > 0.5)
    assert np.allclose(extrapolation, land.f["extrapolation"], rtol=1e-5, atol=1e-7)


def tree():
    """Minima 0, 1, 2 (and 6, alone in a second tree); 0 and 1 join at 3, then 2 at 4; 5 is the root."""
    nodes = {"NodeId": np.arange(7), "VertexId": np.arange(7) + 10, "CriticalType": np.array([0, 0, 0, 1, 1, 3, 0]),
             "Scalar": np.array([0.1, 0.3, 0.2, 0.5, 0.7, 0.9, 0.4])}
    arcs = {"downNodeId": np.array([0, 1, 3, 2, 4]), "upNodeId": np.array([3, 3, 4, 4, 5])}
    return nodes, arcs


def test_critical_points_hand_made_tree():
    nodes, arcs = tree()
    assert critical_points.basin_minima(nodes) == [{"node": 0, "vertex": 10, "scalar": 0.1},
                                                   {"node": 2, "vertex": 12, "scalar": 0.2},
                                                   {"node": 1, "vertex": 11, "scalar": 0.3},
                                                   {"node": 6, "vertex": 16, "scalar": 0.4}]
    assert critical_points.joining_saddle(nodes, arcs, 0, 1) == {"node": 3, "vertex": 13, "scalar": 0.5}
    assert critical_points.joining_saddle(nodes, arcs, 1, 2)["node"] == 4
    assert critical_points.joining_saddle(nodes, arcs, 2, 0)["node"] == 4
    with pytest.raises(GlobScopeError, match="got 1 twice"):
        critical_points.joining_saddle(nodes, arcs, 1, 1)
    with pytest.raises(GlobScopeError, match=r"basin 3 is not a minimum .*0 \(0\.1\), 2 \(0\.2\), 1 \(0\.3\)"):
        critical_points.joining_saddle(nodes, arcs, 3, 0)
    with pytest.raises(GlobScopeError, match="different trees"):
        critical_points.joining_saddle(nodes, arcs, 0, 6)


REFUSALS = {  # name: (the land -> decode's arguments, the land -> needles of the one-line error)
    "off-grid": (lambda L: ["--at=1000,0"], lambda L: ["outside the landscape's grid"]),
    "untrusted": (lambda L: [f"--at={csv(point_of(L, L.untrusted))}"],
                  lambda L: ["outside the trusted region", "--force"]),
    "3d-reducer": (lambda L: ["--reducer", "pca-3d", "--basin", "0"], lambda L: ["landscape-3d.vti", "--dim 3"]),
    "other-reducer": (lambda L: ["--reducer", "ae-2d", "--basin", "0"], lambda L: ["computed with pca-2d, not ae-2d"]),
    "not-a-minimum": (lambda L: ["--basin", str(int(L.nodes["NodeId"][np.flatnonzero(L.nodes["CriticalType"])[0]]))],
                      lambda L: ["is not a minimum"] + [f"{b['node']} ({b['scalar']:.4g})" for b in L.basins]),
    "saddle-one": (lambda L: ["--saddle", "1"], lambda L: ["two basins A,B, got 1"]),
    "saddle-three": (lambda L: ["--saddle", "1,2,4"], lambda L: ["two basins A,B, got 3"]),
    "at-3d": (lambda L: ["--at=1,2,3"], lambda L: ["landscape-3d.vti", "does not exist"]),
    "extension": (lambda L: ["--at=0,0", "--out", str(L.root / "m.txt")], lambda L: [".safetensors or .pt"]),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals(land, name, capsys):
    # the command's own main in this process: the installed command's code without a torch import per case
    # (the tests below check the installed command's one line, in a process of its own)
    from globscope_core.cli import main

    args, needles = REFUSALS[name]
    before = file_digests(land.dir)
    rc = main(["decode", land.dir, *args(land)])
    out, err = capsys.readouterr()
    one_line_error(rc, err, *needles(land))
    assert out == "" and file_digests(land.dir) == before and not (land.root / "m.txt").exists()


def test_untrusted_with_force(land, tmp_path):
    v = land.untrusted
    rc, out, err = run_cli("decode", land.dir, f"--at={csv(point_of(land, v))}", "--force", "--json",
                           "--out", tmp_path / "forced.pt")
    assert rc == 0, err
    info = json.loads(out)
    assert info["trusted"] is False and info["clamped"] and info["out"] == str(tmp_path / "forced.pt")
    assert rel(info["extrapolation"], land.f["extrapolation"][v]) < 1e-5
    assert rel(info["loss"], land.f["loss"][v]) < 1e-4  # clamped to the hull as the landscape was
    from globscope_core.networks.models import build_model

    state = torch.load(tmp_path / "forced.pt", weights_only=True)
    assert state.keys() == build_model(info["model_spec"]).state_dict().keys()


def test_missing_topology(land, tmp_path):
    shutil.copytree(land.dir, tmp_path / "s")
    shutil.rmtree(study_files.topology_dir(str(tmp_path / "s"), 2))
    one_line_error(*run_cli("decode", tmp_path / "s", "--basin", "0")[::2], "nodes.vtu", "globscope topology")


def test_unwritable_out(land, tmp_path):
    (tmp_path / "file.txt").write_text("a file, not a directory")
    rc, _, err = run_cli("decode", land.dir, f"--at={csv(point_of(land, land.inside))}",
                         "--out", tmp_path / "file.txt" / "x.safetensors")
    one_line_error(rc, err, "file.txt")
    assert os.listdir(tmp_path) == ["file.txt"] and (tmp_path / "file.txt").read_text() == "a file, not a directory"
    with tmpfs(tmp_path / "full", "1m") as full:
        fill(full)
        rc, _, err = run_cli("decode", land.dir, f"--at={csv(point_of(land, land.inside))}",
                             "--out", os.path.join(full, "m.safetensors"))
        one_line_error(rc, err, "no space left", "m.safetensors not written")
        assert sorted(os.listdir(full)) == ["filler"] and not leftovers(full)
