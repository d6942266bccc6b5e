"""The autoencoder reducer: checkpoints -> 2D/3D latent -> full weights, with very low error.

It works on the span-basis coordinates C [N, k] (basis.py), divided by the spread of the first
principal component, so the network is small whatever the model size P. Tricks that make the
decoded models work:
  * residual on PCA: the encoder outputs PCA coordinates + a learned correction, the decoder outputs
    the PCA reconstruction + a learned correction (both corrections start at zero), so training
    starts from PCA's latent layout and only has to learn what PCA misses;
  * a distance-keeping term (pairwise latent distances vs. input distances, weight
    ``distance_weight``) keeps runs that are far apart in weight space apart in the latent space;
  * full-batch Adam with a one-cycle learning-rate schedule, in float64 (the target is ~1e-6 of
    the variance);
  * a final exact interpolation of the residual the network leaves at the training latent points, so
    every checkpoint decodes to itself up to float precision. Default (``residual="polyharmonic"``):
    the polyharmonic spline phi(r) = r with a linear tail. In 1D it is exactly the piecewise-linear
    interpolant, so along a trajectory a point between two checkpoints decodes to about their mean
    (the two-neighbour floor of held-out fidelity, reducers/holdout.py), and beyond the data it grows
    only linearly. The earlier Gaussian kernel (``residual="gaussian"``, ridge ``kernel_ridge``)
    decays to the network between checkpoints: held-out loss gap on the demo study 35% mean / 712%
    worst against 9.4% / 39% with the spline (bench/bench_holdout.py).
The loss is the mean squared error in standardized parameter space (the basis is orthonormal).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import GlobScopeError
from .base import SpanReducer, register_reducer

DEFAULTS = {"width": "auto", "depth": 2, "epochs": 1500, "lr": 2e-3, "seed": 0, "device": "auto",
            "distance_weight": 0.05, "ridge": 1e-9, "refit_last_layer": False,
            "residual_kernel": True, "residual": "polyharmonic", "kernel_ridge": 1e-6}
RESIDUALS = ("polyharmonic", "gaussian")


def auto_width(n_fit: int, depth: int) -> int:
    """The "auto" width: enough readout features (width * depth) to interpolate every checkpoint."""
    return max(128, -(-(n_fit + 8) // int(depth)))


def network_bytes(k: int, dim: int, width: int, depth: int) -> int:
    """Memory of the autoencoder on k basis coordinates (_mlp and _Decoder below): float32 weights, gradients
    and Adam's two moments while it trains, then the float64 copy it is refitted and saved in."""
    hidden = (depth - 1) * (width * width + width)
    n = (k * width + width + hidden + width * dim + dim) + (dim * width + width + hidden + width * depth * k + k)
    return n * (4 * 4 + 8)


def _mlp(n_in, width, depth, n_out):
    layers, d = [], n_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.SiLU()]
        d = width
    last = nn.Linear(d, n_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class _Decoder(nn.Module):
    """MLP whose linear readout sees every hidden layer (width * depth features): with at least as
    many features as checkpoints, the exact refit of the readout can interpolate all of them."""

    def __init__(self, dim, width, depth, k):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim if i == 0 else width, width) for i in range(depth))
        self.out = nn.Linear(width * depth, k)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def hidden(self, z):
        hs, h = [], z
        for layer in self.layers:
            h = nn.functional.silu(layer(h))
            hs.append(h)
        return torch.cat(hs, 1)

    def forward(self, z):
        return self.out(self.hidden(z))


class _AE(nn.Module):
    def __init__(self, k, dim, width, depth):
        super().__init__()
        self.k, self.dim = k, dim
        self.enc = _mlp(k, width, depth, dim)
        self.dec = _Decoder(dim, width, depth, k)

    def encode(self, c):  # c: normalized basis coordinates [n, k]
        return c[:, : self.dim] + self.enc(c)

    def decode(self, z):
        return nn.functional.pad(z, (0, self.k - self.dim)) + self.dec(z)

    def hidden(self, z):  # decoder features feeding its readout
        return self.dec.hidden(z)


def _pdist(x, iu):
    d2 = (x * x).sum(1)
    d2 = d2[:, None] + d2[None, :] - 2.0 * x @ x.T
    return d2[iu[0], iu[1]].clamp_min(1e-12).sqrt()


