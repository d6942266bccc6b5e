"""Decoder-only transformer language models: a built-in GPT and any Hugging Face causal LM from its config.

Both take token ids [N, T] and return next-token logits [N, T, vocab]; the loss is next-token cross-entropy
over every position (``networks.losses``). Nothing is downloaded: the Hugging Face model is built from a
config dict (``config.json``'s content, stored in the study's model spec) with ``from_config``.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import GlobScopeError

# GPT-2 small's shape (Radford et al. 2019): 12 layers, width 768, 12 heads, MLP 4 x 768
GPT2_SMALL = dict(layers=12, width=768, heads=12, mlp=3072)


class _Block(nn.Module):
    """Pre-norm transformer block with causal self-attention, as GPT-2."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, mlp)
        self.out = nn.Linear(mlp, width)

    def forward(self, x):
        n, t, w = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, w))
        return x + self.out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2's architecture: token and learned position embeddings, pre-norm blocks, final LayerNorm, and an
    output layer tied to the token embedding (so it is one set of coordinates, as in GPT-2)."""

    per_model_only = True  # evaluated model by model (vmap has no rule for the fused attention kernel)

    def __init__(self, vocab: int, context: int, layers: int, width: int, heads: int, mlp: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads, mlp) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight
        # GPT-2's initialization: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.ndim == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids):
        if ids.shape[1] > self.wpe.num_embeddings:
            raise GlobScopeError(f"sequence of {ids.shape[1]} tokens is longer than the model's context "
                                 f"({self.wpe.num_embeddings})")
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _context(input_shape, context) -> int:
    if len(input_shape) != 1:
        raise ValueError(f"a language model reads token sequences [T], not inputs of shape {list(input_shape)} "
                         "(use a text data set such as pydoc-text)")
    return int(context) if context is not None else int(input_shape[0])


def gpt(input_shape, num_classes, layers=4, width=256, heads=4, mlp=None, context=None, vocab=None):
    """A GPT of any size; the vocabulary is the data set's unless ``vocab`` is larger, the context the
    sequence length unless ``context`` is given (GPT-2's own: 1024)."""
    vocab = int(vocab) if vocab is not None else int(num_classes)
    if vocab < int(num_classes):
        raise ValueError(f"vocab {vocab} is smaller than the data set's {num_classes} tokens")
    ctx = _context(input_shape, context)
    if ctx < int(input_shape[0]):
        raise ValueError(f"context {ctx} is shorter than the data's sequences ({input_shape[0]} tokens)")
    return GPT(vocab, ctx, int(layers), int(width), int(heads),
               int(mlp) if mlp is not None else 4 * int(width))


def gpt2_small(input_shape, num_classes, context=None, vocab=None):
    """GPT-2 small's shape. On byte-level text (256 tokens, context 128) it has 8.6e7 parameters; with
    GPT-2's own vocabulary and context (vocab=50257, context=1024) 1.244e8, GPT-2 small's count."""
    return gpt(input_shape, num_classes, context=context, vocab=vocab, **GPT2_SMALL)


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM (``AutoModelForCausalLM.from_config``) that returns logits only; its state
    entries are the Hugging Face names under ``lm.`` (a ``model.safetensors`` maps one to one)."""

    per_model_only = True

    def __init__(self, config: dict):
        super().__init__()
        try:
            import transformers
        except ImportError:
            raise GlobScopeError("model 'hf-causal-lm' needs the package transformers (pip install transformers)") \
                from None
        transformers.logging.set_verbosity_error()  # its notes on unused config keys are not the user's concern
        cfg = dict(config)
        kind = cfg.pop("model_type", None)
        if not kind:
            raise ValueError("the config has no 'model_type' (is it a Hugging Face config.json?)")
        for key in ("dtype", "torch_dtype"):  # the study stores and decodes float32
            cfg.pop(key, None)
        try:
            hf_config = transformers.AutoConfig.for_model(kind, **cfg)
            self.lm = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
        except (KeyError, ValueError) as exc:  # unknown model_type, or a config that is not a causal LM
            raise ValueError(f"cannot build a causal LM from this config (model_type '{kind}'): "
                             f"{str(exc).strip().splitlines()[0][:200]}") from None
        self.lm.float()
        self.vocab = int(self.lm.get_output_embeddings().weight.shape[0])

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


def read_config(path: str) -> dict:
    """A Hugging Face config.json (or the directory that holds one) as data."""
    import json
    import os

    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GlobScopeError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        raise GlobScopeError(f"{path}: not a Hugging Face config (no 'model_type')")
    return cfg


def full_config(config: dict) -> dict:
    """``config`` with Hugging Face's defaults filled in, so that two configs of one architecture compare equal
    whichever defaults they spell out."""
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = dict(config)
    try:
        return transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg).to_dict()
    except (KeyError, ValueError, TypeError):
        return dict(config)


def hf_causal_lm(input_shape, num_classes, config: dict):
    """Any Hugging Face causal LM from its config dict (``config.json``), weights initialized, nothing fetched."""
    if not isinstance(config, dict):
        raise ValueError("config must be the content of a Hugging Face config.json (a JSON object)")
    _context(input_shape, None)
    model = HFCausalLM(config)
    if model.vocab < int(num_classes):
        raise ValueError(f"the model's vocabulary ({model.vocab}) is smaller than the data set's {num_classes} tokens")
    positions = config.get("n_positions", config.get("max_position_embeddings"))
    if positions is not None and int(positions) < int(input_shape[0]):
        raise ValueError(f"the model's context ({positions}) is shorter than the data's sequences ({input_shape[0]})")
    return model
