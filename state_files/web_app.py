"""`globscope serve`'s browser view of a study: a trame app in ParaView's own Python (pvpython).

The views are GlobScope's state files loaded on the study (state_files/pvstate.py ``load``, fitted by fit_view), so
the browser shows the colours, fading and merge trees of `globscope render` and the ParaView GUI. ParaView renders
on the server (trame's VtkRemoteView: images go to the browser, which needs no WebGL). Decoding a point needs
torch, which ParaView's Python has not: a `globscope decode --stdin` worker per dimension (the virtualenv's Python,
$GLOBSCOPE_PYTHON) keeps the study loaded and answers one JSON request per pick.

    pvpython state_files/web_app.py STUDY --port N [--host H] [--out DIR]   (what `globscope serve` runs)

A click on a 2D view (pick mode on) decodes the surface point under the cursor; the panel also takes
coordinates, a basin's minimum or the saddle between two basins. Every refusal (a point off the grid, an untrusted
point, a worker that failed) is a message in the page; nothing a user types stops the server.
"""
import argparse
import asyncio
import itertools
import json
import math
import os
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import pvstate  # noqa: E402 - next to this file; it puts the repository on sys.path
from GlobScopePlugin import cli_environment, globscope_command  # noqa: E402 - plugin/ is on ParaView's path
from paraview import simple as pv  # noqa: E402
from trame.app import get_server  # noqa: E402
from trame.ui.vuetify3 import SinglePageLayout  # noqa: E402
from trame.widgets import html  # noqa: E402
from trame.widgets import paraview as pvw  # noqa: E402
from trame.widgets import vuetify3 as v3  # noqa: E402

from globscope_core.storage import study_files  # noqa: E402

MARKER = "Decoded Point"
TITLES = {"landscape-2d": "2D landscape", "landscape-3d": "3D landscape", "trajectories-2d": "runs (top view)"}
DIM_OF = {"landscape-2d": 2, "landscape-3d": 3, "trajectories-2d": 2}


