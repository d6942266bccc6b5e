"""`pip install .` (not editable): the wheel ships the ParaView plugin and state files, and `globscope` finds them.

A copy of the checkout is built (sdist, then a wheel from the sdist: MANIFEST.in and setup.py's build step both
count) and the wheel is installed, not editable, into a fresh virtual environment. Its dependencies (torch, numpy...)
come from this test's environment through a .pth file: a .pth line adds a directory to sys.path without running the
.pth files in it, so the editable install's finder there (which maps globscope_core to the checkout) stays out.
Every check runs outside the checkout and verifies that globscope_core is the installed copy.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_PV = shutil.which("pvbatch") is not None and shutil.which("pvpython") is not None
needs_pv = pytest.mark.skipif(not HAVE_PV, reason="Debian ParaView (pvpython/pvbatch) not installed; setup.sh installs it")
PV_PYTHON = "/usr/bin/python3"  # Debian's ParaView runs the system python3 (numpy 1.24, no torch, no pip vtk)


def _run(argv, cwd, env=None, timeout=120):
    p = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout, check=False)
    assert p.returncode == 0, f"{' '.join(map(str, argv))} (exit {p.returncode}):\n{p.stdout[-4000:]}"
    return p.stdout


def _checkout_files() -> list[str]:
    """The working tree as git sees it (tracked and untracked, not ignored): what `pip install .` would build."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        return [f for f in out.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]
    except (OSError, subprocess.CalledProcessError):  # no git: everything but the usual build outputs
        skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache"}
        files = []
        for d, dirs, names in os.walk(ROOT):
            dirs[:] = [x for x in dirs if x not in skip and not x.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(d, n), ROOT) for n in names if not n.endswith(".pyc")]
        return files


def _clean_env(**extra) -> dict:
    """No PYTHONPATH, no venv of ours: only the fresh install (and its .pth) can provide globscope_core."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONSAFEPATH")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The fresh venv: .venv (its directory), .py (its python), .site (its site-packages), .work (a directory
    outside the checkout to run from)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    for f in _checkout_files():
        os.makedirs(src / os.path.dirname(f), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    # sdist from the copy, then a wheel from the unpacked sdist (as `python -m build` does)
    dist = tmp / "dist"
    dist.mkdir()
    build_sdist = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    sdist = _run([sys.executable, "-c", build_sdist, str(dist)], cwd=src).strip().splitlines()[-1]
    with tarfile.open(dist / sdist) as t:
        t.extractall(tmp / "sdist", filter="data")
    (unpacked,) = glob.glob(str(tmp / "sdist" / "*"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-w", str(dist), unpacked], cwd=tmp)
    (wheel,) = glob.glob(str(dist / "globscope-*.whl"))

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    py = str(venv / "bin" / "python")
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp,
                env=_clean_env()).strip()
    # the dependencies (and pip) from this test's environment, after the fresh site-packages on sys.path
    with open(os.path.join(site, "_globscope_test_deps.pth"), "w") as f:
        f.write(sysconfig.get_path("purelib") + "\n")
    # a real, non-editable install of the wheel; -I: never touch the editable globscope the .pth makes visible
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
          "--disable-pip-version-check", wheel], cwd=tmp, env=_clean_env())
    work = tmp / "work"
    work.mkdir()
    return SimpleNamespace(venv=venv, py=py, site=site, work=str(work))


PROBE = r"""
import json, os, sys
from importlib import resources
import globscope_core
from globscope_core.stages import paraview_env as pe
data = resources.files("globscope_core") / "paraview"
env = pe.environment()
print(json.dumps({
    "file": globscope_core.__file__, "path": sys.path,
    "resources": sorted(p.name for d in ("plugin", "state_files") for p in (data / d).iterdir()),
    "plugin": pe.PLUGIN, "plugin_dir": pe.PLUGIN_DIR, "state_dir": pe.STATE_DIR, "root": pe.ROOT,
    "pythonpath": env["PYTHONPATH"].split(os.pathsep),
}))
"""


@pytest.fixture(scope="module")
def probe(installed):
    out = _run([installed.py, "-c", PROBE], cwd=installed.work, env=_clean_env())
    return json.loads(out.strip().splitlines()[-1])


def _inside(path, top):
    return os.path.realpath(path).startswith(os.path.realpath(top) + os.sep)


def test_wheel_installs_package_with_plugin_and_state_files(installed, probe):
    site = installed.site
    assert _inside(probe["file"], site), f"globscope_core imported from {probe['file']}, not the fresh install"
    assert not any(os.path.realpath(p) == os.path.realpath(ROOT) for p in probe["path"] if p)
    for name in ("GlobScopePlugin.py", "sitecustomize.py", "pvstate.py", "fit_view.py", "landscape-2d.pvsm",
                 "landscape-3d.pvsm", "trajectories.pvsm"):
        assert name in probe["resources"], f"{name} not shipped in the wheel"
    assert not glob.glob(os.path.join(site, "state_files")) and not glob.glob(os.path.join(site, "plugin"))
    for k in ("plugin", "plugin_dir", "state_dir", "root"):
        assert _inside(probe[k], site) and os.path.exists(probe[k]), (k, probe[k])
    assert os.path.isfile(os.path.join(probe["state_dir"], "pvstate.py"))
    # pvstate.py loads ../plugin/GlobScopePlugin.py, relative to itself
    assert os.path.realpath(os.path.join(probe["state_dir"], "..", "plugin", "GlobScopePlugin.py")) == \
        os.path.realpath(probe["plugin"])


def test_pvbatch_pythonpath_holds_only_globscope_core(installed, probe):
    """ParaView's PYTHONPATH: the installed plugin/ and a directory with only globscope_core, never site-packages."""
    site = installed.site
    first = probe["pythonpath"][:2]
    assert first == [probe["plugin_dir"], probe["root"]]
    assert os.listdir(probe["root"]) == ["globscope_core"]
    for p in probe["pythonpath"]:
        assert os.path.realpath(p) not in (os.path.realpath(site), os.path.realpath(sysconfig.get_path("purelib")))
    for p in first:
        assert not os.path.exists(os.path.join(p, "numpy")) and not os.path.exists(os.path.join(p, "vtkmodules"))


