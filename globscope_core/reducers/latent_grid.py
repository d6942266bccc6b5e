"""The latent grid and its trust: bounds around the encoded checkpoints, grid point coordinates, the distance
of a point outside the convex hull of the checkpoints, the clamp of outside points onto the hull, and
isolated spikes of a field. numpy and scipy only (no torch, no files)."""
from __future__ import annotations

import numpy as np


def grid_bounds(Z: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Box around the points ``Z``, widened by ``margin`` x its extent on each side."""
    lo, hi = Z.min(0), Z.max(0)
    ext = hi - lo
    ext = np.where(ext > 0, ext, np.maximum(1.0, np.abs(lo)))  # a degenerate axis still gets a width
    return lo - margin * ext, hi + margin * ext


def _hull_equations(Z: np.ndarray):
    """Facet planes of the convex hull of ``Z``, rows [n, b] with n . x + b <= 0 inside and |n| = 1; None when
    the hull is degenerate (all points on a line or plane)."""
    from scipy.spatial import ConvexHull, QhullError

    try:
        return ConvexHull(Z).equations
    except (QhullError, ValueError):
        return None


def hull_extrapolation(Z: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance of each point outside the convex hull of ``Z`` (0 inside), in latent units.

    The largest signed distance to the hull's facet planes: exact where the nearest hull point lies on a
    facet, a lower bound near hull vertices (never 0 outside). A degenerate hull (all points on a line
    or plane) falls back to the distance to the nearest point of ``Z``."""
    eq = _hull_equations(Z)
    if eq is None:
        from scipy.spatial import cKDTree

        return cKDTree(Z).query(pts)[0]
    out = np.empty(len(pts))
    for s in range(0, len(pts), 65536):
        p = pts[s : s + 65536]
        out[s : s + 65536] = (p @ eq[:, :-1].T + eq[:, -1]).max(1)
    return np.maximum(out, 0.0)


class HullClamp:
    """Moves latent points outside the convex hull of ``Z`` onto its boundary, along the ray from the
    centroid of ``Z``: the decoder is then evaluated only where it was fitted, and beyond the hull the
    landscape continues each boundary value outward instead of extrapolating the decoder (whose models
    grow worse without bound with the distance). Points inside are unchanged. Degenerate hulls: no-op."""

    def __init__(self, Z: np.ndarray):
        self.center = Z.mean(0)
        self.eq = _hull_equations(Z)

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        if self.eq is None:
            return pts
        n, b = self.eq[:, :-1], self.eq[:, -1]
        u = pts - self.center
        num = -(self.center @ n.T + b)  # > 0: the centroid is inside every facet's half-space
        den = u @ n.T
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(den > 0, num / den, np.inf).min(1)
        t = t[:, None]
        return np.where(t < 1.0, self.center + np.minimum(t, 1.0) * u, pts)  # inside: the very same point


def find_spikes(log_loss: np.ndarray, dims, decades: float = 0.5) -> np.ndarray:
    """VTK point ids of isolated spikes: points more than ``decades`` above every axis neighbour (4 in 2D,
    6 in 3D; grid-boundary points have fewer and are not tested). NaN counts as +inf (never a spike)."""
    nx, ny, nz = dims
    f = np.where(np.isnan(log_loss), np.inf, log_loss).reshape(nz, ny, nx)
    core = tuple(slice(1, -1) if n > 2 else slice(None) for n in (nz, ny, nx))
    if any(n <= 2 and n != 1 for n in (nz, ny, nx)):
        return np.zeros(0, np.int64)
    nb = np.full(f[core].shape, -np.inf)
    for ax, n in enumerate((nz, ny, nx)):
        if n == 1:
            continue
        for d in (-1, 1):
            sl = list(core)
            sl[ax] = slice(1 + d, n - 1 + d)
            nb = np.maximum(nb, f[tuple(sl)])
    spike = np.zeros(f.shape, bool)
    spike[core] = np.isfinite(f[core]) & (f[core] > nb + decades)
    return np.flatnonzero(spike.ravel())


def grid_points(idx: np.ndarray, dims, origin, spacing, dim: int) -> np.ndarray:
    """Latent coordinates [k, dim] of grid points with VTK point indices ``idx`` (x fastest)."""
    nx, ny, _ = dims
    ijk = np.stack([idx % nx, (idx // nx) % ny, idx // (nx * ny)], 1).astype(np.float64)
    return (np.asarray(origin) + ijk * np.asarray(spacing))[:, :dim]


def trusted_points(Z: np.ndarray, pts: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """(trusted [k] bool, extrapolation [k]) of latent points ``pts``: a point is trusted inside the hull of the
    encoded checkpoints ``Z`` or within one grid cell of it (``spacing``: the grid's step per axis), at most 5% of
    the hull's extent, so the cells around a final checkpoint on the hull count. ``extrapolation`` is the
    distance outside the hull as a fraction of that extent (0 inside)."""
    outside = hull_extrapolation(Z, pts)
    extent = float(np.max(Z.max(0) - Z.min(0))) or 1.0
    dim = Z.shape[1]
    trusted = outside <= min(np.linalg.norm(np.asarray(spacing[:dim], np.float64)), 0.05 * extent)
    return trusted, outside / extent


def interpolate(values: np.ndarray, dims, origin, spacing, pt) -> float:
    """Multilinear interpolation at latent point ``pt`` of a grid field ``values`` (flat, VTK order, x fastest;
    ``dims`` (nx, ny, nz)); NaN when a corner it needs is NaN. ``pt`` must lie inside the grid."""
    dim = len(pt)
    shape = tuple(int(n) for n in dims[:dim])
    f = np.asarray(values, np.float64).reshape(tuple(reversed(shape)) if dim == 3 else (shape[1], shape[0]))
    u = (np.asarray(pt, np.float64) - np.asarray(origin[:dim])) / np.asarray(spacing[:dim])
    i0 = np.clip(np.floor(u).astype(int), 0, np.maximum(np.array(shape) - 2, 0))
    w = np.clip(u - i0, 0.0, 1.0)
    total = 0.0
    for corner in np.ndindex(*(2,) * dim):
        c = np.minimum(i0 + np.array(corner), np.array(shape) - 1)
        weight = float(np.prod(np.where(np.array(corner) == 1, w, 1 - w)))
        if weight:
            total += weight * f[tuple(reversed(c.tolist()))]
    return float(total)
