"""Views of a connect path: in a reducer's latent space (with the landscape's loss there), in the plane through
both ends and the bend (Garipov et al.'s picture), and as a plot of the loss against t."""
from __future__ import annotations

import os

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import GlobScopeError
from ..evaluation.paths import barrier, evaluate_rows
from ..storage import study_files
from ..storage.study import Study

PATH_LINE, PATH_CURVE = 0, 1
END_VERTEX = -1  # cell array ``path`` of the two end-point vertices (cells: vertices first, then lines)


# --- the latent view ------------------------------------------------------------------------------
def _landscape_loss(path: str, z: np.ndarray):
    """The landscape's loss interpolated (linearly) at latent points z [m, dim]; NaN outside its grid."""
    from scipy.interpolate import RegularGridInterpolator

    from ..storage.vtk_files import read_vti

    f = read_vti(path)
    nx, ny, nz = f.dims
    dim = z.shape[1]
    axes = [f.origin[a] + f.spacing[a] * np.arange(f.dims[a]) for a in range(dim)]
    grid = f.grid("loss")  # (nz, ny, nx)
    vals = grid[0].T if dim == 2 else np.transpose(grid, (2, 1, 0))  # index order (x, y[, z])
    interp = RegularGridInterpolator(axes, vals, bounds_error=False, fill_value=np.nan)
    return interp(z), f.field_data


def choose_reducers(study: Study, names) -> dict:
    """{dim: reducer name}: the ones given, else the reducer each landscape was computed with, else ae, pca."""
    chosen = {}
    for name in names or []:
        dim = 3 if name.removesuffix(".pt").endswith("3d") else 2
        chosen[dim] = name
    if names:
        return chosen
    for dim in (2, 3):
        vti = study_files.landscape_vti(study.dir, dim)
        if os.path.exists(vti):
            from ..storage.vtk_files import DamagedFileError, read_vti

            try:
                r = read_vti(vti).field_data.get("reducer")
                if isinstance(r, str) and os.path.exists(study_files.reducer_file(study.dir, r)):
                    chosen[dim] = r
                    continue
            except DamagedFileError:  # said now, not after the curve has trained
                raise
            except GlobScopeError:
                pass
        for kind in ("ae", "pca"):
            if os.path.exists(study_files.reducer_file(study.dir, f"{kind}-{dim}d")):
                chosen[dim] = f"{kind}-{dim}d"
                break
        else:
            others = study_files.reducer_files(study.dir, dim)
            if others:
                chosen[dim] = os.path.basename(others[0])[:-3]
    return chosen


def latent_view(study: Study, reducer, paths: dict, x, y, device=None) -> dict:
    """Encode both paths, decode them again, and compare true, decoded and landscape losses.

    ``paths``: {PATH_LINE: rows [m, P], PATH_CURVE: rows [m, P]}; losses are taken on ``(x, y)`` (the
    landscape's own evaluation subset when there is a landscape, so that the gap is the view's error only).
    """
    out = {"z": [], "t": [], "path": [], "loss": [], "loss_decoded": []}
    for p in (PATH_LINE, PATH_CURVE):
        rows = paths[p]
        z = np.asarray(reducer.transform(rows), dtype=np.float64)
        dec = np.asarray(reducer.inverse_transform(z), dtype=np.float32)
        out["z"].append(z)
        out["t"].append(np.linspace(0, 1, len(rows)))
        out["path"].append(np.full(len(rows), p))
        out["loss"].append(evaluate_rows(study, rows, x, y, device)[0])
        out["loss_decoded"].append(evaluate_rows(study, dec, x, y, device)[0])
    out = {k: np.concatenate(v) for k, v in out.items()}
    vti = study_files.landscape_vti(study.dir, reducer.dim)
    out["loss_landscape"] = None
    if os.path.exists(vti):
        out["loss_landscape"], fd = _landscape_loss(vti, out["z"])
    return out


def gap_numbers(view: dict) -> dict:
    """Mean |true loss - decoded loss| and |true loss - landscape loss| along each path."""
    res = {}
    for p, name in ((PATH_LINE, "line"), (PATH_CURVE, "curve")):
        sel = view["path"] == p
        true = view["loss"][sel]
        res[f"{name}_decoded_gap"] = float(np.mean(np.abs(true - view["loss_decoded"][sel])))
        if view.get("loss_landscape") is not None:
            land = view["loss_landscape"][sel]
            inside = np.isfinite(land)
            res[f"{name}_landscape_gap"] = float(np.mean(np.abs(true[inside] - land[inside]))) if inside.any() else None
            res[f"{name}_inside_landscape"] = float(inside.mean())
            b_land, _ = barrier(np.where(inside, land, np.nan), view["t"][sel]) if inside.all() else (None, None)
            res[f"{name}_landscape_barrier"] = b_land
    return res


