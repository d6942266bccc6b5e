"""pvbatch driver: load each state file by hand (LoadState onto a study), then fit_view(); print what it set.

    pvbatch pv_fit_view.py PLUGIN STATE_DIR STUDY [STUDY ...]

One line per (study, view): "FIT {json}" with the camera and sizes right after LoadState ("raw_*") and after
fit_view, the colour range of log_loss and the connect caption. The test compares them with the data.
"""
import json
import sys

from paraview import servermanager as sm
from paraview import simple as pv

plugin, state_dir, studies = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, state_dir)
from fit_view import fit_view  # noqa: E402  (the function the README names)

STATES = {"landscape-2d": "landscape-2d.pvsm", "landscape-3d": "landscape-3d.pvsm",
          "trajectories-2d": "trajectories.pvsm"}


def camera(view):
    c = view.GetActiveCamera()
    return {"focal": list(c.GetFocalPoint()), "position": list(c.GetPosition()),
            "parallel_scale": c.GetParallelScale(), "center_of_rotation": list(view.CenterOfRotation)}


def get(name, prop):
    s = pv.FindSource(name)
    return None if s is None else getattr(s, prop)


for study in studies:
    for name, state in STATES.items():
        pv.ResetSession()
        pv.LoadPlugin(plugin, ns=vars(pv))
        pv.LoadState(f"{state_dir}/{state}", data_directory=study, restrict_to_data_directory=True)
        view = pv.GetActiveViewOrCreate("RenderView")
        raw = dict(camera(view), warp=get("Surface Warp", "ScaleFactor"), sphere=get("Final Spheres", "ScaleFactor"))
        fit_view(view)  # the view kind found from the pipeline, as a user would call it
        legend = pv.FindSource("Connect Legend")
        rgb = pv.GetColorTransferFunction("log_loss").RGBPoints
        out = dict(study=study, view=name, raw=raw, **camera(view), warp=get("Surface Warp", "ScaleFactor"),
                   sphere=get("Final Spheres", "ScaleFactor"), lut=[rgb[0], rgb[-4]],
                   caption=None if legend is None else legend.Text,
                   caption_visible=None if legend is None else int(sm.GetRepresentation(legend, view).Visibility),
                   file=pv.FindSource("Study").FileName)
        print("FIT " + json.dumps(out), flush=True)
print("done", flush=True)
