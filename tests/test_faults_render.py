"""Faults around ParaView (stages/render.py, stages/paraview_env.py, state_files/): renders side by side,
interrupts, a full or read-only disk under pvbatch, and the GUI window.

Real `globscope render` processes (pvbatch on Xvfb) on copies of one small real study. The processes a
render starts are found in /proc while it runs (descendants of the command), so a test can tell that none
of them outlives it. Full disks are a real tmpfs (root; without the right to mount, those cases skip).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import default_signals, fill, tmpfs

from globscope_core.stages import paraview_env

HAVE_PV = paraview_env.find("pvpython") is not None and paraview_env.find("pvbatch") is not None
needs_pv = pytest.mark.skipif(not HAVE_PV, reason="Debian ParaView (pvpython/pvbatch) not installed; setup.sh "
                              "installs it")
VIEWS = ["landscape-2d", "trajectories-2d"]  # a 2D study: the two views a render writes


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A real digits study with a 2D PCA landscape and its merge tree: what `render` draws (built once)."""
    from conftest import make_study

    from globscope_core.reducers import fit_reducer
    from globscope_core.stages.landscape import compute_landscape
    from globscope_core.stages.topology import study_topology

    path = tmp_path_factory.mktemp("render") / "study"
    s = make_study(path, runs=2, epochs=3, widths=(16,), eval_samples=256)
    fit_reducer(s, "pca", 2)
    compute_landscape(s, "pca-2d", resolution=17, eval_samples=128, device="cpu", progress=False)
    study_topology(str(path), 2, verbose=False)
    return str(path)


def _copy(study, dst):
    shutil.copytree(study, dst)
    return str(dst)


def _render(*argv, **kw):
    """`globscope render ...` as a process of its own (``python -m``: PYTHONPATH picks the code under test)."""
    env = dict(os.environ, **kw.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "globscope_core.cli", "render", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=default_signals, **kw)


def _no_display():
    env = dict(os.environ)
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    return env


def _stat(pid):
    """(command name, state, parent pid, start time) of a process, or None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    rest = text[text.rindex(")") + 2:].split()
    return comm, rest[0], int(rest[1]), rest[19]


def _descendants(root):
    """{pid: (name, start time)} of every process below ``root`` now."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st:
                parent[int(d)] = st
    out, todo = {}, [root]
    while todo:
        p = todo.pop()
        for c, st in parent.items():
            if st[2] == p and c not in out:
                out[c] = (st[0], st[3])
                todo.append(c)
    return out


def _alive(procs):
    """Those of ``procs`` (from _descendants) still running: same pid and start time, not a zombie."""
    left = []
    for pid, (name, start) in procs.items():
        st = _stat(pid)
        if st and st[3] == start and st[1] != "Z":
            left.append(f"{name} ({pid})")
    return left


def _watch(proc, until, timeout=240):
    """Collect ``proc``'s descendants while it runs until ``until(seen)`` holds; returns all seen so far."""
    seen, deadline = {}, time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        seen.update(_descendants(proc.pid))
        if until(seen):
            return seen
        time.sleep(0.1)
    return seen


def _has_pvbatch(seen):
    return any(name.startswith("pvbatch") for name, _ in seen.values())


def _image(path):
    import matplotlib.image as mpimg

    return mpimg.imread(path)[..., :3].astype(np.float64)


def _assert_picture(path, what):
    assert os.path.getsize(path) > 10_000, f"{what}: {os.path.getsize(path)} bytes"
    img = _image(path)
    differs = np.abs(img - img[0, 0]).sum(-1) > 0.1
    assert differs.mean() > 0.05, f"{what}: {differs.mean():.1%} of the pixels differ from the background"
    assert img.std() > 0.03, f"{what}: almost uniform"
    return img


def _pngs(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".png")) if os.path.isdir(d) else []


