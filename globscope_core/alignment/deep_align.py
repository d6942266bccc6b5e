"""Learned alignment of MLPs (DEEP-ALIGN, Navon et al., ICML 2024): one forward pass predicts the permutations.

A Siamese weight-space encoder maps each network to one embedding per hidden neuron, equivariantly: permuting
the hidden neurons of a layer (rows of W_k and b_k, columns of W_{k+1}) permutes that layer's embeddings in the
same way and changes nothing else. Per hidden layer, the similarity of A's and B's embeddings is projected to a
soft permutation (Sinkhorn, training) or a hard one (Hungarian, inference).

The encoder is neuron-level message passing on the network's graph, not DWSNet's full weight-to-weight basis:
  * initial features per neuron: its bias and the norms of its incoming row and outgoing column; for the first
    hidden layer also its whole incoming row (input pixels are not permuted), for the last hidden layer its whole
    outgoing column (classes are not permuted);
  * each round, neuron j of layer k receives sum_i W_k[j, i] h_{k-1}[i] (from the layer below) and
    sum_i W_{k+1}[i, j] h_{k+1}[i] (from the layer above), and updates h_k[j] with an MLP and a LayerNorm.
Every operation is either per neuron (shared over the neurons of a layer) or a sum over the neurons of a
neighbouring layer weighted by the connecting weights, so the map is equivariant (tests check it). Such sums are
among DWSNet's weight-to-bias / bias-to-bias blocks; DWSNet also has weight-to-weight blocks that output
per-edge features, which this aligner does not need (it only compares neurons).

The similarity of two units adds to their embeddings' cosine the inner products that weight matching maximises,
in one forward and one backward sweep through soft permutations (``DeepAlignNet.similarities``): the embeddings
alone lost to weight matching (1.2x its barrier on the demo, 1.5x on MNIST-5k), because a 48-dim embedding of a
unit cannot keep its whole 784-wide row.

Weights are divided by each matrix's RMS before encoding (the encoder sees shapes, not scales). Training lives in
deep_align_train.py; the aligner file (``STUDY/aligners/deep-align.pt``) holds tensors and a JSON config only.
"""
from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..errors import GlobScopeError
from ..networks.models import MLP_MODELS, is_mlp, mlp_linear_layers
from .matching import Aligner

SUPPORTED = MLP_MODELS
FORMAT = "globscope-deep-align"
VERSION = 2  # 2: the similarity has weight-matching sweeps (files of version 1 are retrained)


# --- the MLP as a list of (W, b) --------------------------------------------------------------
def mlp_layers(model_spec: dict, layout) -> list:
    """[(weight name, bias name), ...] of a registry MLP, in order; other models: one clear error."""
    name = model_spec.get("name")
    if not is_mlp(model_spec):
        raise GlobScopeError(f"deep-align: model '{name}' is not supported; it aligns the registry's MLPs "
                             f"({', '.join(SUPPORTED)}, any depth and width): use --method weight-matching "
                             "or activation-matching for other models")
    layers = mlp_linear_layers(layout)
    if layers is None or len(layers) < 2:
        raise GlobScopeError(f"deep-align: model '{name}' is not a plain Linear/ReLU MLP with biases")
    return [(w.name, b.name) for w, b in layers]


def layer_dims(layout, layers) -> list:
    """[d_in, n_1, ..., n_{L-1}, d_out]."""
    shapes = {e.name: e.shape for e in layout.entries}
    return [int(shapes[layers[0][0]][1])] + [int(shapes[w][0]) for w, _ in layers]


def perm_names(n_hidden: int) -> list:
    return [f"P_{k}" for k in range(n_hidden)]  # the names mlp_spec gives hidden layers


def weights_from_flat(flat: torch.Tensor, layout, layers) -> list:
    """[(W [B, out, in], b [B, out]), ...] from flat rows [B, P]."""
    ent = {e.name: e for e in layout.entries}
    out = []
    for w, b in layers:
        ew, eb = ent[w], ent[b]
        out.append((flat[:, ew.offset : ew.offset + ew.numel].reshape(-1, *ew.shape),
                    flat[:, eb.offset : eb.offset + eb.numel].reshape(-1, *eb.shape)))
    return out


def weights_from_state(state: dict, layers, device=None) -> list:
    """Same as weights_from_flat for one state dict (a batch of one)."""
    def t(x):
        return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().to(device, torch.float32)[None]

    return [(t(state[w]), t(state[b])) for w, b in layers]


