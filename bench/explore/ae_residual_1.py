import sys, time, numpy as np, torch
from scipy.spatial import Delaunay
from globscope_core.store import Study
from globscope_core.reducers.holdout import HeldOutScorer, fit_held_out
study = Study.open(sys.argv[1]); dim = int(sys.argv[2])
sc = HeldOutScorer(study, eval_samples=2000)
print(sc.protocol)
t=time.time(); r = fit_held_out(study, "ae", dim); print("fit", time.time()-t, flush=True)
print("two-neighbour", sc.score_two_neighbour(r.basis.scale), flush=True)
net = r.net; zf = r.kernel_z_.double(); 
with torch.no_grad():
    R = torch.as_tensor(r.fit_coords_) - net.decode(zf)
base_decode = r._decode_norm
Xh = study.read_params(sc.held_rows); Zh = r.transform(Xh)
Zf = r.fit_z_
fr = {row: i for i, row in enumerate(r.fit_rows_)}
a = np.array([fr[x] for x in sc.neighbours[:, 0]]); b = np.array([fr[x] for x in sc.neighbours[:, 1]])
seg = Zf[b] - Zf[a]; t_ = ((Zh - Zf[a]) * seg).sum(1) / (seg**2).sum(1)
off = np.linalg.norm(Zh - (Zf[a] + t_[:, None] * seg), axis=1) / np.linalg.norm(seg, axis=1)
print("encoded held-out: position along neighbour segment t median %.2f [%.2f..%.2f], off-segment/|seg| median %.2f max %.2f" % (np.median(t_), t_.min(), t_.max(), np.median(off), off.max()))
w = r.kernel_width_
def tps_fit(lam):
    zs = zf / w
    d = torch.cdist(zs, zs)
    phi = (d**2 * torch.log(d.clamp_min(1e-300))) if dim == 2 else d
    n = len(zs); P = torch.cat([torch.ones(n, 1, dtype=zs.dtype), zs], 1)
    A = torch.zeros(n + dim + 1, n + dim + 1, dtype=zs.dtype)
    A[:n, :n] = phi + lam * torch.eye(n, dtype=zs.dtype); A[:n, n:] = P; A[n:, :n] = P.T
    rhs = torch.cat([R, torch.zeros(dim + 1, R.shape[1], dtype=R.dtype)])
    sol = torch.linalg.solve(A, rhs)
    W, V = sol[:n], sol[n:]
    def f(z):
        zz = z.double() / w
        d = torch.cdist(zz, zs)
        phi = (d**2 * torch.log(d.clamp_min(1e-300))) if dim == 2 else d
        return phi @ W + torch.cat([torch.ones(len(zz), 1, dtype=zz.dtype), zz], 1) @ V
    return f
tri = Delaunay(Zf)
def lin(z):
    zn = z.detach().cpu().numpy()
    s = tri.find_simplex(zn)
    T = tri.transform[s]; bary = np.einsum("nij,nj->ni", T[:, :dim], zn - T[:, dim]); bary = np.c_[bary, 1 - bary.sum(1)]
    out = (torch.as_tensor(bary)[:, :, None] * R[tri.simplices[s]]).sum(1)
    out[torch.as_tensor(s < 0)] = 0
    return out
def gauss(lam):
    K = torch.exp(-0.5 * torch.cdist(zf, zf).square() / w**2)
    Wg = torch.linalg.solve(K + lam * torch.eye(len(K), dtype=K.dtype), R)
    return lambda z: torch.exp(-0.5 * torch.cdist(z.double(), zf).square() / w**2) @ Wg
variants = {"gauss-1e-6 (current)": None, "net only": lambda z: 0, "gauss-1e-10": gauss(1e-10),
            "tps": tps_fit(0.0), "delaunay-linear": lin}
for name, f in variants.items():
    if f is None:
        r._decode_norm = base_decode
    else:
        r._decode_norm = (lambda f: lambda n_, z: n_.decode(z) + f(z))(f)
    s = sc.score_reducer(r)
    fitted = ((r.decode_coords(Zf) - r.fit_coords_ * r.unit_) ** 2).sum(1).mean() / r.basis.n_params
    print(f"{name:22s} ho mse_raw {s['mse_raw']:.2e} std {s['mse_std']:.2e} gap mean {s['loss_gap_mean']:.3f} med {s['loss_gap_median']:.3f} max {s['loss_gap_max']:.2f} | fitted std {fitted:.1e}", flush=True)
