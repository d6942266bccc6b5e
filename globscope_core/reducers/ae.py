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
  * a final exact least-squares (tiny ridge) refit of the decoder's last layer on the training
    latent points, which takes the reconstruction from "good" to float precision.
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

DEFAULTS = {"width": 256, "depth": 2, "epochs": 3000, "lr": 2e-3, "seed": 0, "device": "auto",
            "distance_weight": 0.05, "ridge": 1e-9, "refit_last_layer": True}


def _mlp(n_in, width, depth, n_out):
    layers, d = [], n_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.SiLU()]
        d = width
    last = nn.Linear(d, n_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class _AE(nn.Module):
    def __init__(self, k, dim, width, depth):
        super().__init__()
        self.k, self.dim = k, dim
        self.enc = _mlp(k, width, depth, dim)
        self.dec = _mlp(dim, width, depth, k)

    def encode(self, c):  # c: normalized basis coordinates [n, k]
        return c[:, : self.dim] + self.enc(c)

    def decode(self, z):
        return nn.functional.pad(z, (0, self.k - self.dim)) + self.dec(z)

    def hidden(self, z):  # decoder features feeding its last layer
        return self.dec[:-1](z)


@register_reducer("ae")
class AutoencoderReducer(SpanReducer):
    min_checkpoints = 4

    def __init__(self, dim=2, **config):
        unknown = set(config) - set(DEFAULTS) - {"block_rows"}
        if unknown:
            raise GlobScopeError(f"ae: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
        super().__init__(dim, **{**DEFAULTS, **config})

    def _build(self, k):
        cfg = self.config
        # the basis may have fewer than dim directions (tiny studies): pad the coordinates
        self.k_ = k
        self.net = _AE(max(k, self.dim), self.dim, int(cfg["width"]), int(cfg["depth"])).double()

    def _pad(self, C):
        return np.pad(C, ((0, 0), (0, max(0, self.dim - C.shape[1]))))

    def _fit_coords(self, C, progress=False):
        from ..evaluation import resolve_device

        cfg = self.config
        torch.manual_seed(int(cfg["seed"]))
        self._build(C.shape[1])
        self.unit_ = float(C[:, 0].std()) or 1.0
        device = resolve_device(cfg["device"])
        net = self.net.to(device)
        c = torch.as_tensor(self._pad(C) / self.unit_, dtype=torch.float64, device=device)
        dc = torch.pdist(c)
        dc = dc / dc.mean()
        epochs, lam = int(cfg["epochs"]), float(cfg["distance_weight"])
        opt = torch.optim.Adam(net.parameters(), lr=float(cfg["lr"]))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(cfg["lr"]), total_steps=max(1, epochs),
                                                    pct_start=0.1)
        history = []
        for ep in tqdm(range(epochs), desc=f"fit ae-{self.dim}d", disable=not progress, mininterval=1.0):
            z = net.encode(c)
            rec = (net.decode(z) - c).square().sum(1).mean()
            loss = rec
            if lam > 0:
                dz = torch.pdist(z)
                loss = loss + lam * (dz / dz.mean() - dc).square().mean() * c.square().sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if not math.isfinite(loss.item()):
                raise GlobScopeError("ae: training diverged (non-finite loss); lower --lr")
            if ep % max(1, epochs // 20) == 0 or ep == epochs - 1:
                history.append([ep, rec.item() * self.unit_**2 / self.basis.n_params])
        with torch.no_grad():
            z = net.encode(c)
            if cfg["refit_last_layer"]:
                self._refit_last(z, c, float(cfg["ridge"]))
            rec = (net.decode(z) - c).square().sum(1).mean().item()
        self.net = net.cpu()
        self.fit_info = {"device": str(device), "epochs": epochs, "history_mse_std": history,
                         "train_mse_std": rec * self.unit_**2 / self.basis.n_params}

    def _refit_last(self, z, c, ridge):
        """Exact least squares for the decoder's last layer: interpolates the training points."""
        H = self.net.hidden(z)
        H = torch.cat([H, torch.ones_like(H[:, :1])], 1)
        R = c - nn.functional.pad(z, (0, self.net.k - self.dim))
        A = H.T @ H
        A = A + ridge * A.diagonal().mean() * torch.eye(len(A), dtype=A.dtype, device=A.device)
        Wb = torch.linalg.solve(A, H.T @ R)
        last = self.net.dec[-1]
        last.weight.copy_(Wb[:-1].T)
        last.bias.copy_(Wb[-1])

    def _encode(self, C):
        with torch.no_grad():
            c = torch.as_tensor(self._pad(np.asarray(C, dtype=np.float64)) / self.unit_)
            return self.net.encode(c).numpy()

    def _decode_torch(self, z):
        net = self._net_on(z.device)  # frozen copy: gradients flow to z only when z asks for them
        return (net.decode(z.to(torch.float64)) * self.unit_)[:, : self.k_].to(torch.float32)

    def _net_on(self, device):
        cache = self.__dict__.setdefault("_nets", {})
        if str(device) not in cache:
            import copy

            cache[str(device)] = copy.deepcopy(self.net).to(device).eval().requires_grad_(False)
        return cache[str(device)]

    def _state(self):
        return {**{f"ae.{k}": v for k, v in self.net.state_dict().items()},
                "ae_scalars": torch.tensor([self.unit_, float(self.k_)], dtype=torch.float64)}

    def _load_state(self, s):
        unit, k = s["ae_scalars"].tolist()
        self.unit_ = unit
        self._build(int(k))
        self.net.load_state_dict({key[3:]: v for key, v in s.items() if key.startswith("ae.")})
        self.net.eval()