def permute_weights(ws: list, perms: list) -> list:
    """Apply hard (index [B, n]) or soft (matrix [B, n, n]) permutations of the hidden layers.

    Hard: unit i of the result is unit perm[i]. Soft: W'_k = P_k W_k P_{k-1}^T, b'_k = P_k b_k.
    """
    out = []
    for k, (w, b) in enumerate(ws):
        p_out = perms[k] if k < len(perms) else None
        p_in = perms[k - 1] if k > 0 else None
        if p_out is not None:
            if p_out.dtype == torch.long:
                w = torch.gather(w, 1, p_out[:, :, None].expand(-1, -1, w.shape[2]))
                b = torch.gather(b, 1, p_out)
            else:
                w, b = p_out @ w, (p_out @ b[..., None])[..., 0]
        if p_in is not None:
            if p_in.dtype == torch.long:
                w = torch.gather(w, 2, p_in[:, None, :].expand(-1, w.shape[1], -1))
            else:
                w = w @ p_in.transpose(1, 2)
        out.append((w, b))
    return out


# --- the encoder --------------------------------------------------------------------------------
def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2).mean(dim=tuple(range(1, t.ndim)), keepdim=True).sqrt().clamp_min(1e-8)


def _scale_free(ws: list) -> tuple:
    """Each matrix over its RMS, each bias over the pre-activation scale: ([W], [b])."""
    return [w / _rms(w) for w, _ in ws], [b / (_rms(w)[..., 0] * math.sqrt(w.shape[2])) for w, b in ws]


class NeuronEncoder(nn.Module):
    """Permutation-equivariant embeddings [B, n_k, D] of the hidden neurons of a batch of MLPs."""

    def __init__(self, dims: list, hidden: int = 48, rounds: int = 2):
        super().__init__()
        self.dims, self.hidden, self.rounds = [int(d) for d in dims], int(hidden), int(rounds)
        n_hidden, d = len(dims) - 2, self.hidden
        self.first = nn.Linear(dims[0] + 1, d)  # layer 1's incoming row and bias
        self.last = nn.Linear(dims[-1], d)  # the last hidden layer's outgoing column
        self.local = nn.ModuleList(nn.Linear(3, d) for _ in range(n_hidden))  # bias, |row|, |column|
        self.down = nn.ModuleList(nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n_hidden))
                                  for _ in range(rounds))
        self.up = nn.ModuleList(nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n_hidden))
                                for _ in range(rounds))
        self.update = nn.ModuleList(nn.ModuleList(
            nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, d)) for _ in range(n_hidden))
            for _ in range(rounds))
        self.norm = nn.ModuleList(nn.ModuleList(nn.LayerNorm(d) for _ in range(n_hidden)) for _ in range(rounds))
        self.head = nn.ModuleList(nn.Linear(d, d) for _ in range(n_hidden))

    def forward(self, ws: list) -> list:
        n_hidden = len(ws) - 1
        wn, bn = _scale_free(ws)
        h = []
        for k in range(n_hidden):
            local = torch.stack([bn[k], wn[k].norm(dim=2) / math.sqrt(wn[k].shape[2]),
                                 wn[k + 1].norm(dim=1) / math.sqrt(wn[k + 1].shape[1])], dim=-1)
            hk = self.local[k](local)
            if k == 0:
                hk = hk + self.first(torch.cat([wn[0], bn[0][..., None]], dim=-1))
            if k == n_hidden - 1:
                hk = hk + self.last(wn[-1].transpose(1, 2))
            h.append(torch.relu(hk))
        for t in range(self.rounds):
            new = []
            for k in range(n_hidden):
                zero = torch.zeros_like(h[k])
                down = wn[k] @ self.down[t][k](h[k - 1]) / math.sqrt(wn[k].shape[2]) if k > 0 else zero
                up = (wn[k + 1].transpose(1, 2) @ self.up[t][k](h[k + 1]) / math.sqrt(wn[k + 1].shape[1])
                      if k < n_hidden - 1 else zero)
                new.append(self.norm[t][k](h[k] + self.update[t][k](torch.cat([h[k], down, up], dim=-1))))
            h = new
        return [self.head[k](h[k]) for k in range(n_hidden)]


