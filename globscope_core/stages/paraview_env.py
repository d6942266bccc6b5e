"""Running ParaView's programs (pvpython, pvbatch, pvserver, paraview) with the fixes they need.

Debian's ParaView 5.11 needs, found by trying it (shared/paraview.md):
- plugin/ on PYTHONPATH: its sitecustomize.py restores ``inspect.getargspec`` (removed in Python 3.11)
  in every ParaView process and MPI rank, without which no Python plugin loads;
- the repository root on PYTHONPATH (the plugin imports globscope_core.topology and storage.study_files), but never our venv's
  site-packages: its pip ``vtk`` shadows ParaView's vtkmodules and crashes it. Installed from a wheel, plugin/ and
  state_files/ are package data (globscope_core/paraview/, see setup.py) and the PYTHONPATH entry is
  globscope_core/paraview/python, which holds only a stub globscope_core that loads the installed package;
- an X server for rendering when there is no DISPLAY: an Xvfb of its own per process (``XServer``, ``started``,
  ``run``; not ``xvfb-run -a``, whose choice of display races). Debian's build has no EGL or OSMesa offscreen
  path: ``--force-offscreen-rendering`` aborts (SIGABRT) without an X server;
- OpenMPI refuses root without OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM), e.g. in containers and CI;
- TTK, when `setup.sh --with-ttk` installed it: PV_PLUGIN_PATH names its plugin directory, which every
  ParaView process (GUI, pvpython, pvbatch, pvserver and each MPI rank) loads at start-up, and its Python
  wrappers (``topologytoolkit``) go on PYTHONPATH. GLOBSCOPE_NO_TTK=1 leaves TTK out (our own engine);
- GLOBSCOPE_PYTHON names this Python: the plugin's GlobScope Decode Point runs `globscope decode` with it
  (ParaView's Python has no torch).
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

from ..errors import GlobScopeError, Terminated

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
    # one process alone (pvbatch, the GUI) starts no MPI daemon (orted): it would outlive a stopped process group
    env.setdefault("OMPI_MCA_ess_singleton_isolated", "1")
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")  # keep the checkout clean
    env.setdefault("GLOBSCOPE_PYTHON", sys.executable)  # the plugin's Decode Point runs our CLI (torch) with it
    return env


def needs_xvfb(env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY")


SCREEN = (1280, 1024)  # our Xvfb's screen: larger than a render (state_files/pvstate.py SIZE, 1200x900)


class XServer:
    """An Xvfb of our own, for one ParaView process: the server picks a free display itself (``-displayfd``).

    Not ``xvfb-run -a``: it chooses a number by looking for a free lock file and then starts the server, so two
    started together can take the same number; one server then fails and its pvbatch, connected to the other
    server without its cookie, aborts (SIGABRT in vtkXOpenGLRenderWindow::CreateAWindow). With ``-displayfd``
    Xvfb takes the first display whose socket it can bind (which only one server can) and writes the number to
    a pipe once it accepts connections. ``-noreset``: by default the server
    resets when its last client leaves, and a client that connects meanwhile is refused (pvbatch reconnects
    after its display test, MPI ranks connect one after another): with six servers starting at once, 1
    connection in 3 failed that way (xvfb-run's servers reset too). Like xvfb-run, access needs a cookie
    (``XAUTHORITY``). The server runs in a process group of its own and gets SIGTERM if we die (PDEATHSIG),
    so even a SIGKILLed globscope leaves no X server behind."""

    def __init__(self, size: tuple[int, int] = SCREEN):
        self.size = size
        self.proc = None
        self.dir = None
        self.env: dict = {}  # DISPLAY and XAUTHORITY for the clients

    def start(self, timeout: float = 60) -> dict:
        import select
        import tempfile

        xvfb = shutil.which("Xvfb")
        if xvfb is None:
            raise GlobScopeError("no DISPLAY and no Xvfb: install xvfb (apt-get install xvfb) to render")
        self.dir = tempfile.mkdtemp(prefix="globscope-x-")
        cookie = os.urandom(16)
        server_auth = os.path.join(self.dir, "server.xauth")
        _write_xauth(server_auth, "", cookie)  # the server takes every cookie of its file, whatever the number
        log = os.path.join(self.dir, "xvfb.log")
        r, w = os.pipe()
        try:
            with open(log, "wb") as fh:
                self.proc = subprocess.Popen(
                    [xvfb, "-displayfd", str(w), "-screen", "0", f"{self.size[0]}x{self.size[1]}x24",
                     "-nolisten", "tcp", "-noreset", "-auth", server_auth], pass_fds=(w,), stdin=subprocess.DEVNULL,
                    stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent())
            os.close(w)
            w = -1
            number, deadline = b"", time.monotonic() + timeout
            while not number.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([r], [], [], left)[0]:
                    raise GlobScopeError(f"Xvfb gave no display number within {timeout:.0f} s")
                chunk = os.read(r, 32)
                if not chunk:  # it exited before it was ready
                    with open(log, errors="replace") as fh:
                        why = [ln.strip() for ln in fh if ln.strip()][-1:] or ["no message"]
                    raise GlobScopeError(f"Xvfb did not start (exit {self.proc.wait()}): {why[0]}")
                number += chunk
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        client_auth = os.path.join(self.dir, "client.xauth")
        _write_xauth(client_auth, number.decode().strip(), cookie)
        self.env = {"DISPLAY": ":" + number.decode().strip(), "XAUTHORITY": client_auth}
        return self.env

    def stop(self) -> None:
        """SIGTERM (Xvfb removes its lock file and socket), SIGKILL after 5 s; the temporary folder goes too."""
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGTERM, grace=5.0)
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> dict:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _write_xauth(path: str, number: str, cookie: bytes) -> None:
    """One MIT-MAGIC-COOKIE-1 entry for any host (FamilyWild) in the Xauthority format (what `xauth add` writes)."""
    def field(b: bytes) -> bytes:
        return struct.pack(">H", len(b)) + b

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(struct.pack(">H", 0xFFFF) + field(b"") + field(number.encode()) + field(b"MIT-MAGIC-COOKIE-1")
                 + field(cookie))


def _die_with_parent():
    """A preexec_fn asking the kernel to send SIGTERM to the child when the thread that started it dies."""
    if threading.current_thread() is not threading.main_thread():
        return None  # PDEATHSIG follows the starting thread: from another thread it could fire too early
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def child():
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl: no signal would come
            os.kill(os.getpid(), signal.SIGTERM)
    return child


def _stop_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, grace: float = 0.0) -> None:
    """Stop ``proc``'s process group (it leads one: started with start_new_session) and any descendant that left
    it (a daemon in a session of its own), and wait until none is left: ``sig`` first, SIGKILL after ``grace``
    seconds. Returns once no member can run any more."""
    strays = {}  # only while the pid is still ours (not reaped): after that it may name another process
    if proc.returncode is None:
        strays = {p: t for p, t in _descendants(proc.pid).items() if _pgid(p) != proc.pid}
    stages = [(sig, grace)] if sig != signal.SIGKILL else []
    for s, wait in stages + [(signal.SIGKILL, 10.0)]:
        for target in [None] + list(strays):
            try:
                os.killpg(proc.pid, s) if target is None else _kill_if(target, strays[target], s)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while True:
            if proc.returncode is None:
                try:
                    proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            else:
                try:
                    os.killpg(proc.pid, 0)  # members that are not our children (reaped by init)
                    busy = True
                except (ProcessLookupError, PermissionError):
                    busy = False
                strays = {p: t for p, t in strays.items() if _start_time(p) == t}
                if not busy and not strays:
                    return
                time.sleep(0.05)
            if time.monotonic() > deadline:
                break


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _start_time(pid: int) -> str | None:
    """The start time of a running process (not a zombie): with the pid, what names it without reuse."""
    st = _stat(pid)
    return st[19] if st and st[0] != "Z" else None


def _pgid(pid: int) -> int | None:
    st = _stat(pid)
    return int(st[2]) if st else None


def _descendants(root: int) -> dict[int, str]:
    """{pid: start time} of the processes below ``root`` now (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return {}
    for p in pids:
        st = _stat(p)
        if st:
            children.setdefault(int(st[1]), []).append(p)
    out, todo = {}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            t = _start_time(c)
            if t is not None and c not in out:
                out[c] = t
                todo.append(c)
    return out


def _kill_if(pid: int, start: str, sig: int) -> None:
    if _start_time(pid) == start:  # still the process we saw, not a new one with its number
        os.kill(pid, sig)


STOPPING = (signal.SIGTERM, signal.SIGHUP)  # besides SIGINT: kill, a batch system's stop, a closed terminal


def _on_stop_signal(previous):
    """The handler of a STOPPING signal while a program runs: the one already set (the CLI's) raises its
    exception, which gets ``signum``; with none (SIG_DFL would end us without cleaning up), Terminated."""
    def handler(signum, frame):
        if callable(previous):
            try:
                previous(signum, frame)
            except BaseException as exc:
                with contextlib.suppress(AttributeError):
                    exc.signum = signum
                raise
        raise Terminated(signum)
    return handler


@contextlib.contextmanager
def started(argv: list[str], env: dict | None = None, display: bool = True, screen: tuple[int, int] = SCREEN,
            **popen):
    """``argv`` running in a session of its own, with an X server of its own when it renders and there is no
    display (``XServer``); yields its Popen. On leaving the block, whether normally, by an error, a timeout or
    an interrupt (Ctrl-C, SIGTERM, SIGHUP: an exception here), the program's whole process group is killed and
    waited for, then the X server stopped: nothing it started runs on afterwards. A signal during that cleanup
    waits for it to finish."""
    env = dict(os.environ if env is None else env)
    server = XServer(screen) if display and needs_xvfb(env) else None
    ours = {}  # signal -> (our handler, the one before)
    if threading.current_thread() is threading.main_thread():
        for sig in STOPPING:
            old = signal.getsignal(sig)
            if old not in (signal.SIG_IGN, None):
                signal.signal(sig, h := _on_stop_signal(old))
                ours[sig] = (h, old)
    proc = None
    try:
        with _signals_deferred():  # nothing may start unrecorded: an interrupt here waits for the Popen
            if server is not None:
                env.update(server.start())
            proc = subprocess.Popen(argv, env=env, start_new_session=True, **popen)
        yield proc
    finally:
        try:
            with _signals_deferred():
                try:
                    if proc is not None:
                        _stop_group(proc)
                finally:
                    if server is not None:
                        server.stop()
        finally:
            for sig, (h, old) in ours.items():
                if signal.getsignal(sig) is h:  # else its owner changed it meanwhile (the CLI: SIG_IGN)
                    signal.signal(sig, old)


def run(argv: list[str], env: dict | None = None, timeout: float | None = None, display: bool = True,
        screen: tuple[int, int] = SCREEN, **popen) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a ParaView program, through ``started``: on a timeout the program's group and its
    X server are stopped and ``subprocess.TimeoutExpired`` (with the output so far) is raised."""
    if popen.pop("capture_output", False):
        popen["stdout"] = popen["stderr"] = subprocess.PIPE
    with started(argv, env, display, screen, **popen) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            _stop_group(proc)
            exc.stdout, exc.stderr = proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT, SIGTERM and SIGHUP noted but held back until the block ends (then handled as usual); main thread
    only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = {s: signal.signal(s, lambda n, f: got.append(n)) for s in (signal.SIGINT,) + STOPPING
           if signal.getsignal(s) not in (signal.SIG_IGN, None)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in got[:1]:
            signal.raise_signal(s)
