"""Many models per forward pass: loss and accuracy of a batch of flat parameter vectors.

Three paths, same numbers (tests check each against the one-model ``evaluate_model``):
  * ``mlp`` (the registry's ``mlp`` / ``mnist-mlp``): the first layer's input is shared by every
    model, so it is one GEMM ``x @ concat(W_1..W_B)^T``; later layers are batched products (``baddbmm``).
  * ``per-model`` (any other model on the CPU, or with ``compile``): one prepared copy of the model
    (channels-last when it has convolutions) takes each decoded state in turn and sees all samples in
    large blocks. A CNN's forward on 64 CIFAR images is already a large convolution, so on the CPU
    this runs at 0.54-0.78 of the GEMM rate at 64 samples, where batching models under vmap ran at
    0.38-0.48x of a plain model-by-model loop (bench/bench_landscape.py --zoo). ``compile``: the forward
    through torch.compile (fused BatchNorm and ReLU epilogues: another 1.1-1.4x for CNNs; 8-20 s of
    compilation once per process, so it pays for a landscape, not for a handful of points).
  * ``vmap`` (GPU default): ``torch.func.functional_call`` under ``vmap``, every model of a chunk in
    one pass, so a GPU gets enough work from small sample blocks.
All paths use the decoded state (parameters and floating buffers), so BatchNorm uses the decoded running
statistics in eval mode; with ``bn_x`` (a fixed training subset, networks/batchnorm.py ``bn_subset``) every
model's statistics are first recomputed on it (``BatchNormReset``: one model at a time, in train mode), whatever
the path. A model without BatchNorm ignores ``bn_x``: same numbers, no extra work.

``precision``: ``fp32`` (default); ``bf16`` (autocast; AMX/AVX-512-BF16 CPUs and GPUs), ``tf32`` (CUDA
matmuls and convolutions in TensorFloat-32). The loss itself is reduced in float32/float64.

API for other stages (landscape grids, interpolation paths):
  ``evaluate_flat(study_or_model_spec, params [B, P], x, y, device="auto") -> (loss [B], acc [B])``
  ``BatchedEvaluator(model_spec, x, y, device)`` when the same data is used many times (keeps x, y on
  the device); ``.evaluate(params)`` returns float64 numpy arrays. Non-finite losses come back as NaN.
  ``eval_data(study, split, eval_samples, seed)`` gives the fixed evaluation subset of a study.
"""
from __future__ import annotations

import contextlib
import copy
import time

import numpy as np
import torch
from torch import nn

from ..errors import GlobScopeError
from ..networks.batchnorm import BN_SEED, BatchNormReset
from ..networks.device import resolve_device
from ..networks.models import build_model, is_mlp, mlp_forward, mlp_linear_layers
from ..storage.state_layout import StateLayout
from .one_model import subset

PATHS = ("mlp", "per-model", "vmap")
PRECISIONS = ("fp32", "tf32", "bf16")
# activations kept alive at once per forward (bytes); sample blocks are sized to fit it
ACTIVATION_BUDGET = 256 << 20
# CPU fast path: one layer's activations of a (models x samples) tile, sized to stay in the L2/L3
# cache. Streaming whole-batch activations through memory reached 0.28 of the GEMM rate, tiles 0.59
# (bench/bench_landscape.py, whole digits train set).
CPU_TILE_BYTES = 2 << 20
CPU_TILE_SAMPLES = 256


def eval_data(study, split: str = "test", eval_samples: int | None = None, seed: int = 0):
    """The fixed evaluation subset ``(x, y)`` of a study's data set (all samples when ``eval_samples`` is None)."""
    from ..networks.datasets import load_dataset

    x, y = load_dataset(study.dataset_spec).split(split)
    return subset(x, y, eval_samples, seed=seed)


