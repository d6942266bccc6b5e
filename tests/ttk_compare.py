"""Runs inside pvpython with TTK loaded: both engines of the plugin on the same inputs, every array and cell compared.

    pvpython tests/ttk_compare.py CASES.json RESULT.json

CASES.json: a list of {"name", "file" (.vti), "scalar", "tree" ("join"|"split"), optional "simplify":
{"threshold", "absolute"}, optional "cli": a directory of `globscope topology` files of the same input}.
For a simplification case, each engine simplifies, then each computes the tree of its own simplified image.
RESULT.json: {"engine_line": ..., "cases": {name: [differences]}, "compared": {name: number of arrays}}.
"""
import json
import os
import sys

import GlobScopePlugin as P
import numpy as np
from vtkmodules.util import numpy_support as ns
from vtkmodules.vtkIOXML import vtkXMLImageDataReader, vtkXMLUnstructuredGridReader


def read(path):
    r = vtkXMLImageDataReader() if path.endswith(".vti") else vtkXMLUnstructuredGridReader()
    r.SetFileName(path)
    r.Update()
    return r.GetOutput()


def arrays(data):
    out = {}
    for i in range(data.GetNumberOfArrays()):
        a = data.GetAbstractArray(i)
        out[a.GetName()] = ns.vtk_to_numpy(a)
    return out


def cells(ug):
    conn = ug.GetCells()
    offsets = ns.vtk_to_numpy(conn.GetOffsetsArray()).astype(np.int64)
    ids = ns.vtk_to_numpy(conn.GetConnectivityArray()).astype(np.int64)
    types = np.array([ug.GetCellType(i) for i in range(ug.GetNumberOfCells())], np.int64)
    return offsets, ids, types


