"""Many models per forward pass: loss and accuracy of a batch of flat parameter vectors.

Two paths, same numbers (tests check both against the one-model ``evaluate_model``):
  * MLP fast path (the registry's ``mlp`` / ``mnist-mlp``): the first layer's input is shared by every
    model, so it is one GEMM ``x @ concat(W_1..W_B)^T``; later layers are batched products (``baddbmm``).
  * General path, any registered or user model: ``torch.func.functional_call`` under ``vmap`` with the
    decoded state (parameters and floating buffers, so BatchNorm uses the decoded running statistics
    in eval mode).

API for other stages (landscape grids, interpolation paths):
  ``evaluate_flat(study_or_model_spec, params [B, P], x, y, device="auto") -> (loss [B], acc [B])``
  ``BatchedEvaluator(model_spec, x, y, device)`` when the same data is used many times (keeps x, y on
  the device); ``.evaluate(params)`` returns float64 numpy arrays. Non-finite losses come back as NaN.
  ``eval_data(study, split, eval_samples, seed)`` gives the fixed evaluation subset of a study.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .errors import GlobScopeError
from .evaluation import resolve_device, subset
from .flat import StateLayout
from .models import MLP, build_model

# activations kept alive at once per forward (bytes); sample batches are sized to fit it
ACTIVATION_BUDGET = 256 << 20
# CPU fast path: one layer's activations of a (models x samples) tile, sized to stay in the L2/L3
# cache. Streaming whole-batch activations through memory reached 0.28 of the GEMM rate, tiles 0.59
# (bench/bench_landscape.py, whole digits train set).
CPU_TILE_BYTES = 2 << 20
CPU_TILE_SAMPLES = 256


def eval_data(study, split: str = "test", eval_samples: int | None = None, seed: int = 0):
    """The fixed evaluation subset ``(x, y)`` of a study's data set (all samples when ``eval_samples`` is None)."""
    from .data import load_dataset

    x, y = load_dataset(study.dataset_spec).split(split)
    return subset(x, y, eval_samples, seed=seed)


def _mlp_layers(model: nn.Module, layout: StateLayout):
    """[(weight entry, bias entry), ...] when ``model`` is a plain Linear/ReLU MLP, else None."""
    if not isinstance(model, MLP):
        return None
    mods = list(model.net)
    if not all(isinstance(m, (nn.Linear, nn.ReLU)) for m in mods) or not isinstance(mods[-1], nn.Linear):
        return None
    entries = {e.name: e for e in layout.entries}
    layers = []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear):
            w, b = entries.get(f"net.{i}.weight"), entries.get(f"net.{i}.bias")
            if w is None or b is None:
                return None
            layers.append((w, b))
    if len(layers) * 2 != len(layout.entries):
        return None
    # ReLU between every pair of Linear layers, nothing else
    kinds = ["L" if isinstance(m, nn.Linear) else "R" for m in mods]
    if "".join(kinds) != "LR" * (len(layers) - 1) + "L":
        return None
    return layers


