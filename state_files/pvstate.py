"""GlobScope's ParaView views: build the state files, load them on any study, fit and render them.

Runs inside pvpython/pvbatch (ParaView's Python, numpy 1.24, no pip vtk), with plugin/ and the repository
root on PYTHONPATH (globscope_core.stages.paraview_env sets them). Three uses:

    pvpython state_files/pvstate.py make STUDY            # (re)build state_files/*.pvsm on a study
    pvbatch  state_files/pvstate.py render STUDY OUTDIR [VIEW...]   # load each state on STUDY, write PNGs
    paraview --script=state_files/pvstate.py              # GUI: GLOBSCOPE_STUDY=STUDY, 2D state applied

State files name their sources (e.g. "Surface Warp"); after loading on another study, ``fit_view``
(state_files/fit_view.py, also for LoadState by hand) sets the camera, the sizes that depend on the data (warp
scale, tube radius, sphere size, iso-levels), rescales colour maps and writes the connect caption of that study.
No caption is saved in the state files: ``make`` clears it.

The views show ``log_loss`` (log10 of the loss), not ``loss``: decoded models' losses span decades, and a
linear scale lets one far grid corner flatten every basin. The 2D surface is warped, coloured and contoured
(levels evenly spaced) by it; runs and connect paths are lifted by their ``log_loss_decoded``, tree nodes and
arcs by their ``Scalar`` (the tree is computed on ``log_loss``); the 3D view volume-renders and isosurfaces it.
Landscape files without ``log_loss`` (written before it existed) are not supported: rerun `globscope landscape`.

`globscope connect`'s paths (connect-A-B-{2,3}d.vtp) come through the study reader's last port, empty when
the study has none: the 2D and 3D views draw them as tubes (pink straight line, green curve) and show their
legend only when there are some, so a study without them renders exactly as before. The view
"connect-plane" (Garipov et al.'s picture: the loss in the plane of the newest curve, both paths on it) is
built by ``build_plane`` from connect-A-B-plane.{vti,vtp}, no state file needed.

The state files were last built on a copy of a 3-run digits study (PCA landscapes, 33^2 and 13^3) with a
connect curve between runs 0 and 1; some saved values depend on that study (the volume's opacity unit
distance), so rebuild them on a similar study to keep renders unchanged.
"""
import os
import sys

from paraview import servermanager as sm
from paraview import simple as pv
from paraview.simple import *  # noqa: F401,F403 - the pvpython idiom

try:
    HERE = os.path.dirname(os.path.abspath(__file__))
except NameError:  # the GUI's --script runs this file's text, without __file__
    HERE = os.environ["GLOBSCOPE_STATE_DIR"]
PLUGIN = os.path.join(os.path.dirname(HERE), "plugin", "GlobScopePlugin.py")
STATES = {"landscape-2d": "landscape-2d.pvsm", "landscape-3d": "landscape-3d.pvsm",
          "trajectories-2d": "trajectories.pvsm"}
SIZE = [1200, 900]
# losses of decoded models span decades (0.03 in the basins, 30+ at far grid corners): the views warp, colour,
# contour and volume-render log10 of them, or one corner would flatten every basin
sys.path.insert(0, HERE)  # fit_view.py, next to this file
from fit_view import LOSS, connect_caption, data_range, fit_view  # noqa: E402  (it puts the repository on sys.path)

from globscope_core.storage import study_files  # noqa: E402 - the study's file names and views (stdlib only)

TITLES = {LOSS: "log10 loss"}


def load_plugin():
    if not hasattr(pv, "GlobScopeStudyReader"):
        pv.LoadPlugin(PLUGIN, ns=vars(pv))


def _port(src, i):
    return pv.OutputPort(src, i)


def _show(src, view, color_by=None, preset=None, solid=None, opacity=1.0, rep="Surface"):
    d = pv.Show(src, view)
    d.SetRepresentationType(rep)
    if color_by:
        pv.ColorBy(d, ("POINTS", color_by))
        lut = pv.GetColorTransferFunction(color_by)
        if preset:
            lut.ApplyPreset(preset, True)
        bar = pv.GetScalarBar(lut, view)
        bar.Title = TITLES.get(color_by, color_by)
        bar.ComponentTitle = ""
        bar.TitleColor = bar.LabelColor = [0.1, 0.1, 0.1]
    else:
        d.ColorArrayName = ["POINTS", ""]  # 5.11: ColorBy(d, None) raises
        if solid:
            d.AmbientColor = d.DiffuseColor = solid
    d.Opacity = opacity
    return d


