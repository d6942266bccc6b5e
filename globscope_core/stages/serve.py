"""`globscope serve`: a browser view of a study, served from the machine that holds it.

The app (state_files/web_app.py) is a trame app in ParaView's own Python: it loads GlobScope's state files, so the
browser shows what `globscope render` and the GUI show, rendered on this machine (nothing but images reaches the
browser). trame is installed for ParaView's Python apart from the virtualenv (``paraview-site`` next to it, by
setup.sh): the virtualenv's own site-packages must stay off ParaView's path (its pip vtk crashes ParaView).
"""
from __future__ import annotations

import getpass
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from ..errors import GlobScopeError
from ..storage import study_files
from . import paraview_env

TRAME_PINS = ("trame==4.0.0", "trame-vtk==2.11.17", "trame-vuetify==3.3.0")  # what setup.sh installs


def trame_dir() -> str:
    """Where trame is installed for ParaView's Python: $GLOBSCOPE_TRAME, else PREFIX/paraview-site of this Python."""
    d = os.environ.get("GLOBSCOPE_TRAME") or os.path.join(sys.prefix, "paraview-site")
    if not os.path.isdir(os.path.join(d, "trame")) or not os.path.isdir(os.path.join(d, "trame_vtk")):
        raise GlobScopeError(f"{d}: trame is not installed there for ParaView's Python: run `bash setup.sh`, or "
                             f"`pip install --target {d} {' '.join(TRAME_PINS)}` (or set GLOBSCOPE_TRAME to such a "
                             "directory)")
    return d


def _port_free(host: str, port: int) -> int:
    """``port`` if it can be bound on ``host`` (0: a free one, chosen now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise GlobScopeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass another --port, "
                                 "or --port 0 for a free one") from None
        return s.getsockname()[1]


def _accepts(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex((host if host not in ("0.0.0.0", "") else "127.0.0.1", port)) == 0


def tunnel_hint(host: str, port: int) -> str:
    """The one line that says how to reach the view from another computer."""
    me, machine = getpass.getuser(), socket.getfqdn()
    if host in ("127.0.0.1", "localhost"):
        return (f"from your computer: ssh -N -L {port}:localhost:{port} {me}@{machine}  then open "
                f"http://localhost:{port}/")
    return f"open http://{machine}:{port}/ (listening on {host}: anyone who reaches this port sees the study)"


def serve_study(studies, port: int = 8080, host: str = "127.0.0.1", out: str | None = None,
                ready_timeout: float = 300, announce=print) -> int:
    """Serve the study directories ``studies`` (one, or a list) until interrupted; returns 0 (an app that stops
    on its own is an error)."""
    studies = [os.path.abspath(s) for s in ([studies] if isinstance(studies, str) else studies)]
    for study_dir in studies:
        if not os.path.exists(study_files.study_h5(study_dir)):
            raise GlobScopeError(f"{study_dir}: not a study (no {study_files.STUDY_H5})")
        study_files.available_views(study_dir)  # a study without a landscape: one line now
    pvpython = paraview_env.require("pvpython")
    trame = trame_dir()
    port = _port_free(host, port)
    if out:  # decoded models go there: a folder that cannot take them is refused now, not at the first pick
        from ..storage.safe_write import check_writable

        out = os.path.abspath(out)
        check_writable(out, what="serve")
    else:
        out = tempfile.mkdtemp(prefix="globscope-serve-")
    env = paraview_env.environment()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], trame])  # after plugin/ and the package
    app = os.path.join(paraview_env.STATE_DIR, "web_app.py")
    argv = [pvpython, app, *studies, "--port", str(port), "--host", host, "--out", out]
    lines = []
    with paraview_env.started(argv, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        def drain():  # the app's output: kept for an error message, and never left to fill the pipe
            for line in proc.stdout:
                lines.append(line.rstrip())
                del lines[:-50]
        threading.Thread(target=drain, daemon=True).start()
        t0 = time.monotonic()
        while not _accepts(host, port):
            if proc.poll() is not None:
                raise GlobScopeError(f"the web view did not start (exit {proc.returncode}): {_last(lines)}")
            if time.monotonic() - t0 > ready_timeout:
                raise GlobScopeError(f"the web view did not start within {ready_timeout:.0f} s: {_last(lines)}")
            time.sleep(0.2)
        announce(f"serving {', '.join(studies)} at http://{host}:{port}/ (started in {time.monotonic() - t0:.1f} s; "
                 f"decoded models go to {out}; Ctrl-C stops it)")
        announce(tunnel_hint(host, port))
        rc = proc.wait()
    if rc != 0:
        raise GlobScopeError(f"the web view stopped (exit {rc}): {_last(lines)}")
    return 0


def _last(lines: list) -> str:
    useful = [x for x in lines if x.strip() and not x.lstrip().startswith(("File ", "^", "Traceback"))]
    return useful[-1].strip() if useful else "no output"
