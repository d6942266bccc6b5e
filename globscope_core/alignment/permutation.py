"""Permutation symmetries of networks: which weight axes each hidden-unit permutation acts on.

Permuting the hidden units of a layer, together with their incoming and outgoing weights,
leaves the network's function unchanged (Entezari et al., ICLR 2022). A ``PermutationSpec``
lists, for every entry of the flattened state (parameters *and* BatchNorm running statistics),
which permutation acts on each of its axes -- the ``permutation_spec`` of Git Re-Basin
(Ainsworth et al., ICLR 2023). Residual connections are expressed by letting several layers
share one permutation (the residual stream's), so MLPs, CNNs with BatchNorm and ResNets all use
the same format: see ``dense``, ``conv`` and ``norm``.

Convention: a permutation ``p`` (int array of length n) maps a tensor ``w`` to
``w.take(p, axis)``: unit i of the permuted model is unit ``p[i]`` of the original.

Specs for registry models are found by ``spec_for_model``; a user model can define
``permutation_spec(self) -> PermutationSpec`` and add its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import GlobScopeError
from ..networks.models import MLP_MODELS
from ..storage.state_layout import StateLayout


@dataclass
class PermutationSpec:
    """``axes[name]`` = one permutation name (or None) per axis of state entry ``name``.

    ``activations[perm]`` optionally names the module whose output carries the units of ``perm``
    (channel axis 1); activation matching uses it.
    """

    axes: dict
    activations: dict = field(default_factory=dict)

    @property
    def perm_to_axes(self) -> dict:
        """{perm: [(entry name, axis), ...]} -- every place each permutation acts."""
        out: dict = {}
        for name, ax in self.axes.items():
            for i, p in enumerate(ax):
                if p is not None:
                    out.setdefault(p, []).append((name, i))
        return out

    @property
    def perm_names(self) -> list:
        return sorted(self.perm_to_axes)

    def sizes(self, shapes: dict) -> dict:
        """{perm: number of units}, checked to agree on every axis it acts on."""
        out = {}
        for p, places in self.perm_to_axes.items():
            for name, axis in places:
                if name not in shapes:
                    raise GlobScopeError(f"permutation spec names '{name}', which the model does not have")
                n = int(shapes[name][axis])
                if out.setdefault(p, n) != n:
                    raise GlobScopeError(f"permutation '{p}' acts on axes of sizes {out[p]} and {n} ('{name}' axis {axis})")
        return out

    def check(self, layout: StateLayout) -> None:
        """Every spec entry exists with the right rank; unit counts agree."""
        shapes = {e.name: e.shape for e in layout.entries}
        for name, ax in self.axes.items():
            if name not in shapes:
                raise GlobScopeError(f"permutation spec names '{name}', which the model does not have")
            if len(ax) != len(shapes[name]):
                raise GlobScopeError(f"permutation spec gives {len(ax)} axes for '{name}' of shape {shapes[name]}")
        self.sizes(shapes)

    def identity(self, layout: StateLayout) -> dict:
        return {p: np.arange(n) for p, n in self.sizes({e.name: e.shape for e in layout.entries}).items()}


# --- building blocks (Git Re-Basin style) -------------------------------------------------------
def dense(name: str, p_in, p_out, bias: bool = True) -> dict:
    """nn.Linear: weight [out, in], bias [out]."""
    d = {f"{name}.weight": (p_out, p_in)}
    if bias:
        d[f"{name}.bias"] = (p_out,)
    return d


def conv(name: str, p_in, p_out, bias: bool = False) -> dict:
    """nn.Conv2d: weight [out, in, kh, kw] (kernel axes are never permuted)."""
    d = {f"{name}.weight": (p_out, p_in, None, None)}
    if bias:
        d[f"{name}.bias"] = (p_out,)
    return d


def norm(name: str, p, running_stats: bool = True) -> dict:
    """BatchNorm/LayerNorm over channels: affine weight and bias, plus running statistics."""
    d = {f"{name}.weight": (p,), f"{name}.bias": (p,)}
    if running_stats:
        d[f"{name}.running_mean"] = (p,)
        d[f"{name}.running_var"] = (p,)
    return d


# --- applying permutations ----------------------------------------------------------------------
def permute_state(spec: PermutationSpec, perms: dict, state: dict) -> dict:
    """A new state dict (torch tensors or numpy arrays) with every permutation applied.

    Entries not in the spec (e.g. the input layer's inputs, num_batches_tracked) are kept.
    """
    out = dict(state)
    for name, ax in spec.axes.items():
        w = state[name]
        for i, p in enumerate(ax):
            if p is None:
                continue
            idx = perms[p]
            if hasattr(w, "index_select"):  # torch tensor
                import torch

                w = w.index_select(i, torch.as_tensor(np.asarray(idx), dtype=torch.long, device=w.device))
            else:
                w = np.take(w, idx, axis=i)
        out[name] = w
    return out


def flat_index(spec: PermutationSpec, layout: StateLayout, perms: dict) -> np.ndarray:
    """Gather index g [P] with ``permuted_flat = flat[g]``: one index applies perms to any number of rows."""
    base = np.arange(layout.size, dtype=np.int64)
    state = {e.name: base[e.offset : e.offset + e.numel].reshape(e.shape) for e in layout.entries}
    sizes = spec.sizes({e.name: e.shape for e in layout.entries})
    for p, n in sizes.items():
        q = np.asarray(perms.get(p, ()))
        if q.shape != (n,) or not np.array_equal(np.sort(q), np.arange(n)):
            raise GlobScopeError(f"permutation '{p}' is not a permutation of {n} units")
    permuted = permute_state(spec, perms, state)
    return np.concatenate([np.asarray(permuted[e.name]).reshape(-1) for e in layout.entries])


def permute_flat(spec: PermutationSpec, layout: StateLayout, perms: dict, rows: np.ndarray) -> np.ndarray:
    """Apply ``perms`` to flat parameter rows [k, P] (or one vector [P])."""
    return np.asarray(rows)[..., flat_index(spec, layout, perms)]


# --- specs of the model zoo ---------------------------------------------------------------------
def mlp_spec(layout: StateLayout, prefix: str = "net") -> PermutationSpec:
    """MLP as ``nn.Sequential`` of Linear layers (with activations in between) under ``prefix``.

    Hidden layer k has permutation ``P_k``: rows of Linear k's weight and bias, columns of
    Linear k+1's weight. Activations are taken after the nonlinearity that follows Linear k.
    """
    linears = []
    for e in layout.entries:
        parts = e.name.split(".")
        if len(parts) == 3 and parts[0] == prefix and parts[2] == "weight" and len(e.shape) == 2:
            linears.append(int(parts[1]))
    linears.sort()
    if len(linears) < 2:
        raise GlobScopeError(f"model has {len(linears)} Linear layers under '{prefix}': nothing to permute")
    names = {e.name for e in layout.entries}
    axes, acts = {}, {}
    for k, idx in enumerate(linears):
        p_in = None if k == 0 else f"P_{k - 1}"
        p_out = None if k == len(linears) - 1 else f"P_{k}"
        axes.update(dense(f"{prefix}.{idx}", p_in, p_out, bias=f"{prefix}.{idx}.bias" in names))
        if p_out is not None:
            acts[p_out] = f"{prefix}.{idx + 1}" if idx + 1 < linears[k + 1] else f"{prefix}.{idx}"
    return PermutationSpec(axes, acts)


_SPECS = {name: mlp_spec for name in MLP_MODELS}


def register_spec(model_name: str):
    """Decorator: ``fn(layout) -> PermutationSpec`` for a registry model (CNNs, ResNets, ...)."""

    def deco(fn):
        _SPECS[model_name] = fn
        return fn

    return deco


@register_spec("resnet20")
@register_spec("resnet56")
def resnet_block_spec(layout: StateLayout) -> PermutationSpec:
    """The CIFAR ResNets of the registry (networks/models.py ``CifarResNet``): the hidden channels of every basic
    block (conv1's outputs, bn1, conv2's inputs) permuted freely, the residual stream left as it is. Its zero-padded
    "option A" shortcuts embed one stage's channels at fixed places of the next stage's, which a permutation of the
    stream would have to respect: so this is a subset of the symmetry group, exact for every network it covers."""
    blocks = sorted({int(e.name.split(".")[1]) for e in layout.entries
                     if e.name.startswith("blocks.") and e.name.endswith(".conv1.weight")})
    if not blocks:
        raise GlobScopeError("model has no residual blocks (blocks.N.conv1): nothing to permute")
    axes, acts = {}, {}
    for b in blocks:
        p = f"B_{b}"
        axes.update(conv(f"blocks.{b}.conv1", None, p))
        axes.update(norm(f"blocks.{b}.bn1", p))
        axes.update(conv(f"blocks.{b}.conv2", p, None))
        acts[p] = f"blocks.{b}.bn1"  # channel axis 1; the ReLU that follows is functional
    return PermutationSpec(axes, acts)


@register_spec("cifar-cnn")
def cifar_cnn_spec(layout: StateLayout) -> PermutationSpec:
    """The registry's VGG-style CNN (``CifarCNN``, with or without BatchNorm): the output channels of every conv
    (with its BatchNorm) and the classifier's hidden units. The classifier flattens [C, H, W] channel-major, so the
    last conv's channels are permuted only when its maps are 1x1 at the flatten (the classifier's input is then C
    wide); otherwise they are left as they are (a subset of the symmetry group, exact for every network)."""
    shapes = {e.name: e.shape for e in layout.entries}
    convs = sorted(int(n.split(".")[1]) for n, s in shapes.items()
                   if n.startswith("features.") and n.endswith(".weight") and len(s) == 4)
    linears = sorted(int(n.split(".")[1]) for n, s in shapes.items()
                     if n.startswith("classifier.") and n.endswith(".weight") and len(s) == 2)
    if not convs or len(linears) != 2:
        raise GlobScopeError("model has no conv features and two-layer classifier: not the registry's cifar-cnn")
    first, last = (f"classifier.{i}" for i in linears)
    flat_is_channels = shapes[f"{first}.weight"][1] == shapes[f"features.{convs[-1]}.weight"][0]
    axes, acts, p_in = {}, {}, None
    for k, idx in enumerate(convs):
        p = f"C_{k}" if k < len(convs) - 1 or flat_is_channels else None
        axes.update(conv(f"features.{idx}", p_in, p, bias=f"features.{idx}.bias" in shapes))
        has_bn = f"features.{idx + 1}.running_var" in shapes
        if p is not None:
            if has_bn:
                axes.update(norm(f"features.{idx + 1}", p))
            acts[p] = f"features.{idx + 2 if has_bn else idx + 1}"  # the ReLU after the conv (and its BatchNorm)
        p_in = p
    axes.update(dense(first, p_in, "H"))
    axes.update(dense(last, "H", None))
    acts["H"] = f"classifier.{linears[0] + 1}"
    return PermutationSpec(axes, acts)


def spec_for_model(model_spec: dict, layout: StateLayout, model=None) -> PermutationSpec:
    """The permutation spec of a study's model: registry spec, or the model's own ``permutation_spec()``."""
    name = model_spec["name"]
    if model is not None and hasattr(model, "permutation_spec"):
        spec = model.permutation_spec()
    elif name in _SPECS:
        spec = _SPECS[name](layout)
    else:
        raise GlobScopeError(f"model '{name}' has no permutation spec (registered: {', '.join(sorted(_SPECS))}; "
                             "a user model can define permutation_spec())")
    spec.check(layout)
    return spec
