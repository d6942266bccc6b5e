"""Benchmark: GlobScope's join tree (with segmentation) against gudhi and TTK on the same grids, side by side.

    .venv/bin/python bench/bench_topology.py [--sizes 1024x1024,2048x2048,128^3,192^3] [--gudhi-max 4200000]
                                             [--gudhi-timeout 300] [--ttk] [--json out.json]
    .venv/bin/python bench/bench_topology.py --homology [--sizes 128x128,1024x1024,64^3,128^3] [--old-max 1100000]
                                             [--ttk] [--json bench/results/topology-homology.json]

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

``--homology``: a split tree's saddle-maximum pairs as TTK's default backend gives them (``--split-pairs
homology``, the plugin's engine for every split tree): the old pure-Python union-find over all facets
(``old_homology_split_pairs``; skipped above ``--old-max`` points) beside the numba kernel (after its compile), and with
``--ttk`` TTK's ttkPersistenceDiagram of the same field, saddle-maximum pairs only (the plugin's setting; its
pairs compared with ours) and the whole diagram (all pair types, TTK's default). The new kernel's pairs must be
the old ones, bitwise and in the same order. "new" also times the whole split tree with those pairs
(``compute_topology(tree="split", split_pairs="homology")``) and with the tree's own pairs.
"""
from __future__ import annotations

import argparse
import itertools
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


# --- the split tree's homology pairs before issue 24 (for --homology) -------------------------------------
def old_top_cells(shape) -> np.ndarray:
    """The triangles (2D) or tetrahedra (3D) of TTK's implicit triangulation, [m, d+1] vertex ids.

    Mirrored in x, it is the Kuhn triangulation: in each cell of the grid, one simplex per order of the axes,
    the path of unit steps from the cell's lower corner to its upper one."""
    nz, ny, nx = shape
    axes = [a for a, n in enumerate((nx, ny, nz)) if n > 1]
    dims = np.array([nx, ny, nz])
    lo = np.stack(np.meshgrid(*[np.arange(n - 1 if a in axes else 1) for a, n in enumerate((nx, ny, nz))],
                              indexing="ij"), -1).reshape(-1, 3)  # lower corners, mirrored coordinates
    out = []
    for perm in itertools.permutations(axes):
        p = lo.copy()
        verts = []
        for step in (None,) + perm:
            if step is not None:
                p = p.copy()
                p[:, step] += 1
            i = dims[0] - 1 - p[:, 0]  # back to TTK's x
            verts.append(i + p[:, 1] * nx + p[:, 2] * nx * ny)
        out.append(np.stack(verts, 1))
    return np.concatenate(out) if out else np.zeros((0, len(axes) + 1), np.int64)


def old_homology_split_pairs(shape, desc_order) -> np.ndarray:
    """``homology_split_pairs`` before issue 24 (globscope_core/topology/kernels.py at d010694), verbatim: numpy's
    unique and sort of all facets and a Python union-find over them. Kept here only to time it."""
    nz, ny, nx = shape
    n = nx * ny * nz
    top = old_top_cells(shape)
    d = top.shape[1] - 1
    if d < 2:  # a one-cell-wide grid has no such pairs
        return np.zeros((0, 2), np.int64)
    pos = np.empty(n, np.int64)
    pos[np.asarray(desc_order, np.int64)] = np.arange(n)  # position in the descending sweep
    # the cell's first vertex in the sweep is when it joins the complement: its maximum
    cell_birth = top[np.arange(len(top)), np.argmin(pos[top], 1)]
    # facets: drop one vertex; each is shared by two cells, or one on the boundary (then joined to the outside)
    facets = np.concatenate([np.sort(np.delete(top, q, 1), 1) for q in range(d + 1)])
    owner = np.tile(np.arange(len(top)), d + 1)
    key, inv = np.unique(facets, axis=0, return_inverse=True)
    inv = inv.ravel()
    srt = np.argsort(inv, kind="stable")
    first = np.searchsorted(inv[srt], np.arange(len(key)))
    a = owner[srt[first]]
    cnt = np.bincount(inv, minlength=len(key))
    b = np.where(cnt == 2, owner[srt[np.minimum(first + 1, len(srt) - 1)]], len(top))  # len(top): the outside
    f_when = pos[key].min(1)  # the facet joins the complement at its maximum vertex
    f_vertex = key[np.arange(len(key)), pos[key].argmin(1)]
    ev = np.argsort(f_when, kind="stable")
    parent = list(range(len(top) + 1))
    birth = [int(pos[v]) for v in cell_birth] + [-1]  # the outside is the oldest
    bvert = [int(v) for v in cell_birth] + [-1]
    pairs = []

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for e in ev.tolist():
        x, y = find(int(a[e])), find(int(b[e]))
        if x == y:
            continue
        if birth[x] > birth[y]:
            x, y = y, x  # x the elder
        s = int(f_vertex[e])
        if bvert[y] != s:  # a zero-persistence pair (inside one vertex's star) is no pair
            pairs.append((bvert[y], s))
        parent[y] = x
    p = np.array(pairs, np.int64).reshape(-1, 2)
    return p[np.argsort(pos[p[:, 1]], kind="stable")] if len(p) else p


