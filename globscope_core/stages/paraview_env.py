"""Running ParaView's programs (pvpython, pvbatch, pvserver, paraview) with the fixes they need.

Debian's ParaView 5.11 needs, found by trying it (shared/paraview.md):
- plugin/ on PYTHONPATH: its sitecustomize.py restores ``inspect.getargspec`` (removed in Python 3.11)
  in every ParaView process and MPI rank, without which no Python plugin loads;
- the repository root on PYTHONPATH (the plugin imports globscope_core.topology and storage.study_files), but never our venv's
  site-packages: its pip ``vtk`` shadows ParaView's vtkmodules and crashes it. Installed from a wheel, plugin/ and
  state_files/ are package data (globscope_core/paraview/, see setup.py) and the PYTHONPATH entry is
  globscope_core/paraview/python, which holds only a stub globscope_core that loads the installed package;
- an X server for rendering: ``xvfb-run -a`` when there is no DISPLAY (offscreen mode aborts);
- OpenMPI refuses root without OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM), e.g. in containers and CI;
- TTK, when `setup.sh --with-ttk` installed it: PV_PLUGIN_PATH names its plugin directory, which every
  ParaView process (GUI, pvpython, pvbatch, pvserver and each MPI rank) loads at start-up, and its Python
  wrappers (``topologytoolkit``) go on PYTHONPATH. GLOBSCOPE_NO_TTK=1 leaves TTK out (our own engine).
"""
from __future__ import annotations

import glob
import os
import shutil

from ..errors import GlobScopeError

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # globscope_core/
# A wheel (`pip install .`) ships plugin/ and state_files/ as globscope_core/paraview/{plugin,state_files} (setup.py
# copies them) with a stub package in globscope_core/paraview/python/globscope_core; a checkout or editable install
# has them at the repository root, next to globscope_core/.
INSTALLED = os.path.join(PACKAGE, "paraview")
CHECKOUT = os.path.dirname(PACKAGE)


def _locate() -> tuple[str, str]:
    """(the directory holding plugin/ and state_files/, the directory to put on ParaView's PYTHONPATH).

    Installed: the PYTHONPATH entry is the stub's directory, which holds only globscope_core, never the
    installed package's parent (site-packages: its pip vtk and numpy 2 would shadow ParaView's own)."""
    if os.path.isfile(os.path.join(INSTALLED, "plugin", "GlobScopePlugin.py")):
        return INSTALLED, os.path.join(INSTALLED, "python")
    return CHECKOUT, CHECKOUT


DATA_ROOT, ROOT = _locate()  # ROOT: the directory that gives ParaView's Python `import globscope_core`
PLUGIN_DIR = os.path.join(DATA_ROOT, "plugin")
PLUGIN = os.path.join(PLUGIN_DIR, "GlobScopePlugin.py")
STATE_DIR = os.path.join(DATA_ROOT, "state_files")


def find(program: str) -> str | None:
    """Path of a ParaView program (pvpython, pvbatch, pvserver, paraview); $PARAVIEW_BIN first."""
    extra = os.environ.get("PARAVIEW_BIN")
    if extra:
        p = os.path.join(extra, program)
        if os.access(p, os.X_OK):
            return p
    return shutil.which(program)


def require(program: str) -> str:
    p = find(program)
    if p is None:
        raise GlobScopeError(f"{program} not found: install ParaView (Debian: apt-get install paraview "
                             "python3-paraview xvfb) or set PARAVIEW_BIN to its bin directory")
    return p


TTK_ROOT = "/opt/globscope-ttk"  # setup.sh --with-ttk's default prefix is TTK_ROOT/ttk-<version>-pv<ParaView>
TTK_PLUGIN = os.path.join("bin", "plugins", "TopologyToolKit", "TopologyToolKit.so")
TTK_PYTHON = os.path.join("lib", "python3", "site-packages")


def paraview_version(env: dict | None = None) -> str | None:
    """'5.11' for the ParaView whose pvpython we run (from its library directory, without starting it)."""
    pv = find("pvpython")
    if pv is None:
        return None
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(pv)))
    for d in sorted(glob.glob(os.path.join(prefix, "lib", "*", "paraview-*")) +
                    glob.glob(os.path.join(prefix, "lib", "paraview-*"))):
        v = os.path.basename(d).split("-", 1)[1]
        if v[:1].isdigit():
            return v
    return None


def ttk_prefix(env: dict | None = None) -> str | None:
    """The TTK install for this ParaView: $TTK_PREFIX, else the newest under /opt/globscope-ttk; None if none
    (or GLOBSCOPE_NO_TTK=1)."""
    env = os.environ if env is None else env
    if env.get("GLOBSCOPE_NO_TTK", "") not in ("", "0"):
        return None
    if env.get("TTK_PREFIX"):
        p = env["TTK_PREFIX"]
        return p if os.path.exists(os.path.join(p, TTK_PLUGIN)) else None
    pv = paraview_version(env)
    cands = sorted(glob.glob(os.path.join(TTK_ROOT, f"ttk-*-pv{pv or '*'}", TTK_PLUGIN)))
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(cands[-1])))) if cands else None


def ttk_plugin(env: dict | None = None) -> str | None:
    p = ttk_prefix(env)
    return os.path.join(p, TTK_PLUGIN) if p else None


def environment(base: dict | None = None) -> dict:
    """The environment for a ParaView process (see the module docstring for why each variable)."""
    env = dict(os.environ if base is None else base)
    venv = env.pop("VIRTUAL_ENV", None)
    keep = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and "site-packages" not in p and not (venv and p.startswith(venv))]
    first = [PLUGIN_DIR, ROOT]
    ttk = ttk_prefix(env)
    if ttk:  # TTK's C++ plugin loads at start-up in every process; its Python wrappers on the path
        first.append(os.path.join(ttk, TTK_PYTHON))
        plugins = os.path.dirname(os.path.join(ttk, TTK_PLUGIN))
        old = [p for p in env.get("PV_PLUGIN_PATH", "").split(os.pathsep) if p and p != plugins]
        env["PV_PLUGIN_PATH"] = os.pathsep.join([plugins] + old)
    env["PYTHONPATH"] = os.pathsep.join(first + [p for p in keep if p not in first])
    env.pop("PYTHONHOME", None)
    env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
    env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")  # mpiexec -n 2 on a 1-core box
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")  # keep the checkout clean
    return env


def needs_xvfb(env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY")


def command(argv: list[str], env: dict | None = None, display: bool = True) -> list[str]:
    """``argv`` wrapped in ``xvfb-run -a`` when it renders and there is no display."""
    if display and needs_xvfb(env):
        xvfb = shutil.which("xvfb-run")
        if xvfb is None:
            raise GlobScopeError("no DISPLAY and no xvfb-run: install xvfb (apt-get install xvfb) to render")
        return [xvfb, "-a", "-s", "-screen 0 1280x1024x24"] + argv
    return argv