def _reader(study, dim):
    r = pv.GlobScopeStudyReader(registrationName="Study", FileName=study_files.study_h5(study))
    r.Dimension = dim
    return r


def _trusted_part(src, trusted, name):
    """Cells of ``src`` where the landscape's ``trusted`` array is 1 (inside the hull of the encoded
    checkpoints), or, with ``trusted`` False, those touching the extrapolated rest (drawn faded)."""
    t = pv.Threshold(registrationName=name, Input=src)
    t.Scalars = ["POINTS", "trusted"]
    t.LowerThreshold, t.UpperThreshold = 0.5, 1.0
    t.ThresholdMethod = "Between" if trusted else "Below Lower Threshold"
    t.AllScalars = 1 if trusted else 0
    return t


def _trajectory_parts(r, view, warp, color_by, preset):
    """Runs as tubes (optionally lifted onto the warped surface) and the final checkpoints as spheres."""
    traj = _port(r, 1)
    if warp:
        traj = pv.WarpByScalar(registrationName="Trajectory Warp", Input=traj)
        traj.Scalars = ["POINTS", "log_loss_decoded"]
        traj.Normal = [0, 0, 1]
        traj.UseNormal = 1
    lift = pv.Transform(registrationName="Trajectory Lift", Input=traj)
    tube = pv.Tube(registrationName="Trajectory Tubes", Input=lift)
    tube.Scalars = ["POINTS", ""]
    tube.Radius = 0.01
    tube.NumberofSides = 10
    _show(tube, view, color_by, preset)
    finals = pv.ExtractCellsByType(registrationName="Final Checkpoints", Input=lift)
    finals.CellTypes = ["Vertex"]
    spheres = pv.Glyph(registrationName="Final Spheres", Input=finals, GlyphType="Sphere")
    spheres.ScaleArray = ["POINTS", "No scale array"]
    spheres.ScaleFactor = 0.05
    spheres.GlyphMode = "All Points"
    _show(spheres, view, solid=[1.0, 1.0, 1.0])


def _tree_parts(r, view, warp):
    """Merge tree arcs as dark tubes and nodes as spheres coloured by critical type."""
    arcs, nodes = _port(r, 3), _port(r, 2)
    if warp:
        arcs = pv.WarpByScalar(registrationName="Arc Warp", Input=arcs)
        nodes = pv.WarpByScalar(registrationName="Node Warp", Input=nodes)
        for w in (arcs, nodes):
            w.Scalars = ["POINTS", "Scalar"]  # the tree's scalar: log_loss (globscope topology's default)
            w.Normal = [0, 0, 1]
            w.UseNormal = 1
    arcs = pv.Transform(registrationName="Arc Lift", Input=arcs)
    nodes = pv.Transform(registrationName="Node Lift", Input=nodes)
    tube = pv.Tube(registrationName="Tree Arcs", Input=pv.ExtractSurface(Input=arcs))
    tube.Scalars = ["POINTS", ""]
    tube.Radius = 0.008
    _show(tube, view, solid=[0.75, 0.05, 0.05])
    glyph = pv.Glyph(registrationName="Tree Nodes", Input=nodes, GlyphType="Sphere")
    glyph.ScaleArray = ["POINTS", "No scale array"]
    glyph.ScaleFactor = 0.04
    glyph.GlyphMode = "All Points"
    _show(glyph, view, "CriticalType", "Rainbow Uniform")


# pink: unlike the dark red tree arcs, the rainbow runs and viridis; green: thicker than the runs' tubes
CONNECT_COLOURS = {name.lower(): list(rgb) for name, _, rgb in study_files.CONNECT_PATHS.values()}


def _connect_paths(src, view, prefix=""):
    """Straight line (cells with path 0) and trained curve (path 1) of ``globscope connect`` as tubes."""
    for value, (name, _, _) in sorted(study_files.CONNECT_PATHS.items()):
        part = pv.Threshold(registrationName=f"{prefix}Connect {name}", Input=src)
        part.Scalars = ["CELLS", "path"]
        part.LowerThreshold = part.UpperThreshold = value
        part.ThresholdMethod = "Between"
        tube = pv.Tube(registrationName=f"{prefix}Connect {name} Tube", Input=pv.ExtractSurface(Input=part))
        tube.Scalars = ["POINTS", ""]
        tube.Radius = 0.01
        tube.NumberofSides = 12
        d = _show(tube, view, solid=CONNECT_COLOURS[name.lower()])
        d.Specular = 0.3