def _sha(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _stale_x_locks(seen, since):
    """X lock files written after ``since`` naming one of ``seen``'s processes that is gone: a server killed
    without cleaning up."""
    stale = []
    for f in os.listdir("/tmp"):
        if f.startswith(".X") and f.endswith("-lock"):
            path = os.path.join("/tmp", f)
            try:
                pid = int(open(path).read().strip())
                new = os.path.getmtime(path) >= since
            except (OSError, ValueError):
                continue
            if new and pid in seen and not _alive({pid: seen[pid]}):
                stale.append(f)
    return stale


# --- four renders at once -----------------------------------------------------------------------------
@pytest.mark.paraview
@needs_pv
def test_four_renders_at_once_all_succeed(study, tmp_path):
    """Four `globscope render` started together, no display: each gets an X server of its own (Xvfb's
    -displayfd, -noreset), so none aborts. Before, with `xvfb-run -a`: 1 of the 4 here aborted (SIGABRT, "bad
    X server connection"), and 2 of 4 pvbatch runs of a sphere in each of 3 tries; -displayfd without
    -noreset still lost 1 of 4 (a connection refused while the server reset)."""
    copies = [_copy(study, tmp_path / f"s{i}") for i in range(4)]
    t0 = time.monotonic()
    procs = [_render(c, env=_no_display()) for c in copies]
    outs = [p.communicate(timeout=600) for p in procs]
    took = time.monotonic() - t0
    failed = [(c, p.returncode, err[-1500:]) for c, p, (_, err) in zip(copies, procs, outs) if p.returncode != 0]
    assert not failed, failed
    first = None
    for c in copies:
        renders = os.path.join(c, "renders")
        assert _pngs(renders) == [f"{v}.png" for v in VIEWS], (c, os.listdir(renders))
        assert not [f for f in os.listdir(renders) if not f.endswith(".png")], os.listdir(renders)
        img = _assert_picture(os.path.join(renders, "landscape-2d.png"), f"{c} landscape-2d")
        _assert_picture(os.path.join(renders, "trajectories-2d.png"), f"{c} trajectories-2d")
        if first is None:
            first = img
        else:  # the same study: the same picture, whichever X server drew it
            assert img.shape == first.shape and np.abs(img - first).mean() < 0.01, c
    print(f"four renders at once: {took:.1f} s")


# --- interrupts and timeouts ----------------------------------------------------------------------------
@pytest.mark.paraview
@needs_pv
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGHUP", "timeout"])
def test_a_stopped_render_leaves_nothing_running(study, tmp_path, how):
    """Ctrl-C, SIGTERM, SIGHUP (a closed terminal) or --timeout once pvbatch runs: the command returns only when
    pvbatch and its X server are gone, says in one line what the folder holds, and no PNG appears afterwards
    (before: pvbatch ran on and wrote its PNGs after "interrupted"; SIGTERM and SIGHUP ended the command
    silently; a timeout said nothing of the images and killed Xvfb with SIGKILL, leaving its lock file)."""
    s = _copy(study, tmp_path / "s")
    renders = os.path.join(s, "renders")
    argv = [s] + (["--timeout", "4"] if how == "timeout" else [])
    t0 = time.time() - 1
    proc = _render(*argv, env=_no_display())
    seen = _watch(proc, _has_pvbatch)
    assert _has_pvbatch(seen), (seen, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
    if how != "timeout":
        time.sleep(1.0)  # pvbatch is loading: the first image is seconds away
        seen.update(_descendants(proc.pid))
        os.kill(proc.pid, getattr(signal, how))
    out, err = proc.communicate(timeout=120)
    alive = _alive(seen)
    assert not alive, f"still running after `render` returned: {alive}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    if how == "timeout":
        assert proc.returncode == 2 and "did not finish within 4 s" in lines[0], (proc.returncode, err)
    else:
        assert proc.returncode == 128 + getattr(signal, how), (proc.returncode, err)
        assert lines[0].startswith("globscope render: interrupted: ") and f"stopped by {how}" in lines[0], err
    assert "landscape-2d.png" in lines[0] and "not written" in lines[0], lines[0]
    stale = _stale_x_locks(seen, t0)
    assert not stale, f"X lock files of killed servers: {stale}"
    time.sleep(3)  # had pvbatch survived, it would write now
    assert not os.path.isdir(renders) or os.listdir(renders) == [], os.listdir(renders)


# --- full or read-only disk under pvbatch ---------------------------------------------------------------
@pytest.mark.paraview
@needs_pv
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_disk_fault_under_pvbatch_is_one_line(study, tmp_path, fault):
    """The renders folder's file system fills up (or turns read-only) once pvbatch has started: one line
    naming the folder ("no space left on DIR: ..." / "DIR is read-only: ..."), no colour codes, the older
    image unchanged, no partial PNG (before: "pvbatch failed (exit N): ..." with ParaView's coloured log)."""
    with tmpfs(tmp_path / "fs") as fs:
        out = os.path.join(fs, "renders")
        os.makedirs(out)
        old = os.path.join(out, "landscape-2d.png")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.imsave(old, np.random.default_rng(0).random((40, 40)))  # an older render
        before = _sha(old)
        proc = _render(study, "--out", out, env=_no_display())
        seen = _watch(proc, _has_pvbatch)
        assert _has_pvbatch(seen), proc.communicate()
        if fault == "full":
            fill(fs)
        else:
            r = subprocess.run(["mount", "-o", "remount,ro", fs], capture_output=True, text=True)
            if r.returncode:
                proc.kill()
                pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.strip()}")
        _, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, (proc.returncode, err)
        assert "\x1b" not in err, repr(err)
        want = f"no space left on {out}: " if fault == "full" else f"{out} is read-only: "
        assert lines[0].startswith("globscope render: error: " + want), lines[0]
        assert "landscape-2d.png unchanged (older)" in lines[0] and "trajectories-2d.png not written" in lines[0], \
            lines[0]
        assert _sha(old) == before
        assert sorted(os.listdir(out)) == ["landscape-2d.png"], os.listdir(out)
        assert not _alive(seen)


# --- the GUI window --------------------------------------------------------------------------------------
def _gui_window():
    sys.path.insert(0, paraview_env.STATE_DIR)
    try:
        import gui_window
    finally:
        sys.path.remove(paraview_env.STATE_DIR)
    return gui_window


@pytest.mark.parametrize("case,expected", [
    ((True, None), ("maximize", None)),  # a window manager maximizes on the window's own monitor
    ((False, [0, 30, 1600, 970]), ("resize", (0, 30, 1600, 970))),  # none, but a published work area
    ((False, None), ("resize", (0, 0, 1600, 1000))),  # neither: the whole screen
])
def test_gui_window_plan(case, expected):
    wm, area = case
    assert _gui_window().plan((1600, 1000), area, wm) == expected


@pytest.mark.paraview
@needs_pv
def test_gui_window_fills_the_screen_with_the_landscape_selected(study, tmp_path, monkeypatch):
    """`globscope paraview STUDY` on a 1600x1000 screen: the main window fills it and the landscape (the study
    reader) is the active source, which the pipeline browser selects (before: 1152x762 here, the hidden
    connect legend selected). Ctrl-C on the command closes the GUI with it."""
    if paraview_env.find("paraview") is None:
        pytest.fail("the ParaView GUI (paraview) is not installed")
    gw = _gui_window()
    shot = tmp_path / "gui.png"
    with paraview_env.XServer((1600, 1000)) as xenv:
        env = dict(os.environ, GLOBSCOPE_SCREENSHOT=str(shot), **xenv)
        proc = subprocess.Popen([sys.executable, "-m", "globscope_core.cli", "paraview", study], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=default_signals)
        seen = {}
        try:
            deadline = time.time() + 200
            while not shot.exists() and proc.poll() is None and time.time() < deadline:
                seen.update(_descendants(proc.pid))
                time.sleep(0.5)
            assert shot.exists(), "the GUI did not show the 2D view"
            info = dict(ln.split(" ", 1) for ln in (tmp_path / "gui.png.txt").read_text().splitlines())
            assert info["active"] == "Study", info
            seen.update(_descendants(proc.pid))
            gui = [pid for pid, (name, _) in seen.items() if name.startswith("paraview")]
            assert gui, seen
            for k, v in xenv.items():  # Xlib reads DISPLAY and XAUTHORITY from the environment
                monkeypatch.setenv(k, v)
            x = gw._xlib()
            dpy = x.XOpenDisplay(None)
            assert dpy, xenv
            try:
                root = x.XDefaultRootWindow(dpy)
                size = None
                for _ in range(40):  # the GUI applies the new size when its event loop runs again
                    found = gw.main_window(x, dpy, root, gui[0])
                    size = found and tuple(found[1:])
                    if size == (1600, 1000):
                        break
                    time.sleep(0.25)
            finally:
                x.XCloseDisplay(dpy)
            assert size == (1600, 1000), f"the main window is {size} on a 1600x1000 screen"
            os.kill(proc.pid, signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 130, out[-2000:]
            assert not _alive(seen), _alive(seen)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
