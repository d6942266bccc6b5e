"""pvpython/pvbatch driver for tests/test_paraview.py: the plugin's reader and merge tree, serial or on a server.

    pv_tree.py PLUGIN STUDY OUT.npz [--connect PORT] [--png OUT.png] [--persistence P]

Writes the merge tree (nodes and arcs arrays) the plugin computed, and with --png a server-side render.
Runs inside ParaView's Python: numpy only.
"""
import argparse
import time

import numpy as np
from paraview import servermanager as sm
from paraview import simple as pv

ap = argparse.ArgumentParser()
ap.add_argument("plugin")
ap.add_argument("study")
ap.add_argument("out")
ap.add_argument("--connect", type=int)
ap.add_argument("--png")
ap.add_argument("--persistence", type=float, default=0.0)
a = ap.parse_args()

if a.connect:
    for attempt in range(120):  # the server takes a few seconds to listen
        try:
            if pv.Connect("127.0.0.1", a.connect) is not None:
                break
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.5)
    else:
        raise SystemExit("could not connect to pvserver")
    print("connected, server processes:", sm.ActiveConnection.GetNumberOfDataPartitions(), flush=True)
pv.LoadPlugin(a.plugin, remote=bool(a.connect), ns=vars(pv))

reader = pv.GlobScopeStudyReader(FileName=a.study + "/study.h5")
src = reader
if a.persistence > 0:
    src = pv.GlobScopeTopologicalSimplificationByPersistence(Input=reader)
    src.InputArray = ["POINTS", "loss"]
    src.PersistenceThreshold = a.persistence
    src.ThresholdIsAbsolute = 0
mt = pv.GlobScopeMergeTree(Input=src)
mt.ScalarField = ["POINTS", "loss"]
mt.TreeType = "Join Tree"
mt.UpdatePipeline()


def arrays(data, where):
    d = data.GetPointData() if where == "p" else data.GetCellData()
    from vtkmodules.util.numpy_support import vtk_to_numpy
    return {f"{where}_{d.GetArrayName(i)}": vtk_to_numpy(d.GetArray(i)) for i in range(d.GetNumberOfArrays())}


out = {}
nodes = sm.Fetch(mt, idx=0)
arcs = sm.Fetch(mt, idx=1)
seg = sm.Fetch(mt, idx=2)
diag = sm.Fetch(mt, idx=3)
out.update({"nodes_" + k: v for k, v in arrays(nodes, "p").items()})
out.update({"arcs_" + k: v for k, v in arrays(arcs, "c").items()})
out["nodes_points"] = np.array([nodes.GetPoint(i) for i in range(nodes.GetNumberOfPoints())]).reshape(-1, 3)
out["seg_points"] = np.array([seg.GetNumberOfPoints()])
out["diagram_cells"] = np.array([diag.GetNumberOfCells()])
out["landscape_points"] = np.array([reader.GetDataInformation(0).GetNumberOfPoints()])
np.savez(a.out, **out)

if a.png:
    view = pv.CreateView("RenderView")
    view.ViewSize = [600, 450]
    view.RemoteRenderThreshold = 0  # render on the server
    view.OrientationAxesVisibility = 0
    d = pv.Show(reader, view)
    pv.ColorBy(d, ("POINTS", "loss"))
    d.RescaleTransferFunctionToDataRange(False, True)
    tube = pv.Tube(Input=pv.ExtractSurface(Input=pv.OutputPort(mt, 1)))
    tube.Radius = 0.01 * (reader.GetDataInformation(0).GetBounds()[1] - reader.GetDataInformation(0).GetBounds()[0])
    t = pv.Show(tube, view)
    t.ColorArrayName = ["POINTS", ""]
    t.DiffuseColor = [1, 0, 0]
    view.ResetCamera()
    pv.SaveScreenshot(a.png, view, ImageResolution=[600, 450])
print("done", flush=True)
