"""Mode connectivity: low-loss curves between two trained minima (Garipov et al., NeurIPS 2018).

A curve phi(t), t in [0, 1], lives in the full flat parameter space of the study's model. Its ends
are the final checkpoints of runs A and B (fixed); its free bends are initialised on the straight
line between them and trained by sampling one t ~ U[0, 1] per step and descending the training loss
at phi(t) (so the whole curve is pushed into low loss, in expectation over t).

  bezier     degree k+1 Bezier curve with control points A, b_1..b_k, B (k=1: the paper's quadratic)
  polychain  piecewise linear path A - b_1 - ... - b_k - B with evenly spaced knots (k=1: the paper's)

The curve and the straight line are evaluated at 61 evenly spaced t (train/test loss and accuracy;
BatchNorm statistics recomputed at every point for models that have BatchNorm). The barrier of a
path is that of Entezari et al.: max_t loss(t) - ((1-t) loss(0) + t loss(1)).

Everything that goes into the study is written at the end, in one transaction: the 61 curve
points (run label "curve") and the 61 line points (label "line") go to STUDY/paths.h5, a store of
the same layout kept apart from the ensemble in study.h5, so that fit, info, align and the views
see only the trained and imported runs (``--refit`` fits the reducer on both). Then the files: STUDY/connect-A-B.pt (control points), connect-A-B.png (loss
against t), connect-A-B-{2,3}d.vtp (both paths encoded into the latent space, with the true loss,
the loss of the decoded point and the landscape's loss there), and last the report section
"connect-A-B". Curve training saves its state after every epoch (connect-A-B.partial.pt), so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import glob
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as data_mod
from .errors import GlobScopeError
from .evaluation import resolve_device, subset
from .store import RowUnion, Study, paths_store

CURVES = ("bezier", "polychain")
N_POINTS = 61
PATH_LINE, PATH_CURVE = 0, 1
NOT_ENDPOINT_LABELS = ("curve", "line")


# --- the curve ----------------------------------------------------------------------------------
def curve_coefficients(kind: str, bends: int, t) -> torch.Tensor:
    """Weights [m, bends+2] of the control points (A, b_1..b_k, B) at each t: phi(t) = W @ C."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
    n = bends + 1
    i = torch.arange(n + 1, dtype=torch.float64).reshape(1, -1)
    if kind == "bezier":
        binom = torch.tensor([math.comb(n, int(k)) for k in range(n + 1)], dtype=torch.float64)
        return binom * t**i * (1 - t) ** (n - i)
    if kind == "polychain":
        return torch.clamp(1 - (t * n - i).abs(), min=0.0)  # hat functions on the knots k/n
    raise GlobScopeError(f"unknown curve '{kind}'; choose one of {', '.join(CURVES)}")


def lr_factor(epoch: int, epochs: int) -> float:
    """Garipov et al.'s schedule: constant for half the epochs, linear decay to 1% at 90%."""
    a = epoch / max(1, epochs)
    if a <= 0.5:
        return 1.0
    if a <= 0.9:
        return 1.0 - (a - 0.5) / 0.4 * 0.99
    return 0.01


