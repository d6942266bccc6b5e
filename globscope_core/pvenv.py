"""Running ParaView's programs (pvpython, pvbatch, pvserver, paraview) with the fixes they need.

Debian's ParaView 5.11 needs, found by trying it (shared/paraview.md):
- plugin/ on PYTHONPATH: its sitecustomize.py restores ``inspect.getargspec`` (removed in Python 3.11)
  in every ParaView process and MPI rank, without which no Python plugin loads;
- the repository root on PYTHONPATH (the plugin imports globscope_core.topology), but never our venv's
  site-packages: its pip ``vtk`` shadows ParaView's vtkmodules and crashes it;
- an X server for rendering: ``xvfb-run -a`` when there is no DISPLAY (offscreen mode aborts);
- OpenMPI refuses root without OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM), e.g. in containers and CI.
"""
from __future__ import annotations

import os
import shutil

from .errors import GlobScopeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_DIR = os.path.join(ROOT, "plugin")
PLUGIN = os.path.join(PLUGIN_DIR, "GlobScopePlugin.py")
STATE_DIR = os.path.join(ROOT, "state_files")


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


def environment(base: dict | None = None) -> dict:
    """The environment for a ParaView process (see the module docstring for why each variable)."""
    env = dict(os.environ if base is None else base)
    venv = env.pop("VIRTUAL_ENV", None)
    keep = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and "site-packages" not in p and not (venv and p.startswith(venv))]
    env["PYTHONPATH"] = os.pathsep.join([PLUGIN_DIR, ROOT] + [p for p in keep if p not in (PLUGIN_DIR, ROOT)])
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