class DeepAlignNet(nn.Module):
    """Siamese encoder + per-layer similarity: the embeddings' cosine (learned temperature) plus weight-matching
    sweeps (learned weights), see ``similarities``."""

    def __init__(self, dims: list, hidden: int = 48, rounds: int = 2):
        super().__init__()
        self.encoder = NeuronEncoder(dims, hidden, rounds)
        n_hidden = len(dims) - 2
        self.log_scale = nn.Parameter(torch.full((n_hidden,), math.log(5.0)))
        # start the sweeps' terms sharp enough to tell units apart (inner products of rows are ~ correlations)
        self.log_in = nn.Parameter(torch.full((n_hidden,), math.log(20.0)))
        self.log_out = nn.Parameter(torch.full((n_hidden,), math.log(20.0)))

    def similarities(self, ws_a: list, ws_b: list) -> list:
        """Per hidden layer: S [B, n_k, n_k], S[a, b] = score of A's unit a matching B's unit b.

        S_k = cosine of the embeddings + the inner products weight matching maximises, in one forward and one
        backward sweep: incoming rows (and biases) compared through the soft permutation of the layer below
        (the inputs for layer 1), then outgoing columns through that of the layer above (the classes for the
        last). Soft permutations are row softmaxes: row a is where A's unit a goes in B. The embeddings see what
        one layer's weights do not (the units' roles in the whole network); the sweeps see whole rows, which a
        48-dim embedding of a 784-wide row loses. Each term is equivariant, so S is.
        """
        pairs = len(ws_a[0][0])  # A and B go through the encoder as one batch: A's first, then B's
        h = self.encoder([(torch.cat([wa, wb]), torch.cat([ba, bb])) for (wa, ba), (wb, bb) in zip(ws_a, ws_b)])
        learned = []
        for k, hk in enumerate(h):
            hk = hk / hk.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            learned.append(self.log_scale[k].exp() * (hk[:pairs] @ hk[pairs:].transpose(1, 2)))
        (wa, ba), (wb, bb) = _scale_free(ws_a), _scale_free(ws_b)
        forward, p = [], None  # scores after the forward sweep (incoming rows), layer by layer upwards
        for k in range(len(learned)):
            wbk = wb[k] if p is None else wb[k] @ p.transpose(1, 2)  # B's columns in A's order
            c = (wa[k] @ wbk.transpose(1, 2) + ba[k][:, :, None] * bb[k][:, None, :]) / (wa[k].shape[2] + 1)
            forward.append(learned[k] + self.log_in[k].exp() * c)
            p = torch.softmax(forward[k], dim=2)
        out, p = [None] * len(learned), None  # the backward sweep adds the outgoing columns, downwards
        for k in reversed(range(len(learned))):
            wbk = wb[k + 1] if p is None else p @ wb[k + 1]  # B's rows in A's order
            out[k] = forward[k] + self.log_out[k].exp() * (wa[k + 1].transpose(1, 2) @ wbk) / wa[k + 1].shape[1]
            p = torch.softmax(out[k], dim=2)
        return out