def _bn_modules(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_bn(model, x, batch_size: int = 512, device=None) -> bool:
    """Reset BatchNorm running statistics and recompute them on ``x`` (averages over its batches).

    A point on a curve is a mix of two networks: the ends' running statistics do not describe it.
    Returns False (and does nothing) for a model without BatchNorm.
    """
    bns = _bn_modules(model)
    if not bns:
        return False
    device = device or next(model.parameters()).device
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    model.train()
    seen = 0
    for s in range(0, len(x), batch_size):
        xb = x[s : s + batch_size].to(device)
        for m in bns:  # weight each batch by its size (as Garipov et al.'s update_bn does)
            m.momentum = len(xb) / (seen + len(xb))
        model(xb)
        seen += len(xb)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.eval()
    return True


# --- inputs -------------------------------------------------------------------------------------
def _parse_run(ref, study: Study):
    """``N`` (a run of ``study``) or ``DIR:N`` (a run of another study) -> (study, run)."""
    text = str(ref)
    other, sep, num = text.rpartition(":")
    try:
        run = int(num if sep else text)
    except ValueError:
        raise GlobScopeError(f"--runs: '{text}' is not a run number (N, or STUDY_DIR:N)") from None
    return (Study.open(other) if sep else study), run


def _final_row(s: Study, run: int) -> int:
    if not 0 <= run < len(s.runs):
        raise GlobScopeError(f"{s.h5_path}: no run {run} (the study has {len(s.runs)} runs)")
    rows = s.run_rows(run, label=None)
    if not len(rows):
        raise GlobScopeError(f"{s.h5_path}: run {run} has no checkpoints, so no final checkpoint to connect")
    if s.labels[rows[-1]] in NOT_ENDPOINT_LABELS:
        raise GlobScopeError(f"{s.h5_path}: run {run} is a stored {s.labels[rows[-1]]}, not a trained run")
    return int(rows[-1])


def _endpoints(study: Study, runs):
    if len(runs) != 2:
        raise GlobScopeError(f"--runs needs exactly two runs, got {len(runs)}")
    if not study.final_rows(label=None):
        raise GlobScopeError(f"{study.h5_path}: the study has no final checkpoints (train runs first)")
    (sa, ra), (sb, rb) = (_parse_run(r, study) for r in runs)
    if sa.h5_path == sb.h5_path and ra == rb:
        raise GlobScopeError(f"--runs {runs[0]} {runs[1]}: the same run twice; a curve needs two different minima")
    for s in (sa, sb):
        if s.model_spec != study.model_spec or s.layout != study.layout:
            raise GlobScopeError(f"{s.h5_path}: runs of different models: {s.model_spec['name']} "
                                 f"{s.model_spec.get('kwargs')} vs {study.model_spec['name']} "
                                 f"{study.model_spec.get('kwargs')}")
        if s.dataset_spec != study.dataset_spec:
            raise GlobScopeError(f"{s.h5_path}: trained on another dataset ({s.dataset_spec['name']}) "
                                 f"than {study.h5_path}")
    wa = sa.read_params([_final_row(sa, ra)])[0]
    wb = sb.read_params([_final_row(sb, rb)])[0]
    if not (np.isfinite(wa).all() and np.isfinite(wb).all()):
        raise GlobScopeError(f"{study.h5_path}: a final checkpoint of runs {runs[0]}, {runs[1]} is not finite")
    if np.array_equal(wa, wb):
        raise GlobScopeError(f"--runs {runs[0]} {runs[1]}: both final checkpoints are identical; nothing to connect")
    return wa, wb, (sa, ra), (sb, rb)


def _tag(study: Study, ref_study: Study, run: int) -> str:
    return str(run) if ref_study.h5_path == study.h5_path else f"{os.path.basename(ref_study.dir)}.{run}"


# --- training -----------------------------------------------------------------------------------
def train_curve(model, layout, wa, wb, kind, bends, ds, epochs, lr, optimizer="sgd", batch_size=64,
                weight_decay=0.0, seed=0, device=None, partial_path=None, progress=True, config_key=""):
    """Train the free bends; returns the control points [bends+2, P] (float32, A first, B last)."""
    from torch.func import functional_call

    from .train import make_optimizer

    device = device or torch.device("cpu")
    model = model.to(device)
    wa_t = torch.as_tensor(wa, device=device)
    wb_t = torch.as_tensor(wb, device=device)
    if bends < 1:
        raise GlobScopeError(f"--bends must be at least 1, not {bends}")
    frac = torch.arange(1, bends + 1, dtype=torch.float32, device=device).reshape(-1, 1) / (bends + 1)
    free = torch.nn.Parameter(wa_t + frac * (wb_t - wa_t))  # initialised on the straight line
    opt = make_optimizer(optimizer, [free], lr, weight_decay)
    buffer_names = {n for n, _ in model.named_buffers()}
    start = 0
    if partial_path and os.path.exists(partial_path):
        try:
            st = torch.load(partial_path, map_location=device, weights_only=True)
            if st.get("config") == config_key:
                free.data.copy_(st["free"])
                opt.load_state_dict(st["optimizer"])
                start = int(st["epoch"])
        except Exception:  # a damaged resume file only costs the work it held
            start = 0

    gen = torch.Generator().manual_seed(seed * 7919 + start)
    n = len(ds.train_x)
    steps = math.ceil(n / batch_size)
    bar = tqdm(total=epochs * steps, initial=start * steps, desc="connect", unit="step", disable=not progress)
    model.train()
    for epoch in range(start, epochs):
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(epoch, epochs)
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            xb, yb = ds.train_x[idx].to(device), ds.train_y[idx].to(device)
            t = torch.rand((), generator=gen).item()
            c = curve_coefficients(kind, bends, t).to(device=device, dtype=torch.float32)[0]
            point = c[0] * wa_t + c[-1] * wb_t + c[1:-1] @ free
            state = layout.unflatten(point)  # views of ``point``: gradients reach the bends
            for name in buffer_names & state.keys():
                state[name] = state[name].detach().clone()  # BatchNorm updates these in place
            loss = F.cross_entropy(functional_call(model, state, (xb,)), yb)
            if not torch.isfinite(loss):
                bar.close()
                _remove(partial_path)  # resuming would only diverge again
                raise GlobScopeError(f"curve training diverged: loss {loss.item()} at epoch {epoch + 1}, t={t:.3f}; "
                                     f"try a lower --lr (now {lr}). Nothing was stored.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            bar.update(1)
        if not torch.isfinite(free).all():
            bar.close()
            _remove(partial_path)
            raise GlobScopeError(f"curve training diverged: bends not finite after epoch {epoch + 1}; "
                                 f"try a lower --lr (now {lr}). Nothing was stored.")
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / n:.4f}")
        if partial_path:
            _save_pt(partial_path, {"config": config_key, "epoch": epoch + 1, "free": free.detach().cpu(),
                                    "optimizer": opt.state_dict()})
    bar.close()
    return torch.cat([wa_t[None], free.detach(), wb_t[None]]).cpu().numpy()


def _remove(path) -> None:
    if path and os.path.exists(path):
        os.remove(path)


def _save_pt(path: str, obj) -> None:
    from .store import save_torch

    save_torch(obj, path)


# --- evaluation along a path ----------------------------------------------------------------------
def evaluate_rows(study: Study, rows, x, y, device) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy of each flat row [m, P], many models per forward pass (batched.py)."""
    from .batched import evaluate_flat

    return evaluate_flat(study, torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)), x, y, device=device)


def evaluate_points(study, model, layout, points, ev_train, ev_test, bn_x=None, device=None, progress=True):
    """Loss/accuracy at each row of ``points`` [m, P]; rows get recomputed BN statistics if any.

    Returns (rows float32 [m, P], metrics {train_loss, train_acc, test_loss, test_acc}: arrays [m]).
    """
    device = device or torch.device("cpu")
    rows = np.array(points, dtype=np.float32, copy=True)
    if bn_x is not None:
        model = model.to(device)
        for i in tqdm(range(len(rows)), desc="BatchNorm statistics", unit="pt", disable=not progress):
            layout.load_into(model, torch.from_numpy(rows[i]))
            if recompute_bn(model, bn_x, device=device):
                rows[i] = layout.flatten(model.state_dict()).numpy()
    out = {}
    out["train_loss"], out["train_acc"] = evaluate_rows(study, rows, *ev_train, device)
    out["test_loss"], out["test_acc"] = evaluate_rows(study, rows, *ev_test, device)
    return rows, out


def barrier(values, t) -> tuple[float, float]:
    """Entezari et al.: (max_t v(t) - ((1-t) v(0) + t v(1)), the t where it is reached)."""
    v, t = np.asarray(values, dtype=np.float64), np.asarray(t, dtype=np.float64)
    rise = v - ((1 - t) * v[0] + t * v[-1])
    k = int(np.argmax(rise))
    return float(rise[k]), float(t[k])


def path_summary(m: dict, t) -> dict:
    out = {}
    for split in ("train", "test"):
        b, at = barrier(m[f"{split}_loss"], t)
        eb, _ = barrier(1 - np.asarray(m[f"{split}_acc"]), t)
        out[f"{split}_loss_barrier"] = b
        out[f"{split}_loss_barrier_t"] = at
        out[f"{split}_error_barrier"] = eb
        out[f"{split}_loss_max"] = float(np.max(m[f"{split}_loss"]))
    return out


# --- the latent view ------------------------------------------------------------------------------
def _landscape_loss(path: str, z: np.ndarray):
    """The landscape's loss interpolated (linearly) at latent points z [m, dim]; NaN outside its grid."""
    from scipy.interpolate import RegularGridInterpolator

    from .vtkio import read_vti

    f = read_vti(path)
    nx, ny, nz = f.dims
    dim = z.shape[1]
    axes = [f.origin[a] + f.spacing[a] * np.arange(f.dims[a]) for a in range(dim)]
    grid = f.grid("loss")  # (nz, ny, nx)
    vals = grid[0].T if dim == 2 else np.transpose(grid, (2, 1, 0))  # index order (x, y[, z])
    interp = RegularGridInterpolator(axes, vals, bounds_error=False, fill_value=np.nan)
    return interp(z), f.field_data


def _choose_reducers(study: Study, names) -> dict:
    """{dim: reducer name}: the ones given, else the reducer each landscape was computed with, else ae, pca."""
    from .reducers import reducer_path

    chosen = {}
    for name in names or []:
        dim = 3 if name.removesuffix(".pt").endswith("3d") else 2
        chosen[dim] = name
    if names:
        return chosen
    for dim in (2, 3):
        vti = os.path.join(study.dir, f"landscape-{dim}d.vti")
        if os.path.exists(vti):
            try:
                from .vtkio import read_vti

                r = read_vti(vti).field_data.get("reducer")
                if isinstance(r, str) and os.path.exists(reducer_path(study.dir, r)):
                    chosen[dim] = r
                    continue
            except GlobScopeError:
                pass
        for kind in ("ae", "pca"):
            if os.path.exists(reducer_path(study.dir, f"{kind}-{dim}d")):
                chosen[dim] = f"{kind}-{dim}d"
                break
        else:
            others = sorted(glob.glob(os.path.join(study.dir, "reducers", f"*-{dim}d.pt")))
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
    vti = os.path.join(study.dir, f"landscape-{reducer.dim}d.vti")
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


def _nan_if_none(v):
    return np.nan if v is None else v


def write_latent_vtp(path: str, view: dict, field_data: dict) -> None:
    from .vtkio import write_vtp

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


END_VERTEX = -1  # cell array ``path`` of the two end-point vertices (cells: vertices first, then lines)


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
    from .batched import eval_data

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
    from .vtkio import ImageField, write_vti

    g = view["grid"]
    write_vti(base + "-plane.vti", ImageField(g["dims"], g["origin"], g["spacing"],
                                              {"loss": g["loss"].astype(np.float32),
                                               "accuracy": g["accuracy"].astype(np.float32)},
                                              dict(field_data, reducer="plane", split=view["split"],
                                                   eval_samples=np.int64(view["eval_samples"])), "loss"))
    write_latent_vtp(base + "-plane.vtp", view, dict(field_data, reducer="plane", split=view["split"]))


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
    from .store import save_figure

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
        from .vtkio import read_vti

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


# --- the stage ------------------------------------------------------------------------------------
def connect(study_dir: str, runs=(0, 1), curve: str = "bezier", bends: int = 1, epochs: int = 50,
            lr: float | None = None, optimizer: str | None = None, batch_size: int | None = None,
            weight_decay: float = 0.0, points: int = N_POINTS, eval_samples: int | None = 10000,
            reducers=None, refit: bool = False, store_line: bool = True, seed: int = 0, device: str = "auto",
            plane_resolution: int = 41, plane_eval_samples: int | None = 1024, progress: bool = True) -> dict:
    """Train a curve between the final checkpoints of two runs, evaluate it, store and draw it.

    Returns the report section (also written to STUDY/report.json under "connect-A-B").
    """
    if curve not in CURVES:
        raise GlobScopeError(f"--curve {curve}: choose one of {', '.join(CURVES)}")
    if bends < 1:
        raise GlobScopeError(f"--bends must be at least 1, not {bends}")
    if epochs < 1:
        raise GlobScopeError(f"--epochs must be at least 1, not {epochs}")
    if points < 3:
        raise GlobScopeError(f"--points must be at least 3, not {points}")
    if plane_resolution and plane_resolution < 2:
        raise GlobScopeError(f"--plane-resolution must be 0 (no plane) or at least 2, not {plane_resolution}")
    study = Study.open(study_dir)
    from .store import check_writable

    check_writable(study.dir, 2 * (2 * points * study.n_params * 4) + (1 << 20), "connect")  # paths.h5 and its copy
    wa, wb, (sa, ra), (sb, rb) = _endpoints(study, list(runs))
    ends = [_tag(study, sa, ra), _tag(study, sb, rb)]
    tag = "-".join(ends)
    key = f"connect-{tag}"
    base = os.path.join(study.dir, key)
    run_info = sa.runs[ra]
    optimizer = optimizer or run_info.get("optimizer") or "sgd"
    lr = float(lr if lr is not None else (run_info.get("lr") or 0.05))
    batch_size = int(batch_size or run_info.get("batch_size") or 64)
    dev = resolve_device(device)
    t0 = time.time()

    from .reducers import fit_reducer, load_reducer

    loaded = {dim: load_reducer(study, name) for dim, name in _choose_reducers(study, reducers).items()}
    ds = data_mod.load_dataset(study.dataset_spec)
    model = study.build_model().to(dev)
    layout = study.layout
    has_bn = bool(_bn_modules(model))
    torch.manual_seed(seed)
    config = dict(runs=ends, curve=curve, bends=bends, epochs=epochs, lr=lr,
                  optimizer=optimizer, batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    config_key = json.dumps(config, sort_keys=True)
    control = train_curve(model, layout, wa, wb, curve, bends, ds, epochs, lr, optimizer, batch_size, weight_decay,
                          seed, dev, partial_path=base + ".partial.pt", progress=progress, config_key=config_key)
    train_seconds = time.time() - t0

    # evaluation at evenly spaced t, with the same evaluation subsets as training (train.py)
    t = np.linspace(0.0, 1.0, points)
    ev_train = subset(ds.train_x, ds.train_y, eval_samples, seed=1)
    ev_test = subset(ds.test_x, ds.test_y, eval_samples, seed=2)
    bn_x = ds.train_x if has_bn else None
    curve_pts = curve_coefficients(curve, bends, t).numpy().astype(np.float32) @ control
    line_pts = np.outer(1 - t, wa).astype(np.float32) + np.outer(t, wb).astype(np.float32)
    curve_rows, m_curve = evaluate_points(study, model, layout, curve_pts, ev_train, ev_test, bn_x, dev, progress)
    line_rows, m_line = evaluate_points(study, model, layout, line_pts, ev_train, ev_test, bn_x, dev, progress)
    for name, m in (("curve", m_curve), ("line", m_line)):
        bad = [k for k, v in m.items() if not np.isfinite(v).all()]
        if bad:
            raise GlobScopeError(f"{study.h5_path}: the {name} diverged: {', '.join(bad)} not finite along it "
                                 f"(try a lower --lr, now {lr}). Nothing was stored.")

    views, plane_skipped = {}, None
    if plane_resolution:  # the exact picture: the plane of the curve (needs nothing stored)
        mid = control[1] if bends == 1 else curve_pts[points // 2]
        try:
            views["plane"] = plane_view(study, wa, mid, line_rows, curve_rows, plane_resolution,
                                        eval_samples=plane_eval_samples, device=dev, progress=progress)
        except GlobScopeError as exc:  # a curve still on the line has no plane; the rest stands
            plane_skipped = str(exc)
    if not refit:  # drawn with the reducers as they are, before anything is stored
        for dim, red in sorted(loaded.items()):
            views[dim] = _view(study, red, dim, line_rows, curve_rows, dev, progress, refit=False)

    # everything is computed: store the points in one transaction, apart from the ensemble (paths.h5)
    base_info = dict(label="curve", connect=key, path="curve", **{k: v for k, v in config.items() if k != "runs"},
                     ends=config["runs"], t=t.tolist(), batchnorm_recomputed=has_bn)
    paths = paths_store(study, create=True)
    with paths.transaction(extra_bytes=(2 * points) * study.n_params * 4) as w:
        for r, info in enumerate(paths.runs):  # an earlier curve between the same runs is superseded
            if info.get("connect") == key and not info.get("superseded"):
                w.set_run(r, superseded=True)
        rc = w.add_run(**base_info)
        w.append(rc, np.arange(points), curve_rows, label="curve", **m_curve)
        rl = None
        if store_line:
            rl = w.add_run(**dict(base_info, label="line", path="line", curve="line", bends=0, epochs=0))
            w.append(rl, np.arange(points), line_rows, label="line", **m_line)
    _save_pt(base + ".pt", {"control_points": torch.from_numpy(control), "config": config_key})
    _remove(base + ".partial.pt")

    if refit:  # fitted on the ensemble and the stored paths; it still belongs to the (unchanged) study
        from .reducers import reducer_path, study_id

        for dim in sorted(loaded):
            red = loaded[dim]
            loaded[dim] = fit_reducer(RowUnion(study, paths), red.kind, red.dim, save=False, **red.config)
            loaded[dim].study_id = study_id(study)
            loaded[dim].save(reducer_path(study.dir, loaded[dim].name))
            views[dim] = _view(study, loaded[dim], dim, line_rows, curve_rows, dev, progress, refit=True)
    latent = {"plane": {"skipped": plane_skipped}} if plane_skipped else {}
    if "plane" in views:
        v = views["plane"]
        write_plane(base, v, {"study": study.dir, "connect": key})
        latent["plane"] = dict(reducer="plane", split=v["split"], eval_samples=v["eval_samples"], note=v["note"],
                               file=os.path.basename(base + "-plane.vtp"),
                               landscape=os.path.basename(base + "-plane.vti"), **v["gaps"])
    for dim, view in sorted((k, v) for k, v in views.items() if k != "plane"):
        vtp = f"{base}-{dim}d.vtp"
        write_latent_vtp(vtp, view, {"study": study.dir, "reducer": view["reducer"], "split": view["split"],
                                     "connect": key, "curve_decoded_gap": view["gaps"]["curve_decoded_gap"],
                                     "curve_landscape_gap": _nan_if_none(view["gaps"].get("curve_landscape_gap"))})
        latent[f"{dim}d"] = dict(reducer=view["reducer"], split=view["split"], eval_samples=view["eval_samples"],
                                 file=os.path.basename(vtp),
                                 note=view["note"], landscape=view["landscape_file"] and
                                 os.path.basename(view["landscape_file"]), **view["gaps"])

    s_curve, s_line = path_summary(m_curve, t), path_summary(m_line, t)
    ratio = s_curve["train_loss_barrier"] / s_line["train_loss_barrier"] if s_line["train_loss_barrier"] > 0 else None
    title = (f"{os.path.basename(study.dir)}: runs {tag}, {curve} with {bends} bend(s), {epochs} epochs | "
             f"train-loss barrier: line {s_line['train_loss_barrier']:.3g}, curve {s_curve['train_loss_barrier']:.3g}")
    plot_paths(base + ".png", t, m_line, m_curve, title, views)

    section = dict(config, key=key, points=points, points_file=os.path.basename(paths.h5_path), curve_run=rc,
                   line_run=rl, batchnorm_recomputed=has_bn,
                   n_params=study.n_params, train_seconds=round(train_seconds, 2),
                   seconds=round(time.time() - t0, 2), curve=curve, curve_summary=s_curve, line_summary=s_line,
                   barrier_ratio_train=ratio, t=t.tolist(),
                   along={"curve": {k: v.tolist() for k, v in m_curve.items()},
                          "line": {k: v.tolist() for k, v in m_line.items()}},
                   latent=latent, plot=os.path.basename(base + ".png"),
                   control_points=os.path.basename(base + ".pt"))
    study.update_report(key, section)
    return section


def _view(study, red, dim, line_rows, curve_rows, dev, progress, refit) -> dict:
    """The latent view of both paths with one reducer, on the landscape's evaluation data if there is one."""
    from .batched import eval_data
    from .vtkio import read_vti

    note = "refitted with the curve and line points" if refit else "fitted before the curve points were added"
    vti = os.path.join(study.dir, f"landscape-{dim}d.vti")
    split, samples = "test", None
    if os.path.exists(vti):
        fd = read_vti(vti).field_data
        split = fd.get("split") if fd.get("split") in ("train", "test") else "test"
        samples = int(np.atleast_1d(fd["eval_samples"])[0]) if "eval_samples" in fd else None
        samples = samples if samples and samples > 0 else None
        if refit:
            note += _recompute_landscape(study, red.name, vti, progress)
    x, y = eval_data(study, split, samples, seed=0)  # the landscape's subset (landscape.py, eval_seed=0)
    view = latent_view(study, red, {PATH_LINE: line_rows, PATH_CURVE: curve_rows}, x, y, dev)
    view.update(reducer=red.name, split=split, eval_samples=len(x), note=note,
                landscape_file=vti if os.path.exists(vti) else None)
    view["gaps"] = gap_numbers(view)
    return view


def _recompute_landscape(study: Study, reducer_name: str, vti: str, progress: bool) -> str:
    """After a refit the old landscape belongs to the old latent space: recompute it if we can."""
    try:
        from .landscape import compute_landscape
    except ImportError:
        return "; landscape NOT recomputed (no landscape stage installed): run 'globscope landscape' again"
    from .vtkio import read_vti

    f = read_vti(vti)
    fd = f.field_data
    if fd.get("reducer") != reducer_name:
        return f"; landscape {os.path.basename(vti)} was made with {fd.get('reducer')}, left as it is"
    kw = {"split": fd.get("split", "test"), "progress": progress}
    if "eval_samples" in fd:
        kw["eval_samples"] = int(np.atleast_1d(fd["eval_samples"])[0])
    compute_landscape(study, reducer_name, int(f.dims[0]), **kw)
    dim = 3 if f.dims[2] > 1 else 2
    if not os.path.isdir(os.path.join(study.dir, f"topology-{dim}d")):
        return "; landscape recomputed with the refitted reducer"
    from .topology_io import study_topology

    study_topology(study.dir, dim=dim, verbose=False)  # the old merge tree described the old field
    return "; landscape and merge tree recomputed with the refitted reducer"


def load_control_points(path: str) -> tuple[np.ndarray, dict]:
    """Control points [bends+2, P] and config of a stored curve (STUDY/connect-A-B.pt)."""
    if not os.path.exists(path):
        raise GlobScopeError(f"{path}: no stored curve")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        return st["control_points"].numpy(), json.loads(st["config"])
    except Exception as exc:
        raise GlobScopeError(f"{path}: not a GlobScope curve file ({type(exc).__name__})") from None
