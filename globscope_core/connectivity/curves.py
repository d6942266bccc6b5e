"""A curve between two trained minima (Garipov et al., NeurIPS 2018): its shape, its training, its evaluation.

A curve phi(t), t in [0, 1], lives in the full flat parameter space of a model. Its ends are fixed; its free bends are
initialised on the straight line between them and trained by sampling one t ~ U[0, 1] per step and descending the
training loss at phi(t) (so the whole curve is pushed into low loss, in expectation over t).

  bezier     degree k+1 Bezier curve with control points A, b_1..b_k, B (k=1: the paper's quadratic)
  polychain  piecewise linear path A - b_1 - ... - b_k - B with evenly spaced knots (k=1: the paper's)

The barrier of a path is that of Entezari et al.: max_t loss(t) - ((1-t) loss(0) + t loss(1)).
``stages/connect.py`` runs it on a study; ``stages/connect_views.py`` draws it.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import GlobScopeError
from ..evaluation.paths import barrier, evaluate_rows
from ..networks.batchnorm import recompute_bn
from ..networks.losses import cross_entropy
from ..storage.safe_write import remove_file, save_torch

CURVES = ("bezier", "polychain")


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


# --- training -----------------------------------------------------------------------------------
def train_curve(model, layout, wa, wb, kind, bends, ds, epochs, lr, optimizer="sgd", batch_size=64,
                weight_decay=0.0, seed=0, device=None, partial_path=None, progress=True, config_key=""):
    """Train the free bends; returns the control points [bends+2, P] (float32, A first, B last)."""
    from torch.func import functional_call

    from ..networks.optimizers import divergence_hint, make_optimizer

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
            loss = cross_entropy(functional_call(model, state, (xb,)), yb)
            if not torch.isfinite(loss):
                bar.close()
                remove_file(partial_path)  # resuming would only diverge again
                raise GlobScopeError(f"curve training diverged: loss {loss.item()} at epoch {epoch + 1}, t={t:.3f}; "
                                     f"{divergence_hint(optimizer, lr, weight_decay)}. Nothing was stored.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            bar.update(1)
        if not torch.isfinite(free).all():
            bar.close()
            remove_file(partial_path)
            raise GlobScopeError(f"curve training diverged: bends not finite after epoch {epoch + 1}; "
                                 f"{divergence_hint(optimizer, lr, weight_decay)}. Nothing was stored.")
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / n:.4f}")
        if partial_path:
            save_torch({"config": config_key, "epoch": epoch + 1, "free": free.detach().cpu(),
                        "optimizer": opt.state_dict()}, partial_path)
    bar.close()
    return torch.cat([wa_t[None], free.detach(), wb_t[None]]).cpu().numpy()


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