def split_sweep(shape, kind):
    import globscope_core.topology as T

    v = field(shape, kind)
    return v, T.vertex_order(v)[::-1].copy()  # the split tree's sweep: descending (value, vertex id)


def run_hom_old(shape, kind):
    _, desc = split_sweep(shape, kind)
    t, c = time.perf_counter(), time.process_time()
    p = old_homology_split_pairs(shape, desc)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    np.save(os.environ["BENCH_PAIRS"], p)
    return {"seconds": dt, "cpu_seconds": dc, "pairs": int(len(p))}


def run_hom_new(shape, kind):
    import globscope_core.topology as T

    for warm in ((1, 5, 6), (4, 5, 6)):  # compile (or load) the kernels first
        T.compute_topology(np.random.default_rng(1).random(warm, dtype=np.float32), tree="split",
                           split_pairs="homology")
    v, desc = split_sweep(shape, kind)
    t, c = time.perf_counter(), time.process_time()
    p = T.homology_split_pairs(shape, desc, use_numba=True)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    np.save(os.environ["BENCH_PAIRS"], p)
    out = {"seconds": dt, "cpu_seconds": dc, "pairs": int(len(p))}
    for pairs in ("homology", "tree"):
        t = time.perf_counter()
        T.compute_topology(v, tree="split", split_pairs=pairs)
        out[f"seconds_split_tree_{pairs}_pairs"] = time.perf_counter() - t
    return out


def run_hom_ttk(shape, kind):
    """TTK's persistence diagram in pvpython: saddle-maximum pairs only (as the plugin asks), then all pairs."""
    import topologytoolkit as tk
    from vtkmodules.util import numpy_support as ns
    from vtkmodules.vtkCommonDataModel import vtkImageData

    def image(v):
        img = vtkImageData()
        img.SetDimensions(v.shape[2], v.shape[1], v.shape[0])
        arr = ns.numpy_to_vtk(v.ravel(), deep=True)
        arr.SetName("loss")
        img.GetPointData().AddArray(arr)
        return img

    warm = tk.ttkPersistenceDiagram()  # TTK's first run in a process pays its start-up: not timed, as numba's
    warm.SetInputData(image(np.random.default_rng(1).random((4, 5, 6), dtype=np.float32)))
    warm.SetInputArrayToProcess(0, 0, 0, 0, "loss")
    warm.SetDebugLevel(0)
    warm.Update()
    img = image(field(shape, kind))
    out = {}
    for what in ("sadmax", "whole"):
        d = tk.ttkPersistenceDiagram()
        d.SetInputData(img)
        d.SetInputArrayToProcess(0, 0, 0, 0, "loss")
        d.SetDebugLevel(0)
        if what == "sadmax":
            d.SetComputeMinSad(False)
            d.SetComputeSadSad(False)
            d.SetComputeSadMax(True)
        t, c = time.perf_counter(), time.process_time()
        d.Update()
        out[f"seconds_{what}"], out[f"cpu_seconds_{what}"] = time.perf_counter() - t, time.process_time() - c
        dg = d.GetOutputDataObject(0)
        out[f"pairs_{what}"] = dg.GetNumberOfCells()
        if what == "sadmax":  # (saddle, maximum) per finite pair; the global min-max pair is not finite
            vid = ns.vtk_to_numpy(dg.GetPointData().GetArray("ttkVertexScalarField")).reshape(-1, 2)
            fin = ns.vtk_to_numpy(dg.GetCellData().GetArray("IsFinite"))[: len(vid)] == 1
            np.save(os.environ["BENCH_PAIRS"], vid[fin][:, ::-1].astype(np.int64))
    out["seconds"] = out["seconds_whole"]
    return out


