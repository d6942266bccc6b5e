"""DEEP-ALIGN for any model with a PermutationSpec (CNNs with BatchNorm, ResNets): a spec-driven encoder.

deep_align.py's encoder reads an MLP as a chain of (W, b); here the graph is read from the spec instead. Every
permutation group g (a layer's channels, a block's hidden channels) has n_g "neurons" with an embedding [n_g, D].
Every tensor of the spec contributes, for each of its permuted axes (group g):
  * per-neuron features: with no other permuted axis, the neuron's whole slice (a bias, a BatchNorm statistic, a
    conv's kernels over unpermuted input channels or into the unpermuted residual stream, the classifier's class
    column); with one other permuted axis (group h), the RMS and mean over h's neurons at each kernel position;
  * messages (tensors with two permuted axes): neuron j of g receives Linear(sum_i W[j, i, c] h_h[i]), flattened
    over the kernel positions c, and symmetrically for h.
Weights are shared by the neurons of a group and the sums run over neurons, so the map is equivariant: permuting
a network's groups permutes each group's embeddings the same way (tests check it). Tensors with more than two
permuted axes are not supported (no registry spec has one). Each tensor is divided by its RMS first.

Scores per group are A's embeddings against B's (cosine, learned temperature): Sinkhorn in training, Hungarian at
inference, as for MLPs. Training: deep_align_spec_train.py; the file format is deep_align.py's, config kind "spec".
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..errors import GlobScopeError
from .deep_align import FORMAT, _rms, hungarian
from .matching import Aligner

KIND = "spec"
VERSION = 1  # the spec-driven aligner's own file version (the MLP aligner's is deep_align.VERSION)


# --- the spec as the encoder sees it ------------------------------------------------------------
def spec_tensors(spec, layout) -> list:
    """[[name, axes, shape], ...] of the spec's tensors with a permuted axis, in layout order (the architecture the
    encoder is built for); other models, one clear line."""
    shapes = {e.name: list(e.shape) for e in layout.entries}
    out = []
    for e in layout.entries:
        axes = spec.axes.get(e.name)
        if axes is None or all(p is None for p in axes):
            continue
        if sum(p is not None for p in axes) > 2:
            raise GlobScopeError(f"deep-align: tensor '{e.name}' has more than two permuted axes; deep-align "
                                 "supports MLPs and models whose permutation spec permutes at most two axes of a "
                                 "tensor (cifar-cnn, resnet20, resnet56): use --method weight-matching")
        out.append([e.name, list(axes), shapes[e.name]])
    if not out:
        raise GlobScopeError("deep-align: the model's permutation spec permutes nothing")
    return out


def group_sizes(tensors: list) -> dict:
    out = {}
    for _, axes, shape in tensors:
        for p, n in zip(axes, shape):
            if p is not None:
                out[p] = int(n)
    return dict(sorted(out.items()))


def arch_config(model_name: str, tensors: list, hidden: int, rounds: int) -> dict:
    sizes = group_sizes(tensors)
    return {"format": FORMAT, "version": VERSION, "kind": KIND, "model": model_name, "groups": list(sizes),
            "dims": list(sizes.values()), "tensors": tensors, "hidden": int(hidden), "rounds": int(rounds)}


def check_aligner_fits(path: str, config: dict, arch: dict) -> None:
    """One line when the aligner of ``path`` was trained for another kind of model, architecture or state layout."""
    kind = config.get("kind", "mlp")
    if kind != KIND:
        raise GlobScopeError(f"{path}: the aligner was trained for the {kind.upper()} model '{config.get('model')}', "
                             f"this study's model is '{arch['model']}' (a spec-driven aligner is needed: train one "
                             "on this study with --method deep-align and no --aligner)")
    if config.get("version") != VERSION:
        raise GlobScopeError(f"{path}: deep-align aligner of format version {config.get('version')}, "
                             f"this GlobScope reads version {VERSION}")
    if config.get("model") != arch["model"] or config.get("dims") != arch["dims"]:
        raise GlobScopeError(f"{path}: the aligner was trained for model '{config.get('model')}' with groups of "
                             f"{config.get('dims')} units, this study's model is '{arch['model']}' with {arch['dims']}")
    if config.get("tensors") != arch["tensors"]:
        raise GlobScopeError(f"{path}: the aligner was trained for another state layout of model '{arch['model']}' "
                             "(other parameter names, shapes or permuted axes)")


# --- batched states and permutations -------------------------------------------------------------
def states_from_flat(flat: torch.Tensor, layout, names=None) -> dict:
    """{name: [B, *shape]} views of flat rows [B, P] (``names``: only those entries)."""
    keep = None if names is None else set(names)
    return {e.name: flat[:, e.offset : e.offset + e.numel].reshape(-1, *e.shape)
            for e in layout.entries if keep is None or e.name in keep}


def state_batch(state: dict, names, device=None) -> dict:
    """One state dict as a batch of one {name: [1, *shape]} float32."""
    return {n: torch.as_tensor(np.asarray(state[n]) if not torch.is_tensor(state[n]) else state[n])
            .detach().to(device, torch.float32)[None] for n in names}


def onehot(perms: torch.Tensor) -> torch.Tensor:
    """Index permutations [B, n] -> matrices [B, n, n] with P[i, perm[i]] = 1."""
    n = perms.shape[-1]
    return torch.nn.functional.one_hot(perms, n).to(torch.float32)


def permute_batch(spec_axes: dict, mats: dict, states: dict) -> dict:
    """``states`` [B, ...] with matrices [B, n, n] applied on every permuted axis: row i of an axis becomes
    sum_j P[i, j] row j (permute_state's ``take(w, idx)`` for one-hot matrices; sinkhorn.apply_matrices, batched)."""
    out = dict(states)
    for name, axes in spec_axes.items():
        if name not in states:
            continue
        w = states[name]
        for axis, p in enumerate(axes):
            if p is not None:
                w = torch.einsum("bij,bj...->bi...", mats[p], w.movedim(axis + 1, 1)).movedim(1, axis + 1)
        out[name] = w
    return out


# --- the encoder -----------------------------------------------------------------------------------
class SpecEncoder(nn.Module):
    """Permutation-equivariant embeddings {group: [B, n_g, D]} of a batch of networks given as {name: [B, ...]}."""

    def __init__(self, tensors: list, hidden: int = 48, rounds: int = 2):
        super().__init__()
        self.tensors, self.hidden, self.rounds = tensors, int(hidden), int(rounds)
        self.groups = list(group_sizes(tensors))
        d = self.hidden
        self.feat, self.msg = nn.ModuleDict(), nn.ModuleList(nn.ModuleDict() for _ in range(self.rounds))
        self.places = []  # (key, tensor index, axis, group, other axis or None, other group or None, positions)
        for t, (_, axes, shape) in enumerate(tensors):
            perm = [i for i, p in enumerate(axes) if p is not None]
            for i in perm:
                others = [j for j in perm if j != i]
                key = f"t{t}a{i}"
                if not others:  # the neuron's whole slice
                    dim = math.prod(s for j, s in enumerate(shape) if j != i)
                    self.places.append((key, t, i, axes[i], None, None, dim))
                    self.feat[key] = nn.Linear(dim, d)
                else:  # RMS and mean over the other group's neurons, per kernel position; messages
                    j = others[0]
                    c = math.prod(s for k, s in enumerate(shape) if k not in (i, j))
                    self.places.append((key, t, i, axes[i], j, axes[j], c))
                    self.feat[key] = nn.Linear(2 * c, d)
                    for r in range(self.rounds):
                        self.msg[r][key] = nn.Linear(c * d, d, bias=False)
        self.update = nn.ModuleList(nn.ModuleDict({
            f"g{k}": nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d)) for k in range(len(self.groups))})
            for _ in range(self.rounds))
        self.norm = nn.ModuleList(nn.ModuleDict({f"g{k}": nn.LayerNorm(d) for k in range(len(self.groups))})
                                  for _ in range(self.rounds))
        self.head = nn.ModuleDict({f"g{k}": nn.Linear(d, d) for k in range(len(self.groups))})

    def _moved(self, w: torch.Tensor, i: int, j) -> torch.Tensor:
        """[B, n_g, rest] (no other permuted axis) or [B, n_g, n_h, c] (axis j is the other group's)."""
        w = w.movedim(i + 1, 1)
        if j is None:
            return w.reshape(w.shape[0], w.shape[1], -1)
        w = w.movedim(j + 2 if j < i else j + 1, 2)  # batch first; moving axis i to 1 shifts those before it
        return w.reshape(w.shape[0], w.shape[1], w.shape[2], -1)

    def forward(self, states: dict) -> dict:
        ws = {t: states[name] / _rms(states[name]) for t, (name, _, _) in enumerate(self.tensors)}
        moved = {key: self._moved(ws[t], i, j) for key, t, i, _, j, _, _ in self.places}
        init: dict = {}
        for key, _, _, g, j, _, _ in self.places:
            x = moved[key]
            f = x if j is None else torch.cat([x.pow(2).mean(2).sqrt(), x.mean(2)], dim=-1)
            init[g] = init.get(g, 0) + self.feat[key](f)
        h = {g: torch.relu(init[g]) for g in self.groups}
        for r in range(self.rounds):
            m = {g: torch.zeros_like(h[g]) for g in self.groups}
            for key, _, _, g, j, other, _ in self.places:
                if j is None:
                    continue
                x = moved[key]  # [B, n_g, n_h, c]
                s = torch.einsum("bghc,bhd->bgcd", x, h[other]) / math.sqrt(x.shape[2])
                m[g] = m[g] + self.msg[r][key](s.reshape(s.shape[0], s.shape[1], -1))
            h = {g: self.norm[r][f"g{k}"](h[g] + self.update[r][f"g{k}"](torch.cat([h[g], m[g]], dim=-1)))
                 for k, g in enumerate(self.groups)}
        return {g: self.head[f"g{k}"](h[g]) for k, g in enumerate(self.groups)}