def sinkhorn(scores: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """Log of the doubly stochastic matrix nearest to softmax(scores) (Sinkhorn in log space), [B, n, n]."""
    log_p = scores
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=2, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p


def hungarian(scores: torch.Tensor) -> np.ndarray:
    """Hard permutation [n] maximising the summed scores of one [n, n] matrix: cols[a] = B's unit for A's a."""
    return linear_sum_assignment(scores.detach().cpu().double().numpy(), maximize=True)[1].astype(np.int64)


# --- saving and loading (tensors + a JSON config, weights_only) ----------------------------------
def arch_config(model_name: str, dims: list, hidden: int, rounds: int) -> dict:
    return {"format": FORMAT, "version": VERSION, "model": model_name, "dims": [int(d) for d in dims],
            "hidden": int(hidden), "rounds": int(rounds)}


def compatible(config: dict, arch: dict) -> bool:
    """A saved aligner's ``config`` was built for ``arch``: every key of ``arch`` (the MLP's arch_config or
    deep_align_spec's, which adds the kind, groups and tensors) has its value there."""
    return all(config.get(k) == v for k, v in arch.items())


def save_aligner(path: str, config: dict, net: nn.Module, optimizer=None, step: int = 0) -> None:
    """Atomic write of the aligner (and the optimizer state while training runs)."""
    from ..storage.safe_write import atomic_write_bytes

    blob = {"config": json.dumps(config), "model": net.state_dict(), "step": int(step)}
    if optimizer is not None:
        blob["optimizer"] = optimizer.state_dict()
    blob["checksum"] = blob_checksum(blob)  # torch's zip reader does not check its CRCs
    buf = io.BytesIO()
    torch.save(blob, buf)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def blob_checksum(blob: dict) -> str:
    """BLAKE2 of everything an aligner file holds but the checksum itself (files older than it have none)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)

    def add(key, v):
        h.update(str(key).encode())
        if isinstance(v, dict):
            for k in sorted(v, key=str):
                add(k, v[k])
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                add(i, x)
        elif torch.is_tensor(v):
            h.update(str(v.dtype).encode() + str(tuple(v.shape)).encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(repr(v).encode())

    add("blob", {k: v for k, v in blob.items() if k != "checksum"})
    return h.hexdigest()


def load_aligner_file(path: str) -> dict:
    """{"config": dict, "model": state dict, "step": int, ["optimizer"]} -- no pickled code is run."""
    import zipfile

    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; cut short, its directory at the end is lost
        raise GlobScopeError(f"{path}: cannot read the deep-align aligner: not a torch file (damaged, cut short, "
                             "or another kind of file)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged archive, or pickled objects weights_only refuses
        why = ("it holds pickled objects that a weights-only load refuses, or is damaged"
               if "Weights only load failed" in str(exc) else (str(exc).strip().splitlines() or [type(exc).__name__])[0])
        raise GlobScopeError(f"{path}: cannot read the deep-align aligner: {why}") from None
    if not isinstance(blob, dict) or not {"config", "model", "step"} <= set(blob):
        raise GlobScopeError(f"{path}: not a deep-align aligner (no config, weights and step)")
    if "checksum" in blob and blob["checksum"] != blob_checksum(blob):
        raise GlobScopeError(f"{path}: damaged deep-align aligner (checksum mismatch)")
    try:
        blob["config"] = json.loads(blob["config"])
        if not isinstance(blob["config"], dict) or blob["config"].get("format") != FORMAT:
            raise ValueError(f"its format is not {FORMAT}")
        if not all(torch.is_tensor(v) for v in blob["model"].values()):
            raise ValueError("its weights are not tensors")
        return blob
    except Exception as exc:  # a torch file of something else (a reducer, a state dict): one line naming it
        raise GlobScopeError(f"{path}: not a deep-align aligner ({exc})") from None


def layer_signature(layout, layers) -> list:
    """[[name, shape], ...] of the MLP's weights and biases: what an aligner trained on it expects."""
    shapes = {e.name: list(e.shape) for e in layout.entries}
    return [[n, shapes[n]] for pair in layers for n in pair]


def check_aligner_fits(path: str, config: dict, model_name: str, dims: list, signature: list) -> None:
    """One line when the aligner of ``path`` was trained for another architecture or state layout."""
    mine = f"'{model_name}' {'-'.join(map(str, dims))}"
    theirs = f"'{config.get('model')}' {'-'.join(map(str, config.get('dims') or []))}"
    if config.get("model") != model_name or list(config.get("dims") or []) != list(dims):
        raise GlobScopeError(f"{path}: the aligner was trained for model {theirs}, this study's model is {mine}")
    if config.get("version") != VERSION:
        raise GlobScopeError(f"{path}: deep-align aligner of format version {config.get('version')}, this GlobScope "
                             f"reads version {VERSION}: train a new one (--method deep-align without --aligner)")
    stored = (config.get("trained_on") or {}).get("layers")
    if stored is not None and stored != signature:  # same widths, other parameter names or shapes
        raise GlobScopeError(f"{path}: the aligner was trained for another state layout of model {theirs} "
                             "(other parameter names or shapes)")


def build_net(config: dict) -> DeepAlignNet:
    return DeepAlignNet(config["dims"], config["hidden"], config["rounds"])


# --- the Aligner ---------------------------------------------------------------------------------
class DeepAlign(Aligner):
    """``find`` is one forward pass of the trained net and a Hungarian projection per hidden layer.

    ``refine`` (deep-align+wm): weight matching started from these permutations.
    """

    name = "deep-align"
    provenance: dict | None = None  # where the net was trained, set by deep_align_make.make_deep_align

    def __init__(self, spec, net: DeepAlignNet, layers: list, config: dict, refine=None, device="cpu"):
        super().__init__(spec)
        self.net, self.layers, self.config = net.to(device).eval(), layers, config
        self.refine, self.device = refine, torch.device(device)
        self.perm_names = perm_names(len(layers) - 1)
        missing = [p for p in self.perm_names if p not in spec.perm_names]
        if missing or len(spec.perm_names) != len(self.perm_names):
            raise GlobScopeError("deep-align: the permutation spec does not match the MLP's hidden layers")
        if refine is not None:
            self.name = "deep-align+wm"

    @torch.no_grad()
    def predict(self, ref_state: dict, other_state: dict) -> dict:
        sims = self.net.similarities(weights_from_state(ref_state, self.layers, self.device),
                                     weights_from_state(other_state, self.layers, self.device))
        return {p: hungarian(s[0]) for p, s in zip(self.perm_names, sims)}

    def find(self, ref_state: dict, other_state: dict) -> dict:
        perms = self.predict(ref_state, other_state)
        if self.refine is not None:
            perms = self.refine.find(ref_state, other_state, init=perms)
            self.iterations = self.refine.iterations
        return perms