@register_reducer("ae")
class AutoencoderReducer(SpanReducer):
    min_checkpoints = 4

    def __init__(self, dim=2, **config):
        unknown = set(config) - set(DEFAULTS) - {"block_rows", "max_rank", "basis"}
        if unknown:
            raise GlobScopeError(f"ae: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
        super().__init__(dim, **{**DEFAULTS, **config})
        if self.config["residual"] not in RESIDUALS:
            raise GlobScopeError(f"ae: residual '{self.config['residual']}' unknown; choose {', '.join(RESIDUALS)}")

    def _build(self, k):
        cfg = self.config
        # the basis may have fewer than dim directions (tiny studies): pad the coordinates
        self.k_ = k
        width = cfg["width"] if cfg["width"] != "auto" else auto_width(self.n_fit_, cfg["depth"])
        self.width_ = int(width)
        self.net = _AE(max(k, self.dim), self.dim, self.width_, int(cfg["depth"]))

    def _pad(self, C):
        return np.pad(C, ((0, 0), (0, max(0, self.dim - C.shape[1]))))

    def _fit_coords(self, C, progress=False):
        from ..networks.device import resolve_device

        cfg = self.config
        torch.manual_seed(int(cfg["seed"]))
        self.n_fit_ = len(C)
        self._build(C.shape[1])
        self.unit_ = float(C[:, 0].std()) or 1.0
        device = resolve_device(cfg["device"])
        net = self.net.to(device)
        # Adam phase in float32 (fast); the final refit and decoding in float64 (precise)
        c64 = torch.as_tensor(self._pad(C) / self.unit_, dtype=torch.float64, device=device)
        c = c64.float()
        iu = torch.triu_indices(len(c), len(c), 1, device=device)
        dc = _pdist(c, iu)
        dc = dc / dc.mean()
        epochs, lam = int(cfg["epochs"]), float(cfg["distance_weight"])
        opt = torch.optim.Adam(net.parameters(), lr=float(cfg["lr"]))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(cfg["lr"]), total_steps=max(1, epochs),
                                                    pct_start=0.1)
        history = []
        # the matrices are small: on a busy CPU, torch's thread pool costs far more than it saves
        threads = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(1)
        try:
            self._train(net, c, dc, iu, opt, sched, epochs, lam, history, progress)
        finally:
            torch.set_num_threads(threads)
        with torch.no_grad():
            net.double()
            c = c64
            z = net.encode(c)
            if cfg["refit_last_layer"]:
                self._refit_last(z, c, float(cfg["ridge"]))
            if cfg["residual_kernel"]:
                self._fit_residual_kernel(z, c - net.decode(z))
            rec = (self._decode_norm(net, z) - c).square().sum(1).mean().item()
        self.net = net.cpu()
        self._set_snap(c.cpu().numpy())
        self.fit_info = {"device": str(device), "epochs": epochs, "history_mse_std": history,
                         "train_mse_std": rec * self.unit_**2 / self.basis.n_params}

    def _train(self, net, c, dc, iu, opt, sched, epochs, lam, history, progress):
        for ep in tqdm(range(epochs), desc=f"fit ae-{self.dim}d", disable=not progress, mininterval=1.0):
            z = net.encode(c)
            rec = (net.decode(z) - c).square().sum(1).mean()
            loss = rec
            if lam > 0:
                dz = _pdist(z, iu)  # (torch.pdist's backward is very slow on CPU)
                loss = loss + lam * (dz / dz.mean() - dc).square().mean() * c.square().sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if not math.isfinite(loss.item()):
                raise GlobScopeError("ae: training diverged (non-finite loss); lower --lr")
            if ep % max(1, epochs // 20) == 0 or ep == epochs - 1:
                history.append([ep, rec.item() * self.unit_**2 / self.basis.n_params])

    def _fit_residual_kernel(self, z, R):
        """Exact interpolation of what the network still misses at the training latents.

        Length unit: the median distance from a checkpoint's latent point to its nearest neighbour (the
        Gaussian's width; for the spline only a conditioning scale, its interpolant does not depend on it)."""
        d = torch.cdist(z, z)
        d.fill_diagonal_(float("inf"))
        self.kernel_width_ = float(d.min(1).values.median().clamp_min(1e-12))
        self.kernel_z_ = z.detach().cpu()
        self.fit_z_ = self.kernel_z_.numpy()
        self.residual_ = self.config["residual"]
        Phi = self._kernel(z, z)
        if self.residual_ == "gaussian":
            Phi = Phi + float(self.config["kernel_ridge"]) * torch.eye(len(Phi), dtype=Phi.dtype, device=Phi.device)
            self.kernel_w_ = torch.linalg.solve(Phi, R).detach().cpu()
            self.kernel_tail_ = None
            return
        # phi(r) = r is conditionally positive definite of order 1: with the linear tail and the side
        # conditions P^T w = 0 the system is non-singular for distinct points
        n, P = len(z), self._tail(z)
        A = torch.zeros(n + P.shape[1], n + P.shape[1], dtype=z.dtype, device=z.device)
        A[:n, :n], A[:n, n:], A[n:, :n] = Phi, P, P.T
        rhs = torch.cat([R, R.new_zeros(P.shape[1], R.shape[1])])
        try:
            sol = torch.linalg.solve(A, rhs)
        except RuntimeError:  # coincident latent points (duplicate checkpoints): least squares
            sol = torch.linalg.lstsq(A.cpu(), rhs.cpu(), driver="gelsd").solution.to(z.device)
        self.kernel_w_, self.kernel_tail_ = sol[:n].detach().cpu(), sol[n:].detach().cpu()

    def _tail(self, z):
        return torch.cat([torch.ones_like(z[:, :1]), z / self.kernel_width_], 1)

    def _set_snap(self, c):
        self.fit_coords_ = c
        self.fit_z_ = self.net.encode(torch.as_tensor(c)).detach().numpy() if not hasattr(self, "fit_z_") else self.fit_z_
        d = np.sqrt(np.maximum((c**2).sum(1)[:, None] + (c**2).sum(1)[None] - 2 * c @ c.T, 0))
        np.fill_diagonal(d, np.inf)
        self.snap_scale_ = float(np.median(d.min(1)))

    def _kernel(self, z, zf):
        if getattr(self, "residual_", "gaussian") == "gaussian":
            return torch.exp(-0.5 * torch.cdist(z, zf).square() / self.kernel_width_**2)
        return torch.cdist(z, zf) / self.kernel_width_

    def _decode_norm(self, net, z):
        out = net.decode(z)
        if getattr(self, "kernel_w_", None) is not None:
            zf, w = self.kernel_z_.to(z.device), self.kernel_w_.to(z.device)
            out = out + self._kernel(z, zf) @ w
            if getattr(self, "kernel_tail_", None) is not None:
                out = out + self._tail(z) @ self.kernel_tail_.to(z.device)
        return out

    def _refit_last(self, z, c, ridge):
        """Exact least squares for the decoder's last layer: interpolates the training points."""
        H = self.net.hidden(z)
        H = torch.cat([H, torch.ones_like(H[:, :1])], 1)
        R = c - nn.functional.pad(z, (0, self.net.k - self.dim))
        A = H.T @ H
        A = A + ridge * A.diagonal().mean() * torch.eye(len(A), dtype=A.dtype, device=A.device)
        Wb = torch.linalg.solve(A, H.T @ R)
        last = self.net.dec.out
        last.weight.copy_(Wb[:-1].T)
        last.bias.copy_(Wb[-1])

    def _encode(self, C):
        with torch.no_grad():
            c = torch.as_tensor(self._pad(np.asarray(C, dtype=np.float64)) / self.unit_)
            Z = self.net.encode(c).numpy()
        if getattr(self, "fit_coords_", None) is not None:
            # a fitted checkpoint (up to float32 rounding of its coordinates) maps to its own latent
            # point: the decoder interpolates exactly there, and is steep between close checkpoints
            F = self.fit_coords_
            d2 = np.maximum((c.numpy() ** 2).sum(1)[:, None] + (F**2).sum(1)[None] - 2 * c.numpy() @ F.T, 0)
            j = d2.argmin(1)
            hit = d2[np.arange(len(j)), j] <= (1e-2 * self.snap_scale_) ** 2
            Z[hit] = self.fit_z_[j[hit]]
        return Z

    def _decode_torch(self, z):
        net = self._net_on(z.device)  # frozen copy: gradients flow to z only when z asks for them
        return (self._decode_norm(net, z.to(torch.float64)) * self.unit_)[:, : self.k_].to(torch.float32)

    def _net_on(self, device):
        cache = self.__dict__.setdefault("_nets", {})
        if str(device) not in cache:
            import copy

            cache[str(device)] = copy.deepcopy(self.net).to(device).eval().requires_grad_(False)
        return cache[str(device)]

    def _state(self):
        extra = {}
        if getattr(self, "kernel_w_", None) is not None:
            extra = {"ae_kernel_z": self.kernel_z_, "ae_kernel_w": self.kernel_w_,
                     "ae_kernel_width": torch.tensor(self.kernel_width_, dtype=torch.float64)}
            if self.kernel_tail_ is not None:  # polyharmonic spline (absent: Gaussian, older files too)
                extra["ae_kernel_tail"] = self.kernel_tail_
        extra["ae_fit_coords"] = torch.as_tensor(self.fit_coords_)
        extra["ae_fit_z"] = torch.as_tensor(self.fit_z_)
        return {**extra, **{f"ae.{k}": v for k, v in self.net.state_dict().items()},
                "ae_scalars": torch.tensor([self.unit_, float(self.k_), float(self.n_fit_)], dtype=torch.float64)}

    def _load_state(self, s):
        unit, k, n_fit = s["ae_scalars"].tolist()
        self.unit_, self.n_fit_ = unit, int(n_fit)
        self._build(int(k))
        self.net.double()
        self.net.load_state_dict({key[3:]: v for key, v in s.items() if key.startswith("ae.")})
        self.net.eval()
        self.fit_z_ = s["ae_fit_z"].numpy()
        self._set_snap(s["ae_fit_coords"].numpy())
        if "ae_kernel_w" in s:
            self.kernel_z_, self.kernel_w_ = s["ae_kernel_z"], s["ae_kernel_w"]
            self.kernel_width_ = float(s["ae_kernel_width"])
            self.kernel_tail_ = s.get("ae_kernel_tail")
            self.residual_ = "gaussian" if self.kernel_tail_ is None else "polyharmonic"
