"""Fit a loaded GlobScope state to the study it was loaded on: camera, sizes, colour ranges, captions.

A state file remembers the study it was built on: its camera, warp scale, tube and sphere sizes, contour
levels and colour ranges. After ``LoadState(..., data_directory=STUDY)`` call ``fit_view()`` (pvpython,
pvbatch or the GUI's Python shell, with the repository root on PYTHONPATH):

    from state_files.fit_view import fit_view
    LoadState('state_files/landscape-2d.pvsm', data_directory='/path/to/study', restrict_to_data_directory=True)
    fit_view()          # the view kind is found from the pipeline; fit_view(view, "landscape-3d") to say it

`globscope render` (state_files/pvstate.py) calls the same function. Runs in ParaView's own Python
(numpy 1.24, no pip vtk); the study's file names come from globscope_core.storage.study_files (stdlib only).
"""
import json
import os
import sys

from paraview import servermanager as sm
from paraview import simple as pv

# globscope_core from a checkout (the repository root) or an installed wheel (the stub package beside us, setup.py)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _dir in (_ROOT, os.path.join(_ROOT, "python")):
    if os.path.isdir(os.path.join(_dir, "globscope_core")) and _dir not in sys.path:
        sys.path.append(_dir)
        break
from globscope_core.storage import study_files  # noqa: E402

LOSS = "log_loss"
VIEWS = tuple(study_files.VIEWS)
# the colour legend of `globscope connect`'s paths; the per-study barriers are added from its report.json
CONNECT_LEGEND = study_files.CONNECT_LEGEND


def view_kind():
    """Which of our views the loaded pipeline is (its sources are named by state_files/pvstate.py)."""
    if pv.FindSource("Loss Isosurfaces") is not None:
        return "landscape-3d"
    if pv.FindSource("Surface Warp") is not None:
        return "landscape-2d"
    if pv.FindSource("Study") is not None:
        return "trajectories-2d"
    raise RuntimeError("fit_view: no GlobScope view loaded (no source named 'Study'); LoadState one of "
                       "state_files/*.pvsm first")


def data_range(src, port, name, kind="POINTS"):
    info = src.GetDataInformation(port) if port else src.GetDataInformation()
    attrs = info.DataInformation.GetPointDataInformation() if kind == "POINTS" else None
    a = attrs.GetArrayInformation(name) if attrs else None
    return a.GetComponentRange(0) if a is not None else None


def _coloured(rep):
    """A representation coloured by an array (text has no ColorArrayName at all)."""
    return rep is not None and rep.GetProperty("ColorArrayName") is not None and bool(rep.ColorArrayName[1])


def _set(name, prop, value):
    s = pv.FindSource(name)
    if s is not None:
        setattr(s, prop, value)