@pytest.mark.skipif(not os.access(PV_PYTHON, os.X_OK), reason=f"{PV_PYTHON} (ParaView's Python) not present")
def test_paraview_python_imports_installed_numpy_only_modules(installed, probe):
    """What pvpython/pvbatch do: the system python3 with paraview_env's PYTHONPATH imports the installed modules."""
    site, work = installed.site, installed.work
    chk = subprocess.run([PV_PYTHON, "-c", "import numpy"], capture_output=True, check=False)
    if chk.returncode != 0:
        pytest.skip(f"{PV_PYTHON} has no numpy (ParaView's python3-numpy)")
    code = ("import json, numpy, globscope_core, globscope_core.topology as t, globscope_core.storage.vtk_files as v, "
            "globscope_core.stages.render as r; "
            "print(json.dumps([numpy.__file__, globscope_core.__file__, t.__file__, v.__file__, r.__file__, "
            "globscope_core.__version__, hasattr(t, 'compute_topology')]))")
    out = _run([PV_PYTHON, "-s", "-c", code], cwd=work,
               env=_clean_env(PYTHONPATH=os.pathsep.join(probe["pythonpath"])))
    np_file, init, topo, vtkf, render, version, has = json.loads(out.strip().splitlines()[-1])
    assert not _inside(np_file, site) and not _inside(np_file, sysconfig.get_path("purelib")), np_file
    for f in (init, topo, vtkf, render):
        assert _inside(f, os.path.join(site, "globscope_core")) and not _inside(f, probe["root"]), f
    assert version and has


def test_globscope_cli_runs(installed):
    work = installed.work
    exe = str(installed.venv / "bin" / "globscope")
    with open(exe) as f:
        assert f.readline().strip() == f"#!{installed.py}"  # the fresh venv's python, not the checkout's .venv
    out = _run([exe, "--help"], cwd=work, env=_clean_env())
    assert "render" in out


@pytest.mark.paraview
@needs_pv
def test_installed_render_with_pvbatch(installed, tmp_path):
    """A real pvbatch render of a small study by the installed package (one view, about 20 s)."""
    site, work = installed.site, installed.work
    from conftest import make_study

    from globscope_core.reducers import fit_reducer
    from globscope_core.stages.landscape import compute_landscape
    from globscope_core.stages.topology import study_topology

    study = tmp_path / "study"
    st = make_study(study, runs=2, epochs=2, widths=(16,), seed=3)
    fit_reducer(st, "pca", 2)
    compute_landscape(st, "pca-2d", resolution=17, eval_samples=128, device="cpu", progress=False)
    study_topology(str(study), 2, verbose=False)
    out = tmp_path / "renders"
    code = ("import json, sys, globscope_core; from globscope_core.stages.render import render_study; "
            "r = render_study(sys.argv[1], sys.argv[2], paraview=True, timeout=240, views=['landscape-2d']); "
            "print(json.dumps([globscope_core.__file__, r]))")
    text = _run([installed.py, "-c", code, str(study), str(out)], cwd=work, env=_clean_env(), timeout=300)
    init, res = json.loads(text.strip().splitlines()[-1])
    assert _inside(init, site)
    assert res["renderer"] == "pvbatch"
    png = res["images"]["landscape-2d"]
    assert os.path.getsize(png) > 10_000, png