def same_pairs(a, b):
    """The same multiset of (maximum, saddle) pairs (TTK lists them in its own order)."""
    return sorted(map(tuple, np.load(a).tolist())) == sorted(map(tuple, np.load(b).tolist()))


def homology_main(a):
    import tempfile

    tmp = tempfile.mkdtemp()
    rows = []
    print(f"{'grid':>10} {'field':>7} {'old s':>8} {'new s':>7} {'old/new':>8} {'TTK sadmax s':>12} "
          f"{'TTK whole s':>11} {'TTK/new':>8} {'pairs':>7} same(old, TTK)")
    for size in a.sizes.split(","):
        shape = parse_size(size)
        for kind in a.fields.split(","):
            po, pn, pt = (os.path.join(tmp, f"{w}.npy") for w in ("old", "new", "ttk"))
            new = spawn("hom-new", shape, kind, pn, 600)
            n = int(np.prod(shape))
            old = spawn("hom-old", shape, kind, po, a.old_timeout) if n <= a.old_max else \
                {"error": f"not run (> {a.old_max} points)"}
            row = {"grid": size, "shape": shape, "field": kind, "old": old, "new": new}
            if "error" not in old and "error" not in new:
                row["identical_pairs_old"] = bool(np.array_equal(np.load(po), np.load(pn)))  # bitwise, in order
                row["ratio_old_new"] = old["seconds"] / new["seconds"]
            if a.ttk:
                tt = row["ttk"] = spawn("hom-ttk", shape, kind, pt, 600)
                if "error" not in tt and "error" not in new:
                    row["identical_pairs_ttk"] = same_pairs(pn, pt)
                    row["ratio_ttk_whole_new"] = tt["seconds_whole"] / new["seconds"]
                    row["ratio_ttk_sadmax_new"] = tt["seconds_sadmax"] / new["seconds"]
            rows.append(row)
            tt = row.get("ttk", {})
            sec = [f"{d[k]:.3g}" if d.get(k) is not None else "" for d, k in
                   ((old, "seconds"), (new, "seconds"), (tt, "seconds_sadmax"), (tt, "seconds_whole"))]
            ratio = [f"{row[k]:.1f}x" if k in row else "" for k in ("ratio_old_new", "ratio_ttk_whole_new")]
            print(f"{size:>10} {kind:>7} {sec[0] or 'not run':>8} {sec[1]:>7} {ratio[0]:>8} {sec[2]:>12} {sec[3]:>11} "
                  f"{ratio[1]:>8} {new.get('pairs', new.get('error', ''))!s:>7} {row.get('identical_pairs_old')}, "
                  f"{row.get('identical_pairs_ttk', tt.get('error'))}", flush=True)
    info = {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "rows": rows}
    if a.json:
        from machine import write_json

        write_json(a.json, info, indent=2)
    print(f"load average during the run: {os.getloadavg()}")


def child(which, shape, kind):
    out = {"ours": run_ours, "gudhi": run_gudhi, "ttk": run_ttk, "hom-old": run_hom_old, "hom-new": run_hom_new,
           "hom-ttk": run_hom_ttk}[which](shape, kind)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def spawn(which, shape, kind, pairs_path, timeout):
    env = dict(os.environ, BENCH_PAIRS=pairs_path)
    python = sys.executable
    if which in ("ttk", "hom-ttk"):
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
    ap.add_argument("--homology", action="store_true", help="the split tree's homology pairs: old, new (and TTK)")
    ap.add_argument("--old-max", type=int, default=1_100_000, help="largest grid (points) given to the old pairs")
    ap.add_argument("--old-timeout", type=int, default=600)
    a = ap.parse_args()
    if a.child:
        return child(a.child, tuple(int(x) for x in a.shape.split("x")), a.field)
    if a.homology:
        if a.sizes == ap.get_default("sizes"):
            a.sizes = "128x128,1024x1024,64^3,128^3"
        return homology_main(a)
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
        from machine import write_json

        write_json(a.json, info, indent=2)
    print(f"load average during the run: {os.getloadavg()}")


if __name__ == "__main__":
    main()
