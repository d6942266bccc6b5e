"""Pictures of a study: pvbatch with our state files, or quick looks with matplotlib without ParaView.

``render_study(study_dir, out_dir)`` writes ``landscape-2d.png``, ``landscape-3d.png`` and
``trajectories-2d.png`` (those whose landscape exists), with ``globscope connect``'s straight line and curve
drawn over the landscapes when the study has them, and ``connect-plane.png`` (the loss in the plane of the
newest curve, with both paths) when there is a ``connect-*-plane.vti``. With ParaView it runs
``pvbatch state_files/pvstate.py render`` (with an Xvfb of its own when there is no display, and the environment
of globscope_core.stages.paraview_env); without it, it says so and draws quick looks with matplotlib (Agg, no display).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from ..errors import GlobScopeError
from ..storage import study_files
from ..storage.locks import holding
from ..storage.study_files import (
    CONNECT_PATHS,
    PLANE_VIEW,
    VIEWS,
    available_views,
    connect_files,
    newest_plane,
)
from . import paraview_env


@holding(lambda a: (a["study_dir"], "renders"))  # a second render of the study waits; its pictures then replace these
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
    from ..storage.vtk_files import verify_views

    verify_views(study_dir, views)  # damaged inputs: one line now, not a wrong picture (pvbatch checks nothing)
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


class RenderInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT), SIGTERM or SIGHUP during pvbatch, raised once pvbatch and its X server are stopped and
    waited for (nothing writes afterwards); ``str()`` says which images are new, which old ones are kept, which
    missing."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # ParaView's log colours, kept out of our one-line messages


def _pvbatch(pvbatch, study_dir, out_dir, views, timeout, verbose):
    """Run pvstate.py's render; with ``verbose``, a line per image as pvbatch writes it (~20 s each).

    pvbatch gets an X server of its own (paraview_env.started: no race between renders run side by side) and
    runs in its own process group, which is killed and waited for on every way out: done, failed, timed out,
    Ctrl-C, SIGTERM and SIGHUP."""
    env = paraview_env.environment()
    script = os.path.join(paraview_env.STATE_DIR, "pvstate.py")
    argv = [pvbatch, script, "render", study_dir, out_dir] + views
    if verbose:
        print(f"pvbatch: rendering {len(views)} view(s) of {study_dir} (about 20 s each)", flush=True)
    t0 = time.perf_counter()
    log, wrote = [], []
    reader = None

    def follow(stream):  # a thread: the main one keeps the timeout
        for line in stream:
            log.append(line)
            if line.startswith("wrote "):
                wrote.append(line[6:].strip())
                if verbose:
                    print(f"  [{len(wrote)}/{len(views)}] wrote {line[6:].strip()} ({time.perf_counter() - t0:.0f} s)",
                          flush=True)

    timed_out, proc = False, None
    try:
        with paraview_env.started(argv, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace") as proc:
            reader = threading.Thread(target=follow, args=(proc.stdout,), daemon=True)
            reader.start()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
        # here pvbatch's whole group is gone and its X server stopped: its pipe reaches its end
        reader.join(timeout=10)
    except KeyboardInterrupt as exc:  # SIGINT; SIGTERM or SIGHUP (exc.signum, paraview_env): all stopped already
        if reader is not None:
            reader.join(timeout=10)
        signum = getattr(exc, "signum", signal.SIGINT)
        _remove_partials(out_dir, views)
        raise RenderInterrupted(signum, f"{study_dir}: stopped by {signal.Signals(signum).name} with pvbatch and its X "
                                        f"server; {_left(out_dir, views, wrote)}") from None
    finally:
        if proc is not None:
            proc.stdout.close()
    if timed_out:
        _remove_partials(out_dir, views)
        raise GlobScopeError(f"{study_dir}: pvbatch did not finish within {timeout} s (stopped); "
                             f"{_left(out_dir, views, wrote)}")
    if proc.returncode != 0:
        problem = _disk_problem(out_dir, "".join(log))  # before the partial PNGs go: they take the space
        _remove_partials(out_dir, views)
        if problem:
            raise GlobScopeError(f"{problem}: {_left(out_dir, views, wrote)}")
        rc = proc.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else f"exit {rc}"
        tail = [t for t in (" ".join(ANSI.sub("", ln).split()) for ln in log) if t][-3:]
        raise GlobScopeError(f"{study_dir}: pvbatch failed ({how}): {' | '.join(tail) or 'no output'}")


def _disk_problem(out_dir, log_text):
    """'no space left on DIR' or 'DIR is read-only' when that is why pvbatch failed (it may show only a crash)."""
    try:
        st = os.statvfs(out_dir)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY or not os.access(out_dir, os.W_OK):
        return f"{out_dir} is read-only"
    if st.f_bavail * st.f_frsize < (4 << 20) or "No space left on device" in log_text:
        return f"no space left on {out_dir}"
    return None


def _remove_partials(out_dir, views):
    """pvstate.py writes each PNG under NAME.tmp.png and renames it when complete: a stopped one leaves its part."""
    for v in views:
        tmp = study_files.render_png(out_dir, v) + ".tmp.png"
        try:
            os.remove(tmp)
        except OSError:
            pass


def _left(out_dir, views, wrote):
    """What the renders folder holds for ``views`` after a stopped or failed pvbatch, in one clause."""
    new, kept, missing = [], [], []
    for v in views:
        path = study_files.render_png(out_dir, v)
        name = os.path.basename(path)
        (new if path in wrote else kept if os.path.exists(path) else missing).append(name)
    parts = [f"{', '.join(names)} {what}" for names, what in ((new, "written"), (kept, "unchanged (older)"),
                                                              (missing, "not written")) if names]
    return "; ".join(parts)


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
    # without a display (tests, a remote shell) the GUI gets an Xvfb of its own; the window is closed with us
    with paraview_env.started([exe, f"--script={script}"], env, screen=GUI_SCREEN) as proc:
        return proc.wait()


GUI_SCREEN = (1600, 1000)  # the screen of the GUI's own Xvfb when there is no display