class BatchedEvaluator:
    """Evaluate batches of flat parameter vectors of one architecture on fixed data ``(x, y)``."""

    def __init__(self, model_spec: dict, x: torch.Tensor, y: torch.Tensor, device="auto", fast: bool = True,
                 layout: StateLayout | None = None):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model = build_model(model_spec).to(self.device).eval()
        self.layout = layout or StateLayout.from_module(self.model)
        if StateLayout.from_module(self.model) != self.layout:
            raise GlobScopeError(f"model '{model_spec.get('name')}': layout does not match the parameter vectors")
        self.x = x.to(self.device, torch.float32)
        self.y = y.to(self.device, torch.long)
        if len(self.x) == 0:
            raise GlobScopeError("evaluation set is empty")
        self.layers = _mlp_layers(self.model, self.layout) if fast else None
        self.fast = self.layers is not None
        # fast path input, flat and transposed once: [features, samples]
        self.xt = self.x.reshape(len(self.x), -1).t().contiguous() if self.fast else None

    @property
    def flops_per_model(self) -> float:
        """Forward multiply-add FLOPs (2 per MAC) of one model on the whole evaluation set (MLP path)."""
        if not self.fast:
            return float("nan")
        return 2.0 * len(self.x) * sum(w.numel for w, _ in self.layers)

    def _tiles(self, n_models: int) -> tuple[int, int]:
        """(models per group, samples per block) of one forward pass.

        GPU, or the general path: every model at once, samples as many as ACTIVATION_BUDGET allows.
        CPU fast path: small tiles whose activations stay in cache, so each layer is one GEMM-bound
        kernel call rather than a pass over memory.
        """
        width = max(max(w.shape) for w, _ in self.layers) if self.fast else 1024
        if self.fast and self.device.type == "cpu":
            samples = min(len(self.x), CPU_TILE_SAMPLES)
            return max(1, min(n_models, CPU_TILE_BYTES // (4 * width * samples))), samples
        per_sample = 3 * 4 * n_models * width
        return n_models, int(max(1, min(len(self.x), ACTIVATION_BUDGET // per_sample)))

    @torch.no_grad()
    def evaluate(self, params) -> tuple[np.ndarray, np.ndarray]:
        """Mean cross-entropy and accuracy of every row of ``params`` [B, P]; non-finite losses as NaN."""
        params = torch.as_tensor(params)
        if params.ndim != 2 or params.shape[1] != self.layout.size:
            raise GlobScopeError(f"parameter batch has shape {tuple(params.shape)}, model expects (B, {self.layout.size})")
        params = params.to(self.device, torch.float32)
        n_models = params.shape[0]
        if n_models == 0:
            return np.zeros(0), np.zeros(0)
        loss_sum = torch.zeros(n_models, dtype=torch.float64, device=self.device)
        correct = torch.zeros(n_models, dtype=torch.float64, device=self.device)
        group, bs = self._tiles(n_models)
        for g in range(0, n_models, group):
            rows = params[g : g + group].contiguous()
            if self.fast:
                weights = self._mlp_weights(rows)
                forward = lambda s, e: self._forward_mlp(weights, self.xt[:, s:e])  # noqa: E731
            else:
                state = {e.name: v.to(getattr(torch, e.dtype)) for e, v in
                         zip(self.layout.entries, self.layout.unflatten_batch(rows).values())}
                for name in state:
                    # a decoded grid point can have a slightly negative BatchNorm variance, which
                    # would make every output NaN; a variance is >= 0 by definition
                    if name.endswith("running_var"):
                        state[name] = state[name].clamp(min=0)
                forward = lambda s, e: self._forward_general(state, self.x[s:e])  # noqa: E731
            for s in range(0, len(self.x), bs):
                yb = self.y[s : s + bs]
                logits = forward(s, s + bs)  # [group, samples, classes]
                picked = logits.gather(2, yb.view(1, -1, 1).expand(len(rows), -1, 1)).squeeze(2)
                loss_sum[g : g + group] += (torch.logsumexp(logits, 2) - picked).sum(1, dtype=torch.float64)
                correct[g : g + group] += (logits.argmax(2) == yb).sum(1, dtype=torch.float64)
        n = len(self.x)
        loss = (loss_sum / n).cpu().numpy()
        acc = (correct / n).cpu().numpy()
        bad = ~np.isfinite(loss)
        loss[bad] = np.nan
        acc[bad] = np.nan
        return loss, acc

    def _mlp_weights(self, params: torch.Tensor) -> list:
        """Per-layer (W [B, out, in], b [B, out, 1]) views of the batch; layer 0 stacked as [B*out, in]."""
        B = params.shape[0]
        out = [(params[:, w.offset : w.offset + w.numel].view(B, *w.shape),
                params[:, b.offset : b.offset + b.numel].view(B, -1, 1)) for w, b in self.layers]
        W0, b0 = out[0]
        out[0] = (W0.reshape(B * W0.shape[1], W0.shape[2]), b0)  # one copy per batch, not per sample block
        return out

    def _forward_mlp(self, weights: list, xt: torch.Tensor) -> torch.Tensor:
        # Activations are kept transposed, [B, features, samples]: every product then reads the
        # stored weights as they are and writes a contiguous result, so bias and ReLU run in place.
        n = xt.shape[1]
        (W0, b0), rest = weights[0], weights[1:]
        B = b0.shape[0]
        # shared input: one GEMM for all models, [B*out0, in] @ [in, n]
        h = torch.mm(W0, xt).view(B, -1, n)
        h.add_(b0)
        if not rest:  # a single linear layer
            return h.transpose(1, 2)
        for W, b in rest[:-1]:
            h.relu_()
            h = torch.bmm(W, h)
            h.add_(b)
        h.relu_()
        W, b = rest[-1]
        # last layer as [B, classes, n] = W @ h (few output rows: fast; the transposed form
        # h^T @ W^T, few output columns, ran 14x slower on CPU), then turned to [B, n, classes]
        # so that the loss reduces over contiguous rows
        return torch.baddbmm(b, W, h).transpose(1, 2).contiguous()

    def _forward_general(self, state: dict, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, vmap

        def one(st, xb):
            return functional_call(self.model, st, (xb,), strict=False)

        return vmap(one, in_dims=(0, None))(state, x)  # [B, n, classes]


def evaluate_flat(study_or_model_spec, params, x, y, device="auto", fast: bool = True,
                  max_models: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy (float64 numpy [B]) of each flat parameter vector in ``params`` [B, P].

    ``study_or_model_spec``: a Study or a model spec dict. Rows are evaluated ``max_models`` at a time.
    """
    spec = getattr(study_or_model_spec, "model_spec", study_or_model_spec)
    layout = getattr(study_or_model_spec, "layout", None)
    ev = BatchedEvaluator(spec, x, y, device=device, fast=fast, layout=layout)
    params = torch.as_tensor(params)
    out_l, out_a = [], []
    for s in range(0, params.shape[0], max_models):
        l, a = ev.evaluate(params[s : s + max_models])
        out_l.append(l)
        out_a.append(a)
    if not out_l:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(out_l), np.concatenate(out_a)