def fit_view(view=None, name=None):
    """Sizes, colour ranges, camera and captions from the data now loaded (any study, any latent scale)."""
    view = view or pv.GetActiveViewOrCreate("RenderView")
    name = name or view_kind()
    if name not in VIEWS:
        raise ValueError(f"fit_view: unknown view '{name}' (one of {', '.join(VIEWS)})")
    r = pv.FindSource("Study")
    r.UpdatePipeline()
    b = r.GetDataInformation(0).GetBounds()
    extent = max(b[1] - b[0], b[3] - b[2], (b[5] - b[4]) if name == "landscape-3d" else 0.0) or 1.0
    lo, hi = data_range(r, 0, LOSS) or (0.0, 1.0)
    span = (hi - lo) or 1.0
    warp = 0.45 * extent / span  # the surface's height (its decades of loss) is 45% of its width
    for w in ("Surface Warp", "Contour Warp", "Trajectory Warp", "Arc Warp", "Node Warp", "Connect Warp"):
        _set(w, "ScaleFactor", warp)
    lift = 0.0 if name == "landscape-3d" else 0.008 * extent  # above the surface, not inside it
    for t in ("Trajectory Lift", "Arc Lift", "Node Lift", "Contour Lift"):
        s = pv.FindSource(t)
        if s is not None:
            s.Transform.Translate = [0, 0, lift]
    connect_lift = pv.FindSource("Connect Lift")  # above the trajectories: the paths end on runs' finals
    if connect_lift is not None:
        connect_lift.Transform.Translate = [0, 0, 2 * lift]
    # 3D: the line's tube is wider than the curve's: where the two paths meet in the latent view, it stays visible
    # as a rim around the curve (in 2D they are lifted apart)
    line_frac = 0.014 if name == "landscape-3d" else 0.009
    for t, frac in (("Trajectory Tubes", 0.006), ("Tree Arcs", 0.004), ("Connect Line Tube", line_frac),
                    ("Connect Curve Tube", 0.009)):
        _set(t, "Radius", frac * extent)
    for g, frac in (("Final Spheres", 0.035), ("Tree Nodes", 0.025)):
        _set(g, "ScaleFactor", frac * extent)
    _set("Loss Contours", "Isosurfaces", [lo + span * i / 10 for i in range(1, 10)])  # evenly spaced in log10
    _set("Loss Isosurfaces", "Isosurfaces", [lo + span * q for q in (0.12, 0.3)])
    for src in pv.GetSources().values():  # colour maps follow the new data
        rep = sm.GetRepresentation(src, view)  # (GetDisplayProperties would create and show one)
        if _coloured(rep) and rep.Visibility:
            src.UpdatePipeline()
            rep.RescaleTransferFunctionToDataRange(False, True)
    # the loss colours span the whole landscape, not whichever loss-coloured part (a cut isosurface) came last
    pv.GetColorTransferFunction(LOSS).RescaleTransferFunction(lo, hi)
    bars = {"trajectories-2d": (LOSS, "step")}.get(name, (LOSS,))
    for src in pv.GetSources().values():  # one legend per colour that matters, no overlapping bars
        rep = sm.GetRepresentation(src, view)
        if _coloured(rep):
            rep.SetScalarBarVisibility(view, bool(rep.Visibility) and rep.ColorArrayName[1] in bars)
    _fit_connect_legend(view, r, 3 if name == "landscape-3d" else 2)
    if name == "landscape-3d":  # volume: low loss opaque, high loss clear
        pwf = pv.GetOpacityTransferFunction(LOSS)
        pwf.Points = [lo, 0.55, 0.5, 0.0, lo + 0.25 * span, 0.08, 0.5, 0.0, hi, 0.0, 0.5, 0.0]
    view.ResetCamera()  # keeps the state's direction of view, moves to this study's data
    view.CenterOfRotation = view.GetActiveCamera().GetFocalPoint()  # the GUI rotates about the data, not the old one
    view.GetActiveCamera().Zoom(1.25 if name == "trajectories-2d" else 1.1)
    return view


def _barriers(study, key):
    """Train-loss barriers (line, curve) of report.json's section ``key``, or None."""
    try:
        with open(study_files.report_json(study)) as f:
            sec = json.load(f)[key]
        return sec["line_summary"]["train_loss_barrier"], sec["curve_summary"]["train_loss_barrier"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def connect_caption(study, keys, with_key=True):
    """The colour legend and, per connect key, the train-loss barriers of report.json."""
    lines = [CONNECT_LEGEND]
    for key in keys:
        b = _barriers(study, key)
        if b is not None:
            lines.append(f"{key + ': ' if with_key else ''}train-loss barrier: line {b[0]:.3g}, curve {b[1]:.3g}")
    return "\n".join(lines)


def _fit_connect_legend(view, r, dim):
    """The caption comes from the loaded study's connect files, or there is none (never the state's old one)."""
    legend = pv.FindSource("Connect Legend")
    if legend is None:
        return
    n = r.GetDataInformation(6).GetNumberOfPoints()
    text = ""
    if n:
        study = os.path.dirname(r.FileName)
        keys = [study_files.connect_key_of(p) for p in study_files.connect_files(study, f"{dim}d")]
        text = connect_caption(study, keys)
    legend.Text = text
    sm.GetRepresentation(legend, view).Visibility = int(bool(text))
