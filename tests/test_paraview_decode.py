"""Pick a point, get a model, in ParaView: the plugin's GlobScope Decode Point and the Decode Selection macro.

One real pvpython run (plugin, study reader, selections, ExtractSelection) on a real tiny study; the filter runs
`globscope decode` out of process, and this process checks its answers against the CLI's own and the landscape.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from globscope_core.stages import paraview_env

HAVE_PV = paraview_env.find("pvpython") is not None
needs_pv = pytest.mark.skipif(not HAVE_PV, reason="Debian ParaView (pvpython) not installed; setup.sh installs it")
pytestmark = [pytest.mark.paraview, needs_pv]
MACRO = os.path.join(paraview_env.PLUGIN_DIR, "macros", "GlobScope_Decode_Selection.py")

SCRIPT = """
import json, sys
from paraview import servermanager as sm
from paraview import simple as pv

plugin, study, out_dir, vertex, untrusted, macro, edge = sys.argv[1:8]
pv.LoadPlugin(plugin, ns=vars(pv))
view = pv.CreateRenderView()
reader = pv.GlobScopeStudyReader(FileName=study + "/study.h5")
reader.Dimension = 2
pv.Show(reader, view)


def result(f):
    f.UpdatePipeline()
    d = sm.Fetch(f)
    pd, fd = d.GetPointData(), d.GetFieldData()
    field = {n: fd.GetAbstractArray(n).GetValue(0) for n in ("message", "model_file") if fd.GetAbstractArray(n)}
    return {"points": [list(d.GetPoint(i)) for i in range(d.GetNumberOfPoints())], "field": field,
            "arrays": {pd.GetArrayName(i): pd.GetArray(i).GetValue(0) for i in range(pd.GetNumberOfArrays())}}


def picked(vertex, **props):  # a point selected on the landscape (port 0), extracted and decoded
    pv.SetActiveSource(reader)
    pv.SelectIDs(IDs=[0, int(vertex)], FieldType="POINT", Source=reader)
    return result(pv.GlobScopeDecodePoint(Input=pv.ExtractSelection(Input=reader), **props))


res = {"basin": picked(vertex, OutputFile=out_dir + "/picked.safetensors"), "untrusted": picked(untrusted)}
outside = pv.PointSource(Center=[1e3, 1e3, 0], NumberOfPoints=1, Radius=0)
res["outside"] = result(pv.GlobScopeDecodePoint(Input=outside, StudyDirectory=study))
x, y = map(float, edge.split(","))  # just beyond the grid's edge by float32 rounding: moved onto it
near = pv.PointSource(Center=[x, y, 0], NumberOfPoints=1, Radius=0)
res["edge"] = result(pv.GlobScopeDecodePoint(Input=near, StudyDirectory=study + "/study.h5",
                                             OutputFile=out_dir + "/edge.pt"))
print("filters done", flush=True)

pv.SetActiveSource(reader)
pv.SelectIDs(IDs=[0, int(vertex)], FieldType="POINT", Source=reader)
del vars(pv)["GlobScopeDecodePoint"]  # as in the GUI when the plugin loads after paraview.simple: the macro adds it
exec(open(macro).read(), {"__name__": "__main__"})
text = pv.FindSource("GlobScope decoded point")
res["macro_text"] = text.Text if text is not None else None
with open(out_dir + "/result.json", "w") as fh:
    json.dump(res, fh)
print("done", flush=True)
"""


def _cli(*args):
    p = subprocess.run([sys.executable, "-m", "globscope_core.cli", "decode", *args], capture_output=True,
                       text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def _load_strict(study, path):
    """The model file as the user loads it: into the study's model, every tensor present and no other."""
    import safetensors.torch
    import torch

    from globscope_core.networks.models import build_model
    from globscope_core.storage.study import Study

    state = safetensors.torch.load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
    build_model(Study.open(study).model_spec).load_state_dict(state, strict=True)
    return state