def _connect_parts(r, view, warp):
    """The connect paths of the study (the reader's last port; empty, so invisible, when there are none)."""
    paths = _port(r, 6)
    if warp:  # onto the warped surface, like the trajectories: the log loss of the decoded point is its height
        paths = pv.WarpByScalar(registrationName="Connect Warp", Input=paths)
        paths.Scalars = ["POINTS", "log_loss_decoded"]
        paths.Normal = [0, 0, 1]
        paths.UseNormal = 1
    _connect_paths(pv.Transform(registrationName="Connect Lift", Input=paths), view)
    legend = pv.Text(registrationName="Connect Legend", Text="")  # fit_view writes the loaded study's caption
    d = pv.Show(legend, view)
    d.Color = [0.1, 0.1, 0.1]
    d.FontSize = 16
    d.WindowLocation = "Upper Left Corner"
    d.Visibility = 0  # fit_view shows it when the study has connect paths


def _view(v=None):
    if v is not None:  # the GUI's own view
        v.OrientationAxesVisibility = 0
        return v
    v = pv.CreateView("RenderView")
    v.ViewSize = SIZE
    v.OrientationAxesVisibility = 0
    v.Background = [1, 1, 1]
    try:  # 5.11: the palette's background wins unless this is off
        v.UseColorPaletteForBackground = 0
    except AttributeError:
        pass
    pv.AssignViewToLayout(v)
    return v


def build_2d(study, view=None):
    v = _view(view)
    r = _reader(study, 2)
    surf = pv.WarpByScalar(registrationName="Surface Warp", Input=r)
    surf.Scalars = ["POINTS", LOSS]
    d = _show(_trusted_part(surf, True, "Trusted Surface"), v, LOSS, "Viridis (matplotlib)")
    d.SetScalarBarVisibility(v, True)
    _show(_trusted_part(surf, False, "Extrapolated Surface"), v, LOSS, None, opacity=0.2)  # extrapolated: faded
    contour = pv.Contour(registrationName="Loss Contours", Input=r)
    contour.ContourBy = ["POINTS", LOSS]
    contour.ComputeScalars = 1
    contour.Isosurfaces = [0.0]
    cwarp = pv.WarpByScalar(registrationName="Contour Warp", Input=contour)
    cwarp.Scalars = ["POINTS", LOSS]
    _show(pv.Transform(registrationName="Contour Lift", Input=cwarp), v, solid=[0.1, 0.1, 0.1])
    _trajectory_parts(r, v, True, "run", "Rainbow Uniform")
    _tree_parts(r, v, True)
    _connect_parts(r, v, True)
    v.CameraPosition = [1.6, -2.6, 3.0]
    v.CameraViewUp = [0, 0, 1]
    return v


def build_3d(study):
    v = _view()
    r = _reader(study, 3)
    vol = _show(r, v, LOSS, "Viridis (matplotlib)", rep="Volume")
    vol.SetScalarBarVisibility(v, True)
    iso = pv.Contour(registrationName="Loss Isosurfaces", Input=r)
    iso.ContourBy = ["POINTS", LOSS]
    iso.ComputeScalars = 1
    iso.Isosurfaces = [0.0]
    _show(_trusted_part(iso, True, "Trusted Isosurfaces"), v, LOSS, None, opacity=0.35)  # cut to the trusted part
    _trajectory_parts(r, v, False, "run", "Rainbow Uniform")
    _tree_parts(r, v, False)
    _connect_parts(r, v, False)
    pv.Show(pv.Outline(registrationName="Box", Input=r), v).ColorArrayName = ["POINTS", ""]
    v.CameraPosition = [2.5, -3.5, 2.5]
    v.CameraViewUp = [0, 0, 1]
    return v


