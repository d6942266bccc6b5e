"""Benchmark: GlobScope's join tree (with segmentation) against gudhi and TTK on the same grids, side by side.

    .venv/bin/python bench/bench_topology.py [--sizes 1024x1024,2048x2048,128^3,192^3] [--gudhi-max 4200000]
                                             [--gudhi-timeout 300] [--ttk] [--json out.json]

``--ttk`` adds TTK 1.2.0 (`setup.sh --with-ttk`), run in pvpython on the same field: ttkFTMTree's join tree
with segmentation (our ``compute_topology`` computes the same outputs), and ttkPersistenceDiagram's
minimum-saddle pairs (DMS backend), which must equal our pairs. Its time excludes building the vtkImageData.

Each case runs in its own process (so that its peak memory, ru_maxrss, is its own): ours is
``compute_topology`` (sort, union-find sweep, tree, segmentation, diagram; numba warmed up first) and
gudhi is a SimplexTree with the same 1-skeleton and the vertex ranks as filtration values
(``insert_batch`` + ``compute_persistence``). The pairs must be identical. gudhi is skipped above
``--gudhi-max`` vertices or after ``--gudhi-timeout`` seconds (it needs several GB there); the table says so.
Fields: "random" (uniform noise: the worst case, a minimum every ~10 points) and "smooth" (a sum of
sines: a few hundred basins, the case of real landscapes).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def field(shape, kind, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random(shape, dtype=np.float32)
    f = np.zeros(shape, np.float32)
    for _ in range(8):  # separable sines: cheap to build on big grids
        w = rng.normal(0, 12, 3)
        ph = rng.uniform(0, 6, 3)
        term = np.ones(shape, np.float32)
        for ax, n in enumerate(shape):
            x = np.sin(w[ax] * np.linspace(0, 1, n) + ph[ax]).astype(np.float32)
            term = term * x.reshape([-1 if a == ax else 1 for a in range(3)])
        f += term
    return f


def run_ours(shape, kind):
    import globscope_core.topology as T

    T.compute_topology(np.random.default_rng(1).random((6, 6, 6), dtype=np.float32), persistence=0.1)  # JIT
    v = field(shape, kind)
    t, c = time.perf_counter(), time.process_time()
    r = T.compute_topology(v, tree="join")
    dt, dc = time.perf_counter() - t, time.process_time() - c
    np.save(os.environ["BENCH_PAIRS"], r.pairs)
    return {"seconds": dt, "cpu_seconds": dc, "pairs": int(len(r.pairs)), "nodes": int(len(r.nodes["points"])),
            "numba": T.numba_available()}


def run_gudhi(shape, kind):
    import gudhi

    import globscope_core.topology as T

    v = field(shape, kind).ravel()
    t = time.perf_counter()
    order = np.argsort(v, kind="stable")
    rank = np.empty(len(v), np.int64)
    rank[order] = np.arange(len(v))
    e = T.neighbour_edges(shape)
    t_edges = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    st = gudhi.SimplexTree()
    a = np.arange(len(v), dtype=np.int32)
    st.insert_batch(np.stack([a, a]), rank.astype(float))
    st.insert_batch(np.ascontiguousarray(e.T.astype(np.int32)), np.maximum(rank[e[:, 0]], rank[e[:, 1]]).astype(float))
    del e
    st.compute_persistence()
    reg, ess = st.lower_star_persistence_generators()
    dt, dc = time.perf_counter() - t, time.process_time() - c
    pairs = np.asarray(reg[0]).reshape(-1, 2) if len(reg) else np.zeros((0, 2), np.int64)
    np.save(os.environ["BENCH_PAIRS"], pairs)
    return {"seconds": dt, "cpu_seconds": dc, "seconds_edges_numpy": t_edges, "pairs": int(len(pairs))}


def run_ttk(shape, kind):
    """In pvpython with TTK's wrappers on the path (paraview_env.environment)."""
    import topologytoolkit as tk
    from vtkmodules.util import numpy_support as ns
    from vtkmodules.vtkCommonDataModel import vtkImageData

    v = field(shape, kind)
    img = vtkImageData()
    img.SetDimensions(shape[2], shape[1], shape[0])
    arr = ns.numpy_to_vtk(v.ravel(), deep=True)
    arr.SetName("loss")
    img.GetPointData().AddArray(arr)
    out = {}
    t, c = time.perf_counter(), time.process_time()
    f = tk.ttkFTMTree() if hasattr(tk, "ttkFTMTree") else tk.ttkMergeTree()
    f.SetInputData(img)
    f.SetInputArrayToProcess(0, 0, 0, 0, "loss")
    f.SetTreeType(0)
    f.SetDebugLevel(0)
    f.Update()
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - t, time.process_time() - c
    out["nodes"] = f.GetOutputDataObject(0).GetNumberOfPoints()
    t = time.perf_counter()
    d = tk.ttkPersistenceDiagram()
    d.SetInputData(img)
    d.SetInputArrayToProcess(0, 0, 0, 0, "loss")
    d.SetComputeSadSad(False)
    d.SetComputeSadMax(False)
    d.SetDebugLevel(0)
    d.Update()
    out["seconds_diagram"] = time.perf_counter() - t
    dg = d.GetOutputDataObject(0)
    vid = ns.vtk_to_numpy(dg.GetPointData().GetArray("ttkVertexScalarField")).reshape(-1, 2)
    fin = ns.vtk_to_numpy(dg.GetCellData().GetArray("IsFinite"))[: len(vid)] == 1
    pairs = vid[fin]
    np.save(os.environ["BENCH_PAIRS"], pairs)
    out["pairs"] = int(len(pairs))
    out["threads"] = f.GetThreadNumber() if hasattr(f, "GetThreadNumber") else None
    return out