def none_to_nan(v):
    return np.nan if v is None else v


def write_latent_vtp(path: str, view: dict, field_data: dict) -> None:
    from ..storage.vtk_files import write_vtp

    z = view["z"]
    pts = np.zeros((len(z), 3))
    pts[:, : z.shape[1]] = z
    m = int((view["path"] == PATH_LINE).sum())
    lines = [list(range(0, m)), list(range(m, len(z)))]
    ends = [[0], [m - 1]]
    arrays = {"t": view["t"], "path": view["path"].astype(np.int32), "loss": view["loss"],
              "loss_decoded": view["loss_decoded"],
              "log_loss_decoded": np.log10(view["loss_decoded"]).astype(np.float32)}  # height in log views
    if view.get("loss_landscape") is not None:
        arrays["loss_landscape"] = view["loss_landscape"]
        arrays["log_loss_landscape"] = np.log10(view["loss_landscape"]).astype(np.float32)
    write_vtp(path, pts, lines=lines, verts=ends, point_arrays=arrays,
              cell_arrays={"path": np.array([END_VERTEX, END_VERTEX, PATH_LINE, PATH_CURVE], np.int32)},
              field_data=field_data)


# --- the plane of the curve (Garipov et al.'s picture) -----------------------------------------------
def plane_basis(wa, wb, mid) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal u, v [2, P] of the plane through A, B and ``mid`` (the bend of a one-bend curve)."""
    wa, wb, mid = (np.asarray(w, dtype=np.float64) for w in (wa, wb, mid))
    u = wb - wa
    u /= np.linalg.norm(u)
    v = (mid - wa) - np.dot(mid - wa, u) * u
    nv = np.linalg.norm(v)
    if nv < 1e-12 * np.linalg.norm(wb - wa):
        raise GlobScopeError("the curve did not leave the straight line: no plane to draw (train more epochs)")
    return wa, np.stack([u, v / nv])


def plane_view(study: Study, wa, mid, line_rows, curve_rows, resolution: int = 41, margin: float = 0.25,
               split: str = "test", eval_samples: int | None = 1024, device=None, progress=True) -> dict:
    """The loss on a grid in the plane through A, B and the curve's middle, with both paths on it.

    A quadratic Bezier curve and a one-bend polychain lie exactly in this plane (its control points do),
    and so does the straight line: decoding is exact, the picture is the loss itself.
    """
    from ..evaluation.many_models import eval_data

    wb = line_rows[-1]
    origin_w, basis = plane_basis(wa, wb, mid)
    enc = lambda rows: (np.asarray(rows, dtype=np.float64) - origin_w) @ basis.T  # noqa: E731
    z = np.concatenate([enc(line_rows), enc(curve_rows)])
    lo, hi = z.min(0), z.max(0)
    pad = margin * (hi - lo).max()
    lo, hi = lo - pad, hi + pad
    spacing = (hi - lo) / (resolution - 1)
    gx, gy = np.meshgrid(lo[0] + spacing[0] * np.arange(resolution), lo[1] + spacing[1] * np.arange(resolution),
                         indexing="xy")
    grid_z = np.stack([gx.ravel(), gy.ravel()], 1)  # VTK order: x fastest
    x, y = eval_data(study, split, eval_samples, seed=0)
    loss, acc = np.zeros(len(grid_z)), np.zeros(len(grid_z))
    basis32 = torch.from_numpy(basis.astype(np.float32))
    o32 = torch.from_numpy(origin_w.astype(np.float32))
    for s in tqdm(range(0, len(grid_z), 128), desc="plane", unit="chunk", disable=not progress):
        w = o32 + torch.from_numpy(grid_z[s : s + 128].astype(np.float32)) @ basis32
        loss[s : s + 128], acc[s : s + 128] = evaluate_rows(study, w.numpy(), x, y, device)
    m = len(line_rows)
    dec = origin_w + z @ basis
    view = {"z": z, "t": np.concatenate([np.linspace(0, 1, m)] * 2), "path": np.repeat([PATH_LINE, PATH_CURVE], m),
            "loss": np.concatenate([evaluate_rows(study, line_rows, x, y, device)[0],
                                    evaluate_rows(study, curve_rows, x, y, device)[0]]),
            "loss_decoded": evaluate_rows(study, dec.astype(np.float32), x, y, device)[0],
            "grid": dict(dims=(resolution, resolution, 1), origin=(lo[0], lo[1], 0.0),
                         spacing=(spacing[0], spacing[1], 1.0), loss=loss, accuracy=acc),
            "split": split, "eval_samples": len(x), "reducer": "plane", "note": "plane through A, B and the bend"}
    from scipy.interpolate import RegularGridInterpolator

    vals = loss.reshape(resolution, resolution).T  # index order (x, y)
    axes = [lo[a] + spacing[a] * np.arange(resolution) for a in range(2)]
    view["loss_landscape"] = RegularGridInterpolator(axes, vals, bounds_error=False, fill_value=np.nan)(z)
    view["gaps"] = gap_numbers(view)
    return view


def write_plane(base: str, view: dict, field_data: dict) -> None:
    from ..storage.vtk_files import ImageField, write_vti

    g = view["grid"]
    write_vti(study_files.plane_vti(base), ImageField(g["dims"], g["origin"], g["spacing"],
                                              {"loss": g["loss"].astype(np.float32),
                                               "accuracy": g["accuracy"].astype(np.float32)},
                                              dict(field_data, reducer="plane", split=view["split"],
                                                   eval_samples=np.int64(view["eval_samples"])), "loss"))
    write_latent_vtp(study_files.plane_vtp(base), view, dict(field_data, reducer="plane", split=view["split"]))


# --- pictures -------------------------------------------------------------------------------------
def plot_paths(path: str, t, line: dict, curve: dict, title: str, views: dict | None = None) -> None:
    """Loss against t for both paths (train and test), plus the 2D latent picture when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [v for v in ((views or {}).get(2), (views or {}).get("plane")) if v is not None]
    ncols = 2 + len(panels)
    fig, axs = plt.subplots(1, ncols, figsize=(5 * ncols, 4))
    for ax, split in zip(axs, ("train", "test")):
        for m, name, col in ((line, "straight line", "tab:red"), (curve, "trained curve", "tab:blue")):
            b, _ = barrier(m[f"{split}_loss"], t)
            ax.plot(t, m[f"{split}_loss"], color=col, label=f"{name} (barrier {b:.3g})")
        ax.set_xlabel("t")
        ax.set_ylabel(f"{split} loss")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax, v in zip(axs[2:], panels):
        _plot_latent(ax, v)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from ..storage.safe_write import save_figure

    try:
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def _plot_latent(ax, view):
    z = view["z"]
    vti = view.get("landscape_file")
    curve_colour = "tab:blue"
    grid = None
    if "grid" in view:
        g = view["grid"]
        grid = (g["dims"], g["origin"], g["spacing"], g["loss"].reshape(g["dims"][1], g["dims"][0]))
    elif vti and os.path.exists(vti):
        from ..storage.vtk_files import read_vti

        f = read_vti(vti)
        grid = (f.dims, f.origin, f.spacing, f.grid("loss")[0])
    if grid is not None:
        curve_colour = "white"  # over the viridis landscape
        (nx, ny, _), o, sp, values = grid
        extent = [o[0] - sp[0] / 2, o[0] + sp[0] * (nx - 0.5), o[1] - sp[1] / 2, o[1] + sp[1] * (ny - 0.5)]
        im = ax.imshow(np.log10(np.maximum(values, 1e-12)), origin="lower", extent=extent, cmap="viridis",
                       aspect="auto")
        plt_cb = ax.figure.colorbar(im, ax=ax)
        plt_cb.set_label("log10 landscape loss")
    for p, name, col in ((PATH_LINE, "line", "tab:red"), (PATH_CURVE, "curve", curve_colour)):
        sel = view["path"] == p
        ax.plot(z[sel, 0], z[sel, 1], "-o", ms=2, color=col, label=name, markeredgecolor="k", markeredgewidth=0.3)
    ax.set_title(f"latent view ({view['reducer']})", fontsize=9)
    ax.legend(fontsize=8)