class SpecAlignNet(nn.Module):
    """Siamese spec encoder + per-group cosine similarity with a learned temperature."""

    def __init__(self, tensors: list, hidden: int = 48, rounds: int = 2):
        super().__init__()
        self.encoder = SpecEncoder(tensors, hidden, rounds)
        self.log_scale = nn.Parameter(torch.full((len(self.encoder.groups),), math.log(5.0)))

    @property
    def names(self) -> list:
        return [t[0] for t in self.encoder.tensors]

    def similarities(self, states_a: dict, states_b: dict) -> dict:
        """{group: S [B, n, n]}, S[a, b] = score of A's unit a matching B's unit b."""
        ha, hb = self.encoder(states_a), self.encoder(states_b)
        out = {}
        for k, g in enumerate(self.encoder.groups):
            x = ha[g] / ha[g].norm(dim=-1, keepdim=True).clamp_min(1e-6)
            y = hb[g] / hb[g].norm(dim=-1, keepdim=True).clamp_min(1e-6)
            out[g] = self.log_scale[k].exp() * (x @ y.transpose(1, 2))
        return out


def build_net(config: dict) -> SpecAlignNet:
    return SpecAlignNet(config["tensors"], config["hidden"], config["rounds"])


class DeepAlignSpec(Aligner):
    """``find``: one forward pass and a Hungarian projection per group; ``refine``: weight matching from there."""

    name = "deep-align"
    provenance: dict | None = None

    def __init__(self, spec, net: SpecAlignNet, config: dict, refine=None, device="cpu"):
        super().__init__(spec)
        self.net, self.config, self.refine, self.device = net.to(device).eval(), config, refine, torch.device(device)
        if sorted(spec.perm_names) != sorted(net.encoder.groups):
            raise GlobScopeError("deep-align: the permutation spec does not match the aligner's groups")
        if refine is not None:
            self.name = "deep-align+wm"

    @torch.no_grad()
    def predict(self, ref_state: dict, other_state: dict) -> dict:
        names = self.net.names
        sims = self.net.similarities(state_batch(ref_state, names, self.device),
                                     state_batch(other_state, names, self.device))
        return {g: hungarian(s[0]) for g, s in sims.items()}

    def find(self, ref_state: dict, other_state: dict) -> dict:
        perms = self.predict(ref_state, other_state)
        if self.refine is not None:
            perms = self.refine.find(ref_state, other_state, init=perms)
            self.iterations = self.refine.iterations
        return perms