def build_traj(study):
    v = _view()
    r = _reader(study, 2)
    _show(r, v, LOSS, "Grayscale")
    contour = pv.Contour(registrationName="Loss Contours", Input=r)
    contour.ContourBy = ["POINTS", LOSS]
    contour.Isosurfaces = [0.0]
    _show(pv.Transform(registrationName="Contour Lift", Input=contour), v, solid=[0.35, 0.35, 0.35])
    _trajectory_parts(r, v, False, "step", "Plasma (matplotlib)")
    pv.GetDisplayProperties(pv.FindSource("Trajectory Tubes"), v).SetScalarBarVisibility(v, True)
    v.CameraPosition = [0, 0, 5]
    v.CameraViewUp = [0, 1, 0]
    v.CameraParallelProjection = 1
    return v


BUILDERS = {"landscape-2d": build_2d, "landscape-3d": build_3d, "trajectories-2d": build_traj}


def check_files(study, name):
    """LoadState only logs a missing file; say it clearly instead."""
    r = pv.FindSource("Study")
    fn = r.FileName if r is not None else ""
    if not fn or not os.path.exists(fn):
        raise SystemExit(f"{study}: the {name} state found no study.h5 there")
    need = study_files.landscape_vti(study, study_files.VIEWS[name])
    if not os.path.exists(need):
        raise SystemExit(f"{need}: missing (run `globscope landscape` first)")


def load(name, study):
    """Load one state file on ``study`` (data directory swapped), fitted; returns its view."""
    load_plugin()
    pv.LoadState(os.path.join(HERE, STATES[name]), data_directory=study, restrict_to_data_directory=True)
    check_files(study, name)
    view = pv.GetActiveViewOrCreate("RenderView")
    fit_view(view, name)
    return view


# --- the plane of a connect curve (Garipov et al.'s picture; built here, it needs no state file) --------------
def build_plane(study):
    """The loss in the plane through A, B and the bend (log colours, contours), both paths on it."""
    vti = study_files.newest_plane(study)
    if vti is None:
        raise SystemExit(f"{study}: no connect-*-plane.vti with its .vtp (run `globscope connect` first)")
    key = study_files.connect_key_of(vti)
    v = _view()
    img = pv.XMLImageDataReader(registrationName="Plane", FileName=[vti])
    img.PointArrayStatus = ["loss", "accuracy"]
    img.UpdatePipeline()
    lo, hi = data_range(img, 0, "loss") or (1e-3, 1.0)
    lo = max(lo, 1e-6)
    hi = max(hi, lo * 1.001)
    d = _show(img, v, "loss", "Viridis (matplotlib)")
    lut = pv.GetColorTransferFunction("loss")
    lut.RescaleTransferFunction(lo, hi)
    lut.MapControlPointsToLogSpace()
    lut.UseLogScale = 1  # the valley spans decades of loss: a linear map shows only the high ridge
    d.SetScalarBarVisibility(v, True)
    pv.GetScalarBar(lut, v).Title = "loss (log scale)"
    contour = pv.Contour(registrationName="Plane Contours", Input=img)
    contour.ContourBy = ["POINTS", "loss"]
    contour.Isosurfaces = [lo * (hi / lo) ** q for q in [i / 12 for i in range(1, 12)]]
    b = img.GetDataInformation(0).GetBounds()
    extent = max(b[1] - b[0], b[3] - b[2]) or 1.0
    clift = pv.Transform(registrationName="Plane Contour Lift", Input=contour)
    clift.Transform.Translate = [0, 0, 0.002 * extent]
    _show(clift, v, solid=[0.05, 0.05, 0.05], opacity=0.6)
    paths = pv.XMLPolyDataReader(registrationName="Plane Paths", FileName=[study_files.plane_paths(vti)])
    lift = pv.Transform(registrationName="Plane Path Lift", Input=paths)
    lift.Transform.Translate = [0, 0, 0.01 * extent]
    _connect_paths(lift, v, prefix="Plane ")
    for name in ("Line", "Curve"):
        pv.FindSource(f"Plane Connect {name} Tube").Radius = 0.007 * extent
    ends = pv.ExtractCellsByType(registrationName="Plane Ends", Input=lift)
    ends.CellTypes = ["Vertex"]
    spheres = pv.Glyph(registrationName="Plane End Spheres", Input=ends, GlyphType="Sphere")
    spheres.ScaleArray = ["POINTS", "No scale array"]
    spheres.ScaleFactor = 0.035 * extent
    spheres.GlyphMode = "All Points"
    _show(spheres, v, solid=[1.0, 1.0, 1.0])
    title = pv.Text(registrationName="Plane Title",
                    Text=f"{key}: loss in the plane through A, B and the bend\n"
                    + connect_caption(study, [key], with_key=False))
    t = pv.Show(title, v)
    t.Color = [0.1, 0.1, 0.1]
    t.FontSize = 16
    t.WindowLocation = "Upper Left Corner"
    v.CameraPosition = [0, 0, 5]
    v.CameraViewUp = [0, 1, 0]
    v.CameraParallelProjection = 1
    v.ResetCamera()
    v.GetActiveCamera().Zoom(1.15)
    return v