def child(which, shape, kind):
    out = {"ours": run_ours, "gudhi": run_gudhi, "ttk": run_ttk}[which](shape, kind)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def spawn(which, shape, kind, pairs_path, timeout):
    env = dict(os.environ, BENCH_PAIRS=pairs_path)
    python = sys.executable
    if which == "ttk":
        from globscope_core.stages import paraview_env

        python, env = paraview_env.require("pvpython"), paraview_env.environment(env)
    cmd = [python, os.path.abspath(__file__), "--child", which, "--shape", "x".join(map(str, shape)), "--field", kind]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def cpu_ratio(ours, gud):
    """gudhi's CPU time over ours: less sensitive than wall time to other jobs on a shared machine."""
    if ours.get("cpu_seconds") and gud.get("cpu_seconds"):
        return str(round(gud["cpu_seconds"] / ours["cpu_seconds"], 1))
    return ""


def parse_size(s):
    if "^" in s:
        n, d = s.split("^")
        return (int(n),) * int(d)
    dims = tuple(int(x) for x in s.split("x"))
    return dims if len(dims) == 3 else (1,) + dims


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--shape")
    ap.add_argument("--field")
    ap.add_argument("--sizes", default="1024x1024,2048x2048,128^3,192^3")
    ap.add_argument("--fields", default="random,smooth")
    ap.add_argument("--gudhi-max", type=int, default=4_200_000, help="largest grid (points) given to gudhi")
    ap.add_argument("--gudhi-timeout", type=int, default=300)
    ap.add_argument("--ttk", action="store_true", help="add TTK's timings (needs setup.sh --with-ttk)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.child:
        return child(a.child, tuple(int(x) for x in a.shape.split("x")), a.field)
    import tempfile

    rows = []
    tmp = tempfile.mkdtemp()
    print(f"{'grid':>12} {'field':>7} {'ours s':>8} {'ours MB':>8} {'gudhi s':>8} {'gudhi MB':>9} {'speed-up':>8} "
          f"{'cpu x':>6} {'pairs':>8} same")
    for size in a.sizes.split(","):
        shape = parse_size(size)
        for kind in a.fields.split(","):
            po, pg = os.path.join(tmp, "o.npy"), os.path.join(tmp, "g.npy")
            ours = spawn("ours", shape, kind, po, 600)
            n = int(np.prod(shape))
            if n <= a.gudhi_max:
                gud = spawn("gudhi", shape, kind, pg, a.gudhi_timeout)
            else:
                gud = {"error": f"not run (> {a.gudhi_max} points)"}
            same = None
            if "error" not in ours and "error" not in gud:
                so = {tuple(p) for p in np.load(po).tolist()}
                sg = {tuple(p) for p in np.load(pg).tolist()}
                same = so == sg
            row = {"grid": size, "shape": shape, "field": kind, "ours": ours, "gudhi": gud, "identical_pairs": same}
            if a.ttk:
                pt = os.path.join(tmp, "t.npy")
                tt = row["ttk"] = spawn("ttk", shape, kind, pt, 600)
                if "error" not in tt and "error" not in ours:
                    row["identical_pairs_ttk"] = {tuple(p) for p in np.load(po).tolist()} == {tuple(p) for p in np.load(pt).tolist()}
            rows.append(row)
            os_ = ours.get("seconds")
            gs = gud.get("seconds")
            print(f"{size:>12} {kind:>7} {os_ if os_ is None else round(os_, 2)!s:>8} "
                  f"{round(ours.get('peak_rss_mb', 0))!s:>8} {gs if gs is None else round(gs, 2)!s:>8} "
                  f"{round(gud.get('peak_rss_mb', 0))!s:>9} {'' if not (os_ and gs) else round(gs / os_, 1)!s:>8} "
                  f"{cpu_ratio(ours, gud):>6} {ours.get('pairs', '')!s:>8} {same if same is not None else gud.get('error', ours.get('error'))}",
                  flush=True)
            if a.ttk:
                print(f"{'':>12} {'':>7} TTK ttkFTMTree {tt.get('seconds', 0):.2f} s (cpu {tt.get('cpu_seconds', 0):.2f} s), "
                      f"diagram {tt.get('seconds_diagram', 0):.2f} s, {round(tt.get('peak_rss_mb', 0))} MB, "
                      f"pairs identical to ours: {row.get('identical_pairs_ttk', tt.get('error'))}", flush=True)
    info = {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "rows": rows}
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(info, fh, indent=2)
    print(f"load average during the run: {os.getloadavg()}")


if __name__ == "__main__":
    main()
