"""Which residual interpolant should the AE use? (issue 14, item 2; scratch experiment kept for the record)

Fits `ae` once with the earlier Gaussian residual on the held-out split of a study (reducers/holdout.py), then swaps
only the residual interpolant (same network, same encoder) and scores the held-out checkpoints.
Usage: PYTHONPATH=. .venv/bin/python bench/explore/ae_residual.py STUDY DIM   (STUDY is read only)
It reaches into the reducer's fitted attributes: an experiment, not an API.
"""
import sys
import time

import numpy as np
import torch
from scipy.spatial import Delaunay

from globscope_core.reducers.holdout import HeldOutScorer, fit_held_out
from globscope_core.storage.study import Study

study = Study.open(sys.argv[1])
dim = int(sys.argv[2])
sc = HeldOutScorer(study, eval_samples=2000)
print(sc.protocol)
t0 = time.time()
r = fit_held_out(study, "ae", dim, residual="gaussian")
print("fit", time.time() - t0, flush=True)
print("two-neighbour", sc.score_two_neighbour(r.basis.scale), flush=True)

net, zf, w = r.net, r.kernel_z_.double(), r.kernel_width_
fit_coords = torch.as_tensor(r.fit_coords_)
with torch.no_grad():
    residual = fit_coords - net.decode(zf)  # what the network leaves at the fitted latent points
base_decode = r._decode_norm

# where the encoder puts held-out checkpoints: on the segment between their two fitted neighbours?
Zh = r.transform(study.read_params(sc.held_rows))
Zf = r.fit_z_
pos = {row: i for i, row in enumerate(r.fit_rows_)}
a = np.array([pos[x] for x in sc.neighbours[:, 0]])
b = np.array([pos[x] for x in sc.neighbours[:, 1]])
seg = Zf[b] - Zf[a]
t = ((Zh - Zf[a]) * seg).sum(1) / (seg**2).sum(1)
off = np.linalg.norm(Zh - (Zf[a] + t[:, None] * seg), axis=1) / np.linalg.norm(seg, axis=1)
print(f"encoded held-out: position along neighbour segment t median {np.median(t):.2f} [{t.min():.2f}..{t.max():.2f}], "
      f"off-segment/|seg| median {np.median(off):.2f} max {off.max():.2f}")


def radial(d, kind):
    if kind == "tps" and dim == 2:
        return d**2 * torch.log(d.clamp_min(1e-300))
    return d**3 if kind == "cubic" else d  # (3D "tps" is r, its polyharmonic kernel there)


def spline(values, kind="tps"):
    """Polyharmonic spline with a linear tail through ``values`` at the fitted latent points."""
    zs = zf / w
    n = len(zs)
    P = torch.cat([torch.ones(n, 1, dtype=zs.dtype), zs], 1)
    A = torch.zeros(n + dim + 1, n + dim + 1, dtype=zs.dtype)
    A[:n, :n], A[:n, n:], A[n:, :n] = radial(torch.cdist(zs, zs), kind), P, P.T
    sol = torch.linalg.solve(A, torch.cat([values, torch.zeros(dim + 1, values.shape[1], dtype=values.dtype)]))
    W, V = sol[:n], sol[n:]

    def f(z):
        zz = z.double() / w
        return radial(torch.cdist(zz, zs), kind) @ W + torch.cat([torch.ones(len(zz), 1, dtype=zz.dtype), zz], 1) @ V

    return f


tri = Delaunay(Zf)


def delaunay_linear(z):
    """Piecewise-linear interpolation of the residual on the Delaunay triangulation (0 outside it)."""
    zn = z.detach().cpu().numpy()
    s = tri.find_simplex(zn, tol=1e-9)
    T = tri.transform[s]
    bary = np.einsum("nij,nj->ni", T[:, :dim], zn - T[:, dim])
    bary = np.c_[bary, 1 - bary.sum(1)]
    out = (torch.as_tensor(bary)[:, :, None] * residual[tri.simplices[s]]).sum(1)
    out[torch.as_tensor(s < 0)] = 0
    return out


def gauss(ridge):
    K = torch.exp(-0.5 * torch.cdist(zf, zf).square() / w**2)
    Wg = torch.linalg.solve(K + ridge * torch.eye(len(K), dtype=K.dtype), residual)
    return lambda z: torch.exp(-0.5 * torch.cdist(z.double(), zf).square() / w**2) @ Wg


T, L1 = spline(residual), spline(residual, "r")
variants = {  # residual interpolants added to the network's decoding; None: the fitted reducer as it is
    "gauss-1e-6 (fitted)": None, "net only": lambda z: 0, "gauss-1e-10": gauss(1e-10), "tps": T,
    "cubic r^3": spline(residual, "cubic"), "linear r": L1, "delaunay-linear": delaunay_linear,
    "0.5 tps + 0.5 lin": lambda z: 0.5 * T(z) + 0.5 * delaunay_linear(z),
    "0.5 r + 0.5 lin": lambda z: 0.5 * L1(z) + 0.5 * delaunay_linear(z),
    "0.75 r + 0.25 lin": lambda z: 0.75 * L1(z) + 0.25 * delaunay_linear(z),
}
print("hull: coplanar", len(tri.coplanar))


def report(name, s, fitted=None):
    tail = "" if fitted is None else f" | fitted std {fitted:.1e}"
    print(f"{name:22s} ho mse_raw {s['mse_raw']:.2e} std {s['mse_std']:.2e} gap mean {s['loss_gap_mean']:.3f} "
          f"med {s['loss_gap_median']:.3f} max {s['loss_gap_max']:.2f}{tail}", flush=True)


r_only = spline(fit_coords, "r")  # the spline through the coordinates themselves, no network
r._decode_norm = lambda n_, z: r_only(z)
report("r, no net", sc.score_reducer(r))
for name, f in variants.items():
    r._decode_norm = base_decode if f is None else (lambda f: lambda n_, z: n_.decode(z) + f(z))(f)
    s = sc.score_reducer(r)
    fitted = ((r.decode_coords(Zf) - r.fit_coords_ * r.unit_) ** 2).sum(1).mean() / r.basis.n_params
    report(name, s, fitted)