def bn_data(study, samples: int | None, seed: int = BN_SEED) -> torch.Tensor:
    """The fixed training subset BatchNorm statistics are recomputed on (inputs only)."""
    from ..networks.batchnorm import bn_subset
    from ..networks.datasets import load_dataset

    return bn_subset(load_dataset(study.dataset_spec).split("train")[0], samples, seed)


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise GlobScopeError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    if precision == "tf32" and device.type != "cuda":
        raise GlobScopeError("--precision tf32 is a CUDA mode (TensorFloat-32); on the CPU use fp32 or bf16")


class BatchedEvaluator:
    """Evaluate batches of flat parameter vectors of one architecture on fixed data ``(x, y)``.

    ``path``: one of PATHS, or None for the best on the device (see the module docstring); ``fast=False``
    keeps an MLP off its fast path. ``precision``: one of PRECISIONS. ``compile``: torch.compile the
    per-model forward (compiled on the first call; ``compile_seconds`` says how long that took; ignored on
    the other paths, ``.compile`` says whether it applies). ``bn_x``: recompute every model's BatchNorm
    statistics on these inputs before evaluating it (``.bn_reset`` holds the cost; None without BatchNorm).
    """

    def __init__(self, model_spec: dict, x: torch.Tensor, y: torch.Tensor, device="auto", fast: bool = True,
                 layout: StateLayout | None = None, path: str | None = None, precision: str = "fp32",
                 compile: bool = False, bn_x: torch.Tensor | None = None):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        check_precision(precision, self.device)
        self.precision, self.compile, self.compile_seconds = precision, bool(compile), None
        self.model = build_model(model_spec).to(self.device).eval()
        self.layout = layout or StateLayout.from_module(self.model)
        if StateLayout.from_module(self.model) != self.layout:
            raise GlobScopeError(f"model '{model_spec.get('name')}': layout does not match the parameter vectors")
        # token ids (language models) stay integers
        self.x = x.to(self.device) if not x.is_floating_point() else x.to(self.device, torch.float32)
        self.y = y.to(self.device, torch.long)
        if len(self.x) == 0:
            raise GlobScopeError("evaluation set is empty")
        self.bn_reset = None
        if bn_x is not None:
            reset = BatchNormReset(self.model, self.layout, bn_x.to(self.device, self.x.dtype))
            self.bn_reset = reset if reset.layers else None  # without BatchNorm: nothing to do, no copy kept
        self.layers = mlp_linear_layers(self.layout) if fast and is_mlp(self.model) else None
        if path is None:
            # vmap has no batching rule for the transformer's fused inference kernel (it would loop
            # model by model anyway, with a warning), so transformers take the per-model path
            fused = any(isinstance(m, nn.TransformerEncoderLayer) or getattr(m, "per_model_only", False)
                        for m in self.model.modules())
            path = "mlp" if self.layers is not None else \
                ("per-model" if self.device.type == "cpu" or compile or fused else "vmap")
        if path not in PATHS or (path == "mlp" and self.layers is None):
            raise GlobScopeError(f"evaluation path '{path}' is not available for model '{model_spec.get('name')}'")
        self.path = path
        # compiling pays on the per-model path (fused BatchNorm/ReLU epilogues); the MLP path is a few
        # GEMMs already and ran 3x slower compiled model by model, so it stays as it is
        self.compile = self.compile and path == "per-model"
        self.fast = path == "mlp"
        # mlp path input, flat and transposed once: [features, samples]
        self.xt = self.x.reshape(len(self.x), -1).t().contiguous() if self.fast else None
        if path == "per-model":
            self._prepare_per_model()
        self._flops = None

    def _prepare_per_model(self):
        """One model copy that takes each decoded state in place; channels-last when it has 2D convolutions
        and the input is an image batch (oneDNN's fast layout on the CPU)."""
        # no gradients: autocast caches its low-precision copy of a leaf tensor that requires grad for as
        # long as the region lasts, and would reuse the first model's weights for every later one
        self.module = copy.deepcopy(self.model).requires_grad_(False)
        self.xm = self.x
        if self.x.ndim == 4 and any(isinstance(m, nn.Conv2d) for m in self.module.modules()):
            self.module = self.module.to(memory_format=torch.channels_last)
            self.xm = self.x.contiguous(memory_format=torch.channels_last)
        named = dict(self.module.named_parameters())
        named.update(self.module.named_buffers())
        self.slots = [(named[e.name], e) for e in self.layout.entries]
        self.per_sample_bytes = self._activation_bytes()
        if self.compile:
            from torch.func import functional_call

            def one(state, xb):
                return functional_call(self.model, state, (xb,), strict=False)

            self._compiled = torch.compile(one, dynamic=False)

    def _activation_bytes(self) -> int:
        """Bytes one sample keeps alive in a forward: three times the largest module output (measured)."""
        sizes = []
        hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel() if torch.is_tensor(o) else 0))
                 for m in self.module.modules()]
        try:
            with torch.no_grad():
                self.module(self.xm[:1])
        finally:
            for h in hooks:
                h.remove()
        return 3 * 4 * max(sizes + [1])

    @property
    def flops_per_model(self) -> float:
        """Forward FLOPs (2 per multiply-add) of one model on the whole evaluation set: the MLP's layers
        counted directly, any other model by torch.utils.flop_counter on one sample."""
        if self._flops is None:
            if self.fast:
                self._flops = 2.0 * len(self.x) * sum(w.numel for w, _ in self.layers)
            else:
                from torch.utils.flop_counter import FlopCounterMode

                # with autograd on: a transformer's fused inference kernel is invisible to the counter
                with torch.enable_grad(), FlopCounterMode(display=False) as fc:
                    self.model(self.x[:1])
                self._flops = float(fc.get_total_flops()) * len(self.x)
        return self._flops

    def _tiles(self, n_models: int) -> tuple[int, int]:
        """(models per group, samples per block) of one forward pass.

        mlp path on the CPU: small tiles whose activations stay in cache, so each layer is one GEMM-bound
        kernel call rather than a pass over memory. per-model: one model, as many samples as
        ACTIVATION_BUDGET allows (larger convolutions run closer to the GEMM rate). Otherwise every
        model at once, samples as many as ACTIVATION_BUDGET allows.
        """
        if self.path == "per-model":
            return 1, int(max(1, min(len(self.x), ACTIVATION_BUDGET // self.per_sample_bytes)))
        width = max(max(w.shape) for w, _ in self.layers) if self.fast else 1024
        if self.fast and self.device.type == "cpu":
            samples = min(len(self.x), CPU_TILE_SAMPLES)
            return max(1, min(n_models, CPU_TILE_BYTES // (4 * width * samples))), samples
        per_sample = 3 * 4 * n_models * width
        return n_models, int(max(1, min(len(self.x), ACTIVATION_BUDGET // per_sample)))

    @contextlib.contextmanager
    def _precision(self):
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield
        elif self.precision == "tf32":
            old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            try:
                yield
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        else:
            yield

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
        with self._precision():
            for g in range(0, n_models, group):
                rows = params[g : g + group].contiguous()
                forward = self._forward_for(rows)
                for s in range(0, len(self.x), bs):
                    yb = self.y[s : s + bs]
                    # [group, predictions, classes]: a language model's sequences flattened to their tokens
                    logits = forward(s, s + bs).float().flatten(1, -2)
                    yb = yb.reshape(-1)
                    picked = logits.gather(2, yb.view(1, -1, 1).expand(len(rows), -1, 1)).squeeze(2)
                    loss_sum[g : g + group] += (torch.logsumexp(logits, 2) - picked).sum(1, dtype=torch.float64)
                    correct[g : g + group] += (logits.argmax(2) == yb).sum(1, dtype=torch.float64)
        n = self.y.numel()
        loss = (loss_sum / n).cpu().numpy()
        acc = (correct / n).cpu().numpy()
        bad = ~np.isfinite(loss)
        loss[bad] = np.nan
        acc[bad] = np.nan
        return loss, acc

    def _forward_for(self, rows: torch.Tensor):
        """``forward(s, e)``: logits [len(rows), e - s, classes] of samples s..e for these models."""
        if self.bn_reset is not None:  # a copy with each model's own statistics on bn_x: the caller's rows stay
            rows = self.bn_reset(rows)
        if self.fast:
            weights = self._mlp_weights(rows)
            return lambda s, e: mlp_forward(weights, self.xt[:, s:e], transposed=True)
        state = _decoded_state(self.layout, rows)
        if self.path == "vmap":
            return lambda s, e: self._forward_vmap(state, self.x[s:e])
        state = {k: v[0] for k, v in state.items()}  # per-model: one model
        if self.compile:
            return lambda s, e: self._call_compiled(state, self.xm[s:e]).unsqueeze(0)
        for t, e in self.slots:  # copy_ keeps the copy's (channels-last) layout
            t.copy_(state[e.name])
        return lambda s, e: self.module(self.xm[s:e]).unsqueeze(0)

    def _call_compiled(self, state: dict, x: torch.Tensor) -> torch.Tensor:
        if self.compile_seconds is not None:
            return self._compiled(state, x)
        t = time.perf_counter()
        try:
            out = self._compiled(state, x)
        except Exception as exc:  # inductor needs a C++ compiler on the CPU; anything else is said in one line
            why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise GlobScopeError(f"--compile: torch.compile failed ({type(exc).__name__}: {why}); "
                                 "run without --compile") from None
        self.compile_seconds = time.perf_counter() - t
        return out

    def _mlp_weights(self, params: torch.Tensor) -> list:
        """Per-layer (W [B, out, in], b [B, out, 1]) views of the batch; layer 0 stacked as [B*out, in]."""
        B = params.shape[0]
        out = [(params[:, w.offset : w.offset + w.numel].view(B, *w.shape),
                params[:, b.offset : b.offset + b.numel].view(B, -1, 1)) for w, b in self.layers]
        W0, b0 = out[0]
        out[0] = (W0.reshape(B * W0.shape[1], W0.shape[2]), b0)  # one copy per batch, not per sample block
        return out

    def _forward_vmap(self, state: dict, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, vmap

        def one(st, xb):
            return functional_call(self.model, st, (xb,), strict=False)

        return vmap(one, in_dims=(0, None))(state, x)  # [B, n, classes]


def _decoded_state(layout: StateLayout, rows: torch.Tensor) -> dict:
    """Batched state {name: [B, *shape]} of the rows, each in its stored dtype. A decoded grid point can have
    a slightly negative BatchNorm variance, which would make every output NaN; a variance is >= 0 by
    definition, so it is clamped (in a copy: the caller's batch is left as it is)."""
    state = {e.name: v.to(getattr(torch, e.dtype)) for e, v in zip(layout.entries, layout.unflatten_batch(rows).values())}
    for name in state:
        if name.endswith("running_var"):
            state[name] = state[name].clamp(min=0)
    return state


def evaluate_flat(study_or_model_spec, params, x, y, device="auto", fast: bool = True,
                  max_models: int = 256, bn_x: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy (float64 numpy [B]) of each flat parameter vector in ``params`` [B, P].

    ``study_or_model_spec``: a Study or a model spec dict. Rows are evaluated ``max_models`` at a time.
    ``bn_x``: recompute each model's BatchNorm statistics on these inputs first (BatchedEvaluator).
    """
    spec = getattr(study_or_model_spec, "model_spec", study_or_model_spec)
    layout = getattr(study_or_model_spec, "layout", None)
    ev = BatchedEvaluator(spec, x, y, device=device, fast=fast, layout=layout, bn_x=bn_x)
    params = torch.as_tensor(params)
    out_l, out_a = [], []
    for s in range(0, params.shape[0], max_models):
        l, a = ev.evaluate(params[s : s + max_models])
        out_l.append(l)
        out_a.append(a)
    if not out_l:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(out_l), np.concatenate(out_a)