def compare(what, a, b, diffs, order_name=None, notes=None):
    """Every point, cell and array of two data sets (names, order, dtypes and values); returns arrays compared.

    ``order_name``: an order array (TTK's ``<name>_Order`` after a simplification) whose values may differ
    inside flattened basins (ties broken otherwise); its differences go to ``notes``, not ``diffs``."""
    n = 0
    if a.GetClassName() != b.GetClassName():
        diffs.append(f"{what}: {a.GetClassName()} vs {b.GetClassName()}")
        return n
    if a.IsA("vtkImageData"):
        for g in ("GetDimensions", "GetOrigin", "GetSpacing"):
            if tuple(getattr(a, g)()) != tuple(getattr(b, g)()):
                diffs.append(f"{what}: {g} {getattr(a, g)()} vs {getattr(b, g)()}")
    else:
        pa, pb = ns.vtk_to_numpy(a.GetPoints().GetData()), ns.vtk_to_numpy(b.GetPoints().GetData())
        if pa.dtype != pb.dtype or pa.shape != pb.shape or not np.array_equal(pa, pb):
            diffs.append(f"{what}: points {pa.dtype}{pa.shape} vs {pb.dtype}{pb.shape}"
                         + (f", first differing point {int(np.argmax((pa != pb).any(1)))}" if pa.shape == pb.shape else ""))
        for x, y, label in zip(cells(a), cells(b), ("offsets", "connectivity", "cell types")):
            if x.shape != y.shape or not np.array_equal(x, y):
                diffs.append(f"{what}: {label} differ ({len(x)} vs {len(y)})")
        n += 2
    for kind in ("GetPointData", "GetCellData"):
        A, B = arrays(getattr(a, kind)()), arrays(getattr(b, kind)())
        if list(A) != list(B):
            diffs.append(f"{what} {kind[3:]}: arrays {list(A)} vs {list(B)}")
        for k in A:
            if k not in B:
                continue
            x, y = A[k], B[k]
            n += 1
            if x.dtype != y.dtype or x.shape != y.shape:
                diffs.append(f"{what} {kind[3:]} {k}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
            elif not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
                bad = np.flatnonzero((x != y).reshape(len(x), -1).any(1))
                (notes if k == order_name and notes is not None else diffs).append(f"{what} {kind[3:]} {k}: {len(bad)} values differ, first at {bad[0]}: "
                             f"{x[bad[0]].tolist()} vs {y[bad[0]].tolist()}")
    return n


def canonical_diagram(ug):
    """A diagram as numpy arrays with the pairs of one birth vertex (a degenerate saddle's several pairs) sorted
    by death vertex: TTK sorts pairs by birth with std::sort, which leaves the order of such ties unspecified.
    Everything else (pair order, points, every array, the diagonal cell) is kept as it is."""
    vid = ns.vtk_to_numpy(ug.GetPointData().GetArray("ttkVertexScalarField")).reshape(-1, 2)
    k = len(vid)
    births, deaths = vid[:, 0], vid[:, 1]
    _, start, inv = np.unique(births, return_index=True, return_inverse=True)
    perm = np.lexsort((deaths, start[inv.ravel()]))
    pp = np.stack([2 * perm, 2 * perm + 1], 1).ravel()
    out = {"points": ns.vtk_to_numpy(ug.GetPoints().GetData())[pp]}
    for kname, arr in arrays(ug.GetPointData()).items():
        out["point " + kname] = arr[pp]
    for kname, arr in arrays(ug.GetCellData()).items():
        out["cell " + kname] = arr if kname == "PairIdentifier" else np.concatenate([arr[:k][perm], arr[k:]])
    offsets, conn, types = cells(ug)
    diag = conn[2 * k:].copy()  # the diagonal: point 0 to a birth point; name it by its pair's tie group
    diag[1] = 2 * start[inv.ravel()[diag[1] // 2]]
    out["cells"] = np.concatenate([conn[:2 * k], diag])
    out["offsets"], out["types"] = offsets, types
    return out


def compare_diagram(what, a, b, diffs):
    A, B = canonical_diagram(a), canonical_diagram(b)
    if list(A) != list(B):
        diffs.append(f"{what}: arrays {list(A)} vs {list(B)}")
    n = 0
    for k in A:
        if k in B:
            n += 1
            x, y = A[k], B[k]
            if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
                diffs.append(f"{what} {k}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
                             + (f", {int((x != y).reshape(len(x), -1).any(1).sum())} differ" if x.shape == y.shape else ""))
    return n


def scalars(img, name):
    return ns.vtk_to_numpy(img.GetPointData().GetArray(name))


def run_case(tk, case, notes):
    diffs, n = [], 0
    img = read(case["file"])
    name, tree = case["scalar"], case["tree"]
    simp = case.get("simplify")
    if simp:
        t_img = P.ttk_simplify(tk, img, name, simp["threshold"], simp["absolute"])
        c_img = P.vtkImageData()
        *_, res = P.compute_tree(img, name, scalars(img, name), persistence=simp["threshold"],
                                 relative=not simp["absolute"])
        c_img.ShallowCopy(img)
        src = img.GetPointData().GetArray(name)
        arr = ns.numpy_to_vtk(res.simplified_values.ravel().astype(ns.get_numpy_array_type(src.GetDataType())), deep=True)
        arr.SetName(name)
        c_img.GetPointData().AddArray(arr)
        P._add_arrays(c_img.GetPointData(), {f"{name}_Order": res.simplified_order.ravel()})
        # the simplified scalar must agree; TTK's order array may break ties inside flattened basins otherwise
        n += compare("simplified", t_img, c_img, diffs, f"{name}_Order", notes)
    else:
        t_img = c_img = img
    ttk_out = P.ttk_tree(tk, t_img, name, tree)[:4]
    core_out = P.compute_tree(c_img, name, scalars(c_img, name), tree=tree)[:4]
    for label, x, y in zip(("nodes", "arcs", "segmentation", "diagram"), ttk_out, core_out):
        n += compare(label, x, y, diffs, f"{name}_Order" if simp else None, notes)
        if label == "diagram":  # the same diagram up to the order of tied pairs (see canonical_diagram)
            diffs[:] = [d for d in diffs if not d.startswith("diagram")]
            n += compare_diagram(label, x, y, diffs)
    if case.get("cli"):
        for label, x in zip(("nodes", "arcs", "segmentation", "diagram"), ttk_out):
            f = os.path.join(case["cli"], {"segmentation": "segmentation.vti"}.get(label, label + ".vtu"))
            y = read(f)
            n += compare("cli " + label, x, y, diffs)
            if label == "diagram":
                diffs[:] = [d for d in diffs if not d.startswith("cli diagram")]
                n += compare_diagram("cli diagram", x, y, diffs)
    return diffs, n


def main(cases_path, result_path):
    tk, why = P.ttk_module()
    if tk is None:
        raise SystemExit(f"TTK not found: {why}")
    cases = json.load(open(cases_path))
    out = {"ttk": [c for c in ("ttkFTMTree", "ttkMergeTree") if hasattr(tk, c)], "cases": {}, "compared": {},
           "order_notes": {}}
    for case in cases:
        notes = out["order_notes"][case["name"]] = []
        try:
            out["cases"][case["name"]], out["compared"][case["name"]] = run_case(tk, case, notes)
        except Exception as exc:  # noqa: BLE001 - reported per case
            out["cases"][case["name"]], out["compared"][case["name"]] = [f"error: {exc!r}"], 0
    with open(result_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
