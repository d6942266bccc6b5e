"""Pictures of a study: pvbatch with our state files, or quick looks with matplotlib without ParaView.

``render_study(study_dir, out_dir)`` writes ``landscape-2d.png``, ``landscape-3d.png`` and
``trajectories-2d.png`` (those whose landscape exists), with ``globscope connect``'s straight line and curve
drawn over the landscapes when the study has them, and ``connect-plane.png`` (the loss in the plane of the
newest curve, with both paths) when there is a ``connect-*-plane.vti``. With ParaView it runs
``pvbatch state_files/pvstate.py render`` (under xvfb-run when there is no display, with the environment
of globscope_core.stages.paraview_env); without it, it says so and draws quick looks with matplotlib (Agg, no display).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from ..errors import GlobScopeError
from ..storage import study_files
from ..storage.study_files import (
    CONNECT_PATHS,
    PLANE_VIEW,
    VIEWS,
    available_views,
    connect_files,
    newest_plane,
)
from . import paraview_env


def render_study(study_dir: str, out_dir: str | None = None, paraview: bool | None = None, timeout: int = 600,
                 verbose: bool = True, views: list[str] | None = None) -> dict:
    """Render the study's views to ``out_dir`` (default STUDY/renders); returns {view: png path, ...}.

    ``paraview``: None uses pvbatch when it is installed, True requires it, False forces the quick look.
    ``views``: a subset of the available views (default: all of them).
    """
    study_dir = os.path.abspath(study_dir)
    out_dir = os.path.abspath(out_dir or study_files.renders_dir(study_dir))
    have = available_views(study_dir)
    absent = [v for v in views or [] if v not in have]
    if absent:
        raise GlobScopeError(f"{study_dir}: cannot render {', '.join(absent)} (this study has {', '.join(have)})")
    views = list(views) if views else have
    from ..storage.safe_write import check_writable

    check_writable(out_dir, (4 << 20) * len(views), "render")  # refused before pvbatch starts, not after
    pvbatch = paraview_env.find("pvbatch") if paraview is not False else None
    if paraview and pvbatch is None:
        paraview_env.require("pvbatch")
    t0 = time.perf_counter()
    if pvbatch is not None:
        _pvbatch(pvbatch, study_dir, out_dir, views, timeout, verbose)
        how = "pvbatch"
        verbose = False  # _pvbatch said "wrote" for each image as it came
    else:
        if verbose:
            why = "quick looks asked for" if paraview is False else "ParaView (pvbatch) not found"
            print(f"{why}: writing quick-look images with matplotlib instead of the ParaView renders "
                  "(install paraview, python3-paraview and xvfb for those)", file=sys.stderr, flush=True)
        for v in views:
            out = study_files.render_png(out_dir, v)
            plane_quick_look(study_dir, out) if v == PLANE_VIEW else quick_look(study_dir, v, out)
        how = "matplotlib"
    paths = {v: study_files.render_png(out_dir, v) for v in views}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise GlobScopeError(f"{study_dir}: rendering wrote no {', '.join(map(os.path.basename, missing))}")
    if verbose:
        for p in paths.values():
            print("wrote", p, flush=True)
    return {"renderer": how, "seconds": round(time.perf_counter() - t0, 2), "images": paths}


def _pvbatch(pvbatch, study_dir, out_dir, views, timeout, verbose):
    """Run pvstate.py's render; with ``verbose``, a line per image as pvbatch writes it (~20 s each)."""
    env = paraview_env.environment()
    script = os.path.join(paraview_env.STATE_DIR, "pvstate.py")
    argv = paraview_env.command([pvbatch, script, "render", study_dir, out_dir] + views, env)
    if verbose:
        print(f"pvbatch: rendering {len(views)} view(s) of {study_dir} (about 20 s each)", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log = []

    def follow():  # a thread: the main one keeps the timeout
        done = 0
        for line in proc.stdout:
            log.append(line)
            if verbose and line.startswith("wrote "):
                done += 1
                print(f"  [{done}/{len(views)}] wrote {line[6:].strip()} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # the whole group: xvfb-run, Xvfb and pvbatch
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise GlobScopeError(f"{study_dir}: pvbatch did not finish within {timeout} s") from None
    finally:
        reader.join(timeout=10)
    if proc.returncode != 0:
        tail = [ln.strip() for ln in log if ln.strip()][-3:]
        raise GlobScopeError(f"{study_dir}: pvbatch failed (exit {proc.returncode}): {' | '.join(tail)}")


# --- quick looks without ParaView -----------------------------------------------------------------------
def _polylines(path):
    """Points [n, 3], point arrays and the point indices of each line of a .vtp."""
    from ..storage import vtk_files

    pd = vtk_files.read_any(path)
    pts = np.asarray([pd.GetPoint(i) for i in range(pd.GetNumberOfPoints())]).reshape(-1, 3)
    cells = pd.GetLines()
    ids = cells.GetConnectivityArray()
    offsets = cells.GetOffsetsArray()
    conn = np.asarray([ids.GetValue(i) for i in range(ids.GetNumberOfValues())], np.int64)
    off = np.asarray([offsets.GetValue(i) for i in range(offsets.GetNumberOfValues())], np.int64)
    return pts, vtk_files.arrays_of(pd), [conn[a:b] for a, b in zip(off[:-1], off[1:])]


def _trajectories(path):
    if not os.path.exists(path):
        return []
    pts, arrays, lines = _polylines(path)
    return [(pts[line], arrays.get("run", np.zeros(len(pts)))[line], arrays.get("step", np.arange(len(pts)))[line])
            for line in lines]


CONNECT_STYLE = {k: (label, study_files.hex_colour(rgb)) for k, (_, label, rgb) in CONNECT_PATHS.items()}


def _draw_connect(ax, paths: list[str]) -> None:
    """The straight line (path 0) and the curve (path 1) of each connect file, with their end points."""
    for i, path in enumerate(paths):
        pts, arrays, lines = _polylines(path)
        for line in lines:
            kind = int(arrays["path"][line[0]])
            name, colour = CONNECT_STYLE.get(kind, ("path", "k"))
            ax.plot(pts[line, 0], pts[line, 1], color="k", lw=4.5, zorder=7)  # dark edge: visible on any colour
            ax.plot(pts[line, 0], pts[line, 1], color=colour, lw=3, zorder=8, label=name if i == 0 else None)
            ax.scatter(pts[line[[0, -1]], 0], pts[line[[0, -1]], 1], s=60, c="white", edgecolors="k", zorder=9)
    if paths:
        ax.legend(loc="upper left", fontsize=9)


def _tree(study_dir, dim):
    from ..storage import vtk_files

    nodes_vtu, arcs_vtu, _, _ = study_files.topology_files(study_files.topology_dir(study_dir, dim))
    if not os.path.exists(nodes_vtu):
        return None, None
    nodes = vtk_files.read_any(nodes_vtu)
    arcs = vtk_files.read_any(arcs_vtu)
    npos = np.asarray([nodes.GetPoint(i) for i in range(nodes.GetNumberOfPoints())]).reshape(-1, 3)
    apos = np.asarray([arcs.GetPoint(i) for i in range(arcs.GetNumberOfPoints())]).reshape(-1, 3)
    return (npos, vtk_files.arrays_of(nodes).get("CriticalType")), apos.reshape(-1, 2, 3)


def quick_look(study_dir: str, view: str, path: str) -> str:
    """A matplotlib picture of one view: loss (min over z in 3D), contours, trajectories, merge tree."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..storage import vtk_files

    dim = VIEWS[view]
    f = vtk_files.read_vti(study_files.landscape_vti(study_dir, dim))
    loss = f.grid("loss")
    img = np.nanmin(loss, axis=0)  # 3D: lowest loss along z, so every basin shows
    nx, ny, _ = f.dims
    x = f.origin[0] + np.arange(nx) * f.spacing[0]
    y = f.origin[1] + np.arange(ny) * f.spacing[1]
    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    cmap = "gray" if view.startswith("trajectories") else "viridis"
    im = ax.pcolormesh(x, y, img, cmap=cmap, shading="auto")
    ax.contour(x, y, img, levels=12, colors="k", linewidths=0.5, alpha=0.6)
    fig.colorbar(im, ax=ax, label="loss" + (" (min over z)" if dim == 3 else ""))
    by_step = view.startswith("trajectories")
    for pts, run, step in _trajectories(study_files.trajectories_vtp(study_dir, dim)):
        if by_step:
            ax.scatter(pts[:, 0], pts[:, 1], c=step, cmap="plasma", s=10, zorder=3)
            ax.plot(pts[:, 0], pts[:, 1], color="k", lw=0.6, zorder=2)
        else:
            ax.plot(pts[:, 0], pts[:, 1], lw=2.5, color=plt.cm.tab10(int(run[0]) % 10), zorder=3)
        ax.scatter(pts[-1:, 0], pts[-1:, 1], s=70, c="white", edgecolors="k", zorder=4)
    if not by_step:
        nodes, arcs = _tree(study_dir, dim)
        if nodes is not None:
            for a in arcs:
                ax.plot(a[:, 0], a[:, 1], color="firebrick", lw=1.5, zorder=5)
            ax.scatter(nodes[0][:, 0], nodes[0][:, 1], c=nodes[1], cmap="rainbow", s=40, edgecolors="k", zorder=6)
        _draw_connect(ax, connect_files(study_dir, f"{dim}d"))
    ax.set_aspect("equal")
    ax.set_title(f"{os.path.basename(study_dir)}: {view} (quick look, no ParaView)")
    from ..storage.safe_write import save_figure

    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


def plane_quick_look(study_dir: str, path: str) -> str:
    """The loss in the plane of the newest connect curve (log colours, contours) with both paths."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    from ..storage import vtk_files

    vti = newest_plane(study_dir)
    key = study_files.connect_key_of(vti)
    f = vtk_files.read_vti(vti)
    loss = np.maximum(f.grid("loss")[0], 1e-6)
    nx, ny, _ = f.dims
    x = f.origin[0] + np.arange(nx) * f.spacing[0]
    y = f.origin[1] + np.arange(ny) * f.spacing[1]
    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    norm = mcolors.LogNorm(loss.min(), max(loss.max(), loss.min() * 1.001))
    im = ax.pcolormesh(x, y, loss, cmap="viridis", norm=norm, shading="auto")
    ax.contour(x, y, loss, levels=np.geomspace(norm.vmin, norm.vmax, 13)[1:-1], colors="k", linewidths=0.5, alpha=0.6)
    fig.colorbar(im, ax=ax, label="loss (log scale)")
    _draw_connect(ax, [study_files.plane_paths(vti)])
    title = f"{key}: loss in the plane through A, B and the bend"
    try:
        with open(study_files.report_json(study_dir)) as fh:
            sec = json.load(fh)[key]
        title += (f"\ntrain-loss barrier: line {sec['line_summary']['train_loss_barrier']:.3g}, "
                  f"curve {sec['curve_summary']['train_loss_barrier']:.3g}")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    ax.set_aspect("equal")
    ax.set_title(title + " (quick look, no ParaView)", fontsize=10)
    from ..storage.safe_write import save_figure

    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


def open_gui(study_dir: str) -> int:
    """The ParaView GUI with the plugin loaded and the 2D view of ``study_dir`` applied."""
    study_dir = os.path.abspath(study_dir)
    if not os.path.exists(study_files.landscape_vti(study_dir, 2)):
        raise GlobScopeError(f"{study_dir}: no landscape-2d.vti (run `globscope landscape` first)")
    exe = paraview_env.require("paraview")
    env = paraview_env.environment()
    env["GLOBSCOPE_STUDY"] = study_dir
    env["GLOBSCOPE_GUI"] = "1"
    env["GLOBSCOPE_STATE_DIR"] = paraview_env.STATE_DIR
    script = os.path.join(paraview_env.STATE_DIR, "pvstate.py")
    return subprocess.call(paraview_env.command([exe, f"--script={script}"], env), env=env)