@pytest.fixture(scope="module")
def picked(tmp_path_factory):
    """The study, the basin it picks, the landscape, and what the pvpython run gave."""
    from conftest import make_ready_study

    from globscope_core.storage import vtk_files

    root = tmp_path_factory.mktemp("pvdecode")
    study, _ = make_ready_study(root / "study")
    rc, out, err = _cli(study, "--basins", "--json")
    assert rc == 0, err
    field = vtk_files.read_vti(os.path.join(study, "landscape-2d.vti"))
    trusted = np.asarray(field.point_arrays["trusted"]).ravel()
    basin = next(b for b in json.loads(out) if trusted[b["vertex"]])
    untrusted = int(np.flatnonzero(trusted == 0)[0])
    hi = np.asarray(field.origin[:2]) + np.asarray(field.spacing[:2]) * (np.asarray(field.dims[:2]) - 1)
    edge = (float(hi[0]) + 2e-5, float(basin["at"][1]))  # < 1e-6 of the grid's extent beyond its edge
    script = root / "pv_decode.py"
    script.write_text(SCRIPT)
    argv = [paraview_env.find("pvpython"), str(script), paraview_env.PLUGIN, study, str(root), str(basin["vertex"]),
            str(untrusted), MACRO, f"{edge[0]!r},{edge[1]!r}"]
    try:
        p = paraview_env.run(argv, paraview_env.environment(), timeout=900, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        rc, log = p.returncode, p.stdout
    except subprocess.TimeoutExpired as exc:
        rc, log = 137, f"{exc.stdout or ''}\n(killed after 900 s)"
    assert rc == 0 and "done" in log, log[-4000:]
    with open(root / "result.json") as fh:
        res = json.load(fh)
    return dict(study=study, root=root, basin=basin, field=field, hi=hi, edge=edge, log=log, res=res)


def test_picked_point_decodes_like_the_cli(picked):
    got, basin, study = picked["res"]["basin"], picked["basin"], picked["study"]
    assert len(got["points"]) == 1, got
    pt = got["points"][0]
    np.testing.assert_allclose(pt[:2], basin["at"], rtol=1e-6, atol=1e-6)  # the picked vertex (float32 in VTK)
    assert pt[2] == 0.0
    rc, out, err = _cli(study, f"--at={pt[0]!r},{pt[1]!r}", "--json", f"--out={picked['root'] / 'cli.safetensors'}")
    assert rc == 0, err
    cli = json.loads(out)
    a = got["arrays"]
    assert a["loss_decoded"] == pytest.approx(cli["loss"], rel=1e-6)
    assert a["accuracy_decoded"] == pytest.approx(cli["accuracy"], rel=1e-6)
    assert a["landscape_loss"] == pytest.approx(cli["landscape_loss"], rel=1e-6)
    grid_loss = float(np.asarray(picked["field"].point_arrays["loss"]).ravel()[basin["vertex"]])
    assert a["landscape_loss"] == pytest.approx(grid_loss, rel=1e-4)
    assert a["trusted"] == 1 and cli["trusted"]
    model = got["field"]["model_file"]
    assert model == str(picked["root"] / "picked.safetensors") and os.path.exists(model)
    assert got["field"]["message"].startswith(f"decoded loss {a['loss_decoded']:.6g}, landscape ")
    assert "(trusted)" in got["field"]["message"] and got["field"]["message"].endswith(f"wrote {model}")
    mine, theirs = _load_strict(study, model), _load_strict(study, cli["out"])
    for k in theirs:  # the same point decodes to the same model
        np.testing.assert_allclose(mine[k].numpy(), theirs[k].numpy(), rtol=1e-6, atol=1e-7, err_msg=k)


def test_point_on_the_edge_by_float32_rounding_is_moved_onto_the_grid(picked):
    got = picked["res"]["edge"]
    assert len(got["points"]) == 1, got["field"]
    assert got["points"][0][0] == picked["hi"][0]  # exactly the grid's edge, which decode accepts
    assert np.isfinite(got["arrays"]["loss_decoded"])
    assert os.path.exists(got["field"]["model_file"]) and got["field"]["model_file"].endswith("edge.pt")
    _load_strict(picked["study"], got["field"]["model_file"])


def test_refused_points_are_messages_not_crashes(picked):
    res, log = picked["res"], picked["log"]
    for case, why in (("outside", "lies outside the landscape's grid"), ("untrusted", "outside the trusted region")):
        got = res[case]
        assert got["points"] == [] and got["arrays"] == {}, (case, got)
        assert why in got["field"]["message"] and "\n" not in got["field"]["message"], got["field"]
        assert "model_file" not in got["field"]
        assert "GlobScope Decode Point: " + got["field"]["message"] in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_macro_shows_the_decoded_point(picked):
    text = picked["res"]["macro_text"]
    assert text and text.startswith("decoded loss ") and "(trusted)" in text, text
    decoded, landscape = (float(text.split(k, 1)[1].split(" ", 1)[0].rstrip(",")) for k in ("decoded loss ",
                                                                                           "landscape "))
    assert decoded == pytest.approx(picked["res"]["basin"]["arrays"]["loss_decoded"], rel=1e-5)
    assert landscape == pytest.approx(picked["res"]["basin"]["arrays"]["landscape_loss"], rel=1e-5)
    model = text.rsplit("wrote ", 1)[1]
    assert model.startswith(os.path.join(picked["study"], "decoded", "pca-2d-at-")) and os.path.exists(model)
    _load_strict(picked["study"], model)