def render(study, out, names=None):
    study, out = os.path.abspath(study), os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    for name in names or STATES:
        pv.ResetSession()
        if name == study_files.PLANE_VIEW:
            view = build_plane(study)
        else:
            view = load(name, study)
        path = study_files.render_png(out, name)
        tmp = path + ".tmp.png"
        ok = pv.SaveScreenshot(tmp, view, ImageResolution=SIZE)
        _commit_png(tmp, path, ok)
        print("wrote", path, flush=True)


def _commit_png(tmp, path, ok):
    """The new PNG replaces the old one only when complete (signature and IEND read back); else one line."""
    try:
        with open(tmp, "rb") as fh:
            head = fh.read(8)
            fh.seek(max(0, os.path.getsize(tmp) - 12))
            good = ok is not False and head == b"\x89PNG\r\n\x1a\n" and b"IEND" in fh.read()
    except OSError:
        good = False
    if good:
        os.replace(tmp, path)
        return
    if os.path.exists(tmp):
        os.remove(tmp)
    directory, name = os.path.split(path)
    full = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize < (4 << 20)
    state = "unchanged" if os.path.exists(path) else "not written"
    raise SystemExit(f"no space left on {directory}: {name} {state}" if full
                     else f"{path}: ParaView wrote an incomplete image: {name} {state}")


def make(study):
    """Build the three views on ``study`` and save them as state files next to this script."""
    study = os.path.abspath(study)
    load_plugin()
    for name, builder in BUILDERS.items():
        pv.ResetSession()
        load_plugin()
        view = builder(study)
        fit_view(view, name)
        legend = pv.FindSource("Connect Legend")
        if legend is not None:  # captions belong to the study a state is loaded on, not to this one
            legend.Text = ""
            sm.GetRepresentation(legend, view).Visibility = 0
        pv.SaveState(os.path.join(HERE, STATES[name]))
        print("saved", STATES[name], flush=True)


if os.environ.get("GLOBSCOPE_GUI") == "1":  # paraview --script (globscope paraview): GUI with the 2D view
    # the 2D view built in the GUI's own view: LoadState from a --script crashes the 5.11 GUI (found by trying)
    load_plugin()
    gui_view = build_2d(os.path.abspath(os.environ["GLOBSCOPE_STUDY"]), pv.GetActiveViewOrCreate("RenderView"))
    fit_view(gui_view, "landscape-2d")
    # the pipeline browser selects the active source: the landscape (the reader's first port), not the last
    # source built (the hidden connect legend)
    pv.SetActiveSource(pv.FindSource("Study"))
    from gui_window import fill_screen  # noqa: E402 - next to this file

    try:  # ParaView opens its window at about 3/4 of the screen
        window = fill_screen()
    except Exception as exc:  # cosmetic: never worth the 2D view
        window = f"left as it is ({type(exc).__name__}: {exc})"
    pv.Render(gui_view)
    if os.environ.get("GLOBSCOPE_SCREENSHOT"):  # lets a test see what the GUI shows, and what it chose
        with open(os.environ["GLOBSCOPE_SCREENSHOT"] + ".txt", "w") as fh:
            fh.write(f"active {sm.ProxyManager().GetProxyName('sources', pv.GetActiveSource())}\nwindow {window}\n")
        pv.SaveScreenshot(os.environ["GLOBSCOPE_SCREENSHOT"], gui_view, ImageResolution=[800, 600])
elif __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["make"] and len(args) == 2:
        make(args[1])
    elif args[:1] == ["render"] and len(args) >= 3:
        render(args[1], args[2], args[3:] or None)
    else:
        raise SystemExit(__doc__)