class Worker:
    """A `globscope decode --stdin` process for one dimension; one request at a time."""

    def __init__(self, study: str, dim: int):
        self.study, self.dim = study, dim
        self.proc = None
        self.lock = threading.Lock()

    def start(self):
        """Start the process (it loads torch and the study: seconds); ``ask`` waits for it."""
        if self.proc is not None and self.proc.poll() is None:
            return
        # the plugin's way to our CLI (torch is in the virtualenv, not in ParaView's Python)
        self.proc = subprocess.Popen(globscope_command() + ["decode", self.study, "--dim", str(self.dim), "--stdin"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=cli_environment())

    def ask(self, request: dict) -> dict:
        with self.lock:
            self.start()
            try:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
                line = self.proc.stdout.readline()
            except OSError:
                line = ""
            if line:
                return json.loads(line)
            # the worker ended: its last stderr line says why (a study it cannot open, a missing landscape)
            self.proc.wait()
            err = [x for x in self.proc.stderr.read().splitlines() if x.strip()]
            self.proc = None
            return {"ok": False, "error": err[-1] if err else "the decode worker ended without an answer"}

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _delete_sources():
    for _ in range(1000):  # consumers first: a source still feeding another cannot be deleted
        left = list(pv.GetSources().values())
        if not left:
            return
        for src in left:
            try:
                pv.Delete(src)
            except Exception:
                pass


class Shown:
    """One state file loaded at a time, as in `globscope render`: two states in one session share their colour maps
    by array name, and loading a second one left the first view blank. A replaced view is kept (empty) until the
    next switch: the browser may still send events for it, and ParaView's web layer crashes on a deleted view."""

    def __init__(self, study: str, name: str):
        self.old = []
        self.study, self.name, self.view = study, name, self._load(study, name)

    @staticmethod
    def _load(study: str, name: str):
        view = pvstate.load(name, study)
        view.OrientationAxesVisibility = 0
        # pvpython's views have no interactor, and ParaView's web layer dereferences it on the first mouse event
        view.MakeRenderWindowInteractor(True)
        # the decoded point's marker, hidden until a decode: made now, as showing a new source later moved the camera
        d = pv.Show(pv.Sphere(registrationName=MARKER, ThetaResolution=24, PhiResolution=24), view)
        d.ColorArrayName = ["POINTS", ""]
        d.AmbientColor = d.DiffuseColor = [1.0, 0.45, 0.0]
        d.Visibility = 0
        return view

    def switch(self, study: str, name: str):
        if (study, name) == (self.study, self.name):
            return self.view
        for view in self.old:
            pv.Delete(view)
        _delete_sources()
        self.old = [self.view]
        self.study, self.name, self.view = study, name, self._load(study, name)
        return self.view

    def mark(self, at, landscape_loss: float) -> None:
        """An orange sphere at a decoded point: on the warped 2D surface at the landscape's height there, lifted
        as the runs are; in the flat top view and in 3D at the point itself."""
        marker = pv.FindSource(MARKER)
        b = pv.FindSource("Study").GetDataInformation().GetBounds()
        marker.Radius = 0.025 * max(b[1] - b[0], b[3] - b[2])
        z = at[2] if len(at) == 3 else 0.0
        warp, lift = pv.FindSource("Surface Warp"), pv.FindSource("Trajectory Lift")
        if len(at) == 2 and warp is not None and landscape_loss > 0:
            z = warp.ScaleFactor * math.log10(landscape_loss) + (lift.Transform.Translate[2] if lift else 0.0)
        marker.Center = [at[0], at[1], z]
        pv.GetDisplayProperties(marker, self.view).Visibility = 1  # the caller pushes the new image


def runs_table(study: str, basins: dict) -> list:
    """[{run, basin, loss}]: each run's basin by dimension (NodeIds, from `globscope topology`'s report section) and
    the landscape's loss at its final checkpoint; empty before topology ran."""
    try:
        with open(study_files.report_json(study)) as fh:
            report = json.load(fh)
    except (OSError, ValueError):
        return []
    rows = {}
    for d in (2, 3):
        node_of = {b["vertex"]: b["node"] for b in basins.get(d, [])}  # reports written before "basin" was
        for r in report.get(f"basins-{d}d", {}).get("runs", []):
            row = rows.setdefault(r["run"], {"run": r["run"], "basin2": "", "basin3": "", "loss": ""})
            row[f"basin{d}"] = r.get("basin", node_of.get(r.get("basin_minimum_vertex"), ""))
            if not row["loss"] and r.get("final_loss_on_grid") is not None:
                row["loss"] = f"{r['final_loss_on_grid']:.4g}"
    return [rows[k] for k in sorted(rows)]


def _number_list(text: str, n: int):
    parts = [p for p in str(text).replace(" ", ",").split(",") if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"'{text}' is not {n} numbers") from None
    if len(values) != n:
        raise ValueError(f"'{text}': {n} numbers are needed, not {len(values)}")
    return values


class Served:
    """A study the server shows: its views, decode workers (one per dimension), basins and runs."""

    def __init__(self, path: str, name: str):
        self.path, self.name = path, name
        self.views = [v for v in study_files.available_views(path) if v in pvstate.STATES]
        self.workers = {d: Worker(path, d) for d in sorted({DIM_OF[v] for v in self.views})}
        self.basins = None

    def load_basins(self) -> None:
        """Asks each worker for its basins (started if need be): the first pick is then quick."""
        self.basins = {}
        for d, w in self.workers.items():
            answer = w.ask({"basins": True})
            self.basins[d] = answer.get("basins", []) if answer.get("ok") else []

    def state(self) -> dict:
        items = {d: [{"title": f"{b['node']}: log10 loss {b['scalar']:.3f}", "value": b["node"]}
                     for b in self.basins.get(d, [])] for d in (2, 3)}
        return {"study": self.name, "view": self.views[0], "basins2": items[2], "basins3": items[3],
                "views": [{"title": TITLES[v], "value": v} for v in self.views],
                "runs": runs_table(self.path, self.basins), "result": None, "message": "",
                "basin": None, "saddle_a": None, "saddle_b": None}

    def close(self) -> None:
        for w in self.workers.values():
            w.close()


def build(server, studies: list, out_dir: str):
    state, ctrl = server.state, server.controller
    served = {s.name: s for s in studies}
    page = {"study": studies[0]}
    for w in studies[0].workers.values():  # they load torch and the study while ParaView loads the first view
        w.start()
    shown = Shown(studies[0].path, studies[0].views[0])
    page["study"].load_basins()
    counter = itertools.count(1)
    state.update(dict(page["study"].state(), studies=list(served), coords="", force=False, pick=True, busy=False,
                      download=""))

    def dim_now():
        return DIM_OF[state.view]

    @state.change("view")
    def switch(view, **_):
        if view in page["study"].views and (page["study"].path, view) != (shown.study, shown.name):
            state["viewId"] = shown.switch(page["study"].path, view).GetGlobalIDAsString()  # the browser then asks

    @state.change("study")
    def switch_study(study, **_):
        """Another of the served studies (typed or chosen); an unknown name is a message, the page stays."""
        if study == page["study"].name:
            return
        if study not in served:
            state.message = f"unknown study '{study}': this server shows {', '.join(served)}"
            state.result = None
            state.study = page["study"].name
            return
        page["study"] = served[study]
        if page["study"].basins is None:
            page["study"].load_basins()
        state.update(page["study"].state())
        state["viewId"] = shown.switch(page["study"].path, state.view).GetGlobalIDAsString()

    async def decode(request: dict):
        with state:
            state.busy, state.message, state.result = True, "", None
        d, study = request.pop("dim"), page["study"]
        request["out"] = os.path.join(out_dir, f"{study.name}-{d}d-{next(counter)}.safetensors")
        request["force"] = bool(state.force)
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(None, study.workers[d].ask, request)
        with state:
            state.busy = False
            if answer.get("ok"):
                keep = ("what", "at", "decoded_at", "loss", "accuracy", "landscape_loss", "trusted", "clamped",
                        "split", "eval_samples", "n_params")
                state.result = {k: answer[k] for k in keep}
                state.download = "decoded/" + os.path.basename(answer["out"])
                if study.path == shown.study and d == DIM_OF[shown.name]:
                    shown.mark(answer["at"], answer["landscape_loss"])
                    server.protocol_call("viewport.image.push", {"view": shown.view.GetGlobalIDAsString()})
            else:
                state.message = answer.get("error", "decode failed")

    def refuse(text):
        state.message, state.result = text, None

    @ctrl.set("decode_coords")
    async def decode_coords():
        try:
            at = _number_list(state.coords, dim_now())
        except ValueError as exc:
            return refuse(str(exc))
        await decode({"dim": dim_now(), "at": at})

    @ctrl.set("decode_basin")
    async def decode_basin():
        if state.basin is None:
            return refuse("choose a basin first")
        await decode({"dim": dim_now(), "basin": int(state.basin)})

    @ctrl.set("decode_saddle")
    async def decode_saddle():
        if state.saddle_a is None or state.saddle_b is None:
            return refuse("choose two basins first")
        await decode({"dim": dim_now(), "saddle": [int(state.saddle_a), int(state.saddle_b)]})

    @ctrl.set("on_click")
    async def on_click(event):
        """A click on a 2D view: the surface point under the cursor (x, y; z is the warp or the flat image)."""
        if not state.pick or dim_now() != 2:
            return
        try:
            x, y = event["position"]["x"], event["position"]["y"]
        except (TypeError, KeyError):
            return
        world = [0.0, 0.0, 0.0]
        if not shown.view.SMProxy.ConvertDisplayToPointOnSurface([int(x), int(y)], world, [0.0, 0.0, 0.0]):
            return refuse("no landscape under the cursor")
        with state:
            state.coords = f"{world[0]:.6g}, {world[1]:.6g}"
        await decode({"dim": 2, "at": world[:2]})

    with SinglePageLayout(server) as layout:
        layout.title.set_text("GlobScope")
        with layout.toolbar:
            v3.VSpacer()
            v3.VCombobox(v_model=("study",), items=("studies",), density="compact", hide_details=True,
                         style="max-width: 260px", label="study", id="study-select", classes="mr-2")
            v3.VSelect(v_model=("view",), items=("views",), density="compact", hide_details=True,
                       style="max-width: 260px", label="view", id="view-select")
        with layout.content:
            # the page's height, not the panel's: a taller panel (a result, the runs) would resize the view
            with html.Div(style="display: flex; height: calc(100vh - var(--v-layout-top) - var(--v-layout-bottom));"):
                with html.Div(style="flex: 1 1 auto; height: 100%; position: relative;", id="view"):
                    pvw.VtkRemoteView(shown.view, ref="view", interactive_ratio=1,
                                      interactor_events=("events", ["LeftButtonPress"]),
                                      LeftButtonPress=(ctrl.on_click, "[utils.vtk.event($event)]"))
                with html.Div(style="width: 360px; padding: 12px; overflow-y: auto; height: 100%;", id="panel"):
                    html.Div("Pick a point, get a model", classes="text-h6")
                    v3.VSwitch(v_model=("pick",), label="a click on a 2D view decodes that point",
                               density="compact", hide_details=True)
                    v3.VTextField(v_model=("coords",), label="latent point x, y (, z in 3D)", density="compact",
                                  id="coords", hide_details=True)
                    v3.VBtn("decode point", click=ctrl.decode_coords, id="decode-coords", block=True,
                            classes="my-2", disabled=("busy",))
                    v3.VSelect(v_model=("basin",), items=("view === 'landscape-3d' ? basins3 : basins2",),
                               label="basin (minimum NodeId)", density="compact", hide_details=True, id="basin")
                    v3.VBtn("decode its minimum", click=ctrl.decode_basin, id="decode-basin", block=True,
                            classes="my-2", disabled=("busy",))
                    with v3.VRow(dense=True):
                        with v3.VCol():
                            v3.VSelect(v_model=("saddle_a",), label="basin A", density="compact", hide_details=True,
                                       items=("view === 'landscape-3d' ? basins3 : basins2",))
                        with v3.VCol():
                            v3.VSelect(v_model=("saddle_b",), label="basin B", density="compact", hide_details=True,
                                       items=("view === 'landscape-3d' ? basins3 : basins2",))
                    v3.VBtn("decode the saddle joining them", click=ctrl.decode_saddle, id="decode-saddle",
                            block=True, classes="my-2", disabled=("busy",))
                    v3.VCheckbox(v_model=("force",), label="also untrusted points (beyond the hull)",
                                 density="compact", hide_details=True)
                    v3.VProgressLinear(indeterminate=True, v_show=("busy",))
                    v3.VAlert(v_show=("message",), type="error", density="compact", id="message",
                              children=["{{ message }}"])
                    with v3.VCard(v_show=("result",), id="result", variant="outlined", classes="pa-2"):
                        html.Div("{{ result && result.what }}", classes="text-subtitle-2")
                        html.Div("decoded model: {{ result && result.split }} loss "
                                 "<b id='loss'>{{ result && result.loss.toPrecision(6) }}</b>, accuracy "
                                 "{{ result && result.accuracy.toFixed(4) }}")
                        html.Div("the landscape there: loss "
                                 "<span id='landscape-loss'>{{ result && result.landscape_loss.toPrecision(6) }}</span>")
                        html.Div("{{ result && (result.trusted ? 'trusted' : 'UNTRUSTED: beyond the hull') }}"
                                 "{{ result && result.clamped ? ', decoded at the hull boundary as the landscape' : '' }}")
                        html.A("download the model (.safetensors)", href=("download",), download=True, id="download")
                    with html.Div(v_show=("runs.length",), classes="mt-4"):
                        html.Div("Runs: the basin their final checkpoint lies in", classes="text-subtitle-2")
                        with v3.VTable(density="compact", id="runs"):
                            with html.Thead():
                                with html.Tr():
                                    for head in ("run", "basin 2D", "basin 3D", "loss there"):
                                        html.Th(head)
                            with html.Tbody():
                                with html.Tr(v_for="r in runs", key="r.run"):
                                    for col in ("run", "basin2", "basin3", "loss"):
                                        html.Td(f"{{{{ r.{col} }}}}")
    return studies


def main():
    ap = argparse.ArgumentParser(description="GlobScope's browser view of a study (trame, in pvpython)")
    ap.add_argument("study", nargs="+")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--out", required=True, help="directory for decoded models (served as /decoded/)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    server = get_server(client_type="vue3")
    server.enable_module({"serve": {"decoded": os.path.abspath(args.out)}})
    paths = [os.path.abspath(p) for p in args.study]
    names = [os.path.basename(p.rstrip("/")) for p in paths]
    if len(set(names)) < len(names):  # two studies of one name (run1/study, run2/study): their paths tell them apart
        names = paths
    studies = [Served(p, n) for p, n in zip(paths, names)]
    build(server, studies, args.out)
    try:
        server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=False)
    finally:
        for s in studies:
            s.close()


if __name__ == "__main__":
    main()
