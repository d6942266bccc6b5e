"""The model registry: a name and JSON-able constructor arguments rebuild any model.

A model spec is ``{"name": str, "kwargs": dict}``. ``name`` is a registry name (``mlp``, ...)
or a user's ``module:callable`` that returns an ``nn.Module``. The spec is stored in the study,
so every later stage (fit, landscape, connect, align) rebuilds exactly the same architecture.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from ..errors import GlobScopeError
from . import language_models

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def registered() -> list[str]:
    return sorted(_REGISTRY)


class MLP(nn.Module):
    """Fully connected ReLU network; flattens image inputs."""

    def __init__(self, in_features: int, num_classes: int, widths=(256, 256)):
        super().__init__()
        layers, prev = [], in_features
        for w in widths:
            layers += [nn.Linear(prev, int(w)), nn.ReLU()]
            prev = int(w)
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


@register("mlp")
def mlp(input_shape, num_classes, widths=(256, 256)):
    """MLP; the default (256, 256) on digits has 8.5e4 parameters and trains in seconds."""
    in_features = 1
    for s in input_shape:
        in_features *= int(s)
    if isinstance(widths, (str, bytes)) or not all(type(w) is int and w > 0 for w in widths):
        raise ValueError(f"widths must be a list of positive integers, not {widths!r}")
    return MLP(in_features, int(num_classes), tuple(widths))


@register("mnist-mlp")
def mnist_mlp(input_shape, num_classes):
    """The paper's MNIST MLP, 784-128-128-128-10 (1.35e5 parameters)."""
    return mlp(input_shape, num_classes, widths=(128, 128, 128))


# --- MLPs as lists of weight matrices (batched evaluation, alignment) -----------------------------------
MLP_MODELS = ("mlp", "mnist-mlp")  # the registry's MLPs: Linear/ReLU stacks under ``net``, any depth and width


def is_mlp(model) -> bool:
    """Is ``model`` one of the registry's MLPs: a model spec or registry name in MLP_MODELS, or an ``MLP``
    module made of Linear, ReLU, Linear, ..., ReLU, Linear only (what ``mlp_forward`` computes)."""
    if isinstance(model, dict):
        model = model.get("name")
    if isinstance(model, str):
        return model in MLP_MODELS
    if not isinstance(model, MLP):
        return False
    kinds = "".join("L" if isinstance(m, nn.Linear) else "R" if isinstance(m, nn.ReLU) else "?" for m in model.net)
    n = kinds.count("L")
    return n > 0 and kinds == "LR" * (n - 1) + "L"


def mlp_linear_layers(layout, prefix: str = "net") -> list | None:
    """[(weight entry, bias entry), ...] of an MLP's Linear layers in order (the layout's ``net.I.weight``
    [out, in] and ``net.I.bias``), or None unless the layout holds exactly these, every Linear with a bias."""
    entries = {e.name: e for e in layout.entries}
    idx = []
    for e in layout.entries:
        parts = e.name.split(".")
        if len(parts) == 3 and parts[0] == prefix and parts[1].isdigit() and parts[2] == "weight" and len(e.shape) == 2:
            idx.append(int(parts[1]))
    layers = [(entries[f"{prefix}.{i}.weight"], entries.get(f"{prefix}.{i}.bias")) for i in sorted(idx)]
    if not layers or any(b is None for _, b in layers) or 2 * len(layers) != len(layout.entries):
        return None
    return layers


def mlp_forward(ws: list, x: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Logits [B, N, classes] of B MLPs given as lists of (W, b), on inputs shared by all of them.

    ``transposed=False`` (differentiable): ``ws`` = [(W [B, out, in], b [B, out]), ...], ``x`` [N, ...].
    ``transposed=True`` (evaluation, in place, no autograd): ``x`` is the flat input transposed, [in, N];
    layer 0 is stacked, (W [B*out, in], b [B, out, 1]), the others (W [B, out, in], b [B, out, 1]).
    """
    if not transposed:
        h = x.flatten(1)[None].expand(ws[0][0].shape[0], -1, -1)
        for k, (w, b) in enumerate(ws):
            h = torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))
            if k < len(ws) - 1:
                h = torch.relu(h)
        return h
    # Activations are kept transposed, [B, features, samples]: every product then reads the
    # stored weights as they are and writes a contiguous result, so bias and ReLU run in place.
    n = x.shape[1]
    (W0, b0), rest = ws[0], ws[1:]
    B = b0.shape[0]
    # shared input: one GEMM for all models, [B*out0, in] @ [in, n]
    h = torch.mm(W0, x).view(B, -1, n)
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


def _resolve_callable(name: str):
    mod_name, _, attr = name.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:  # ImportError and errors raised while importing the user's module
        raise GlobScopeError(f"model '{name}': cannot import module '{mod_name}': {exc}") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise GlobScopeError(f"model '{name}': module '{mod_name}' has no callable '{attr}'")
    return fn


def make_spec(name: str, input_shape, num_classes: int, **kwargs) -> dict:
    """The stored spec: architecture inputs from the data set plus the user's arguments."""
    if ":" not in name and name not in _REGISTRY:
        raise GlobScopeError(f"unknown model '{name}'; registered: {', '.join(registered())}, or module:callable")
    kw = {"input_shape": [int(s) for s in input_shape], "num_classes": int(num_classes)}
    kw.update(kwargs)
    if name == "hf-causal-lm" and isinstance(kw.get("config"), str):  # a path: the study keeps the content
        kw["config"] = language_models.read_config(kw["config"])
    return {"name": name, "kwargs": kw}


def build_model(spec: dict) -> nn.Module:
    name, kwargs = spec["name"], dict(spec.get("kwargs", {}))
    if ":" in name:
        fn = _resolve_callable(name)
    elif name in _REGISTRY:
        fn = _REGISTRY[name]
    else:
        raise GlobScopeError(f"unknown model '{name}'; registered: {', '.join(registered())}, or module:callable")
    _check_size(name, fn, kwargs)
    try:
        model = fn(**kwargs)
    except (TypeError, ValueError) as exc:  # wrong names, types or values of the user's arguments
        raise GlobScopeError(f"model '{name}': bad constructor arguments {kwargs}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise GlobScopeError(f"model '{name}' did not return a torch.nn.Module")
    return model


def _check_size(name: str, fn, kwargs: dict) -> None:
    """A model too large for memory (``--model-arg widths=[1000000000]``) is refused before it is built: its
    size is counted on torch's meta device, which allocates nothing (constructors that cannot run there are
    not checked)."""
    from ..resources import F32, require

    try:
        with torch.device("meta"):
            model = fn(**kwargs)
        n = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    except Exception:  # the real build below reports what is wrong with the arguments
        return
    # the model's own size only: the interpreter and the stage's other parts are the stage's estimate, which
    # names them (a small model under a tight limit is not the model arguments' fault)
    require({f"{n:,} parameters": n * F32}, f"model '{name}' {kwargs}", hint="choose smaller model arguments (--model-arg)")


def parse_kwargs(items: list[str] | None) -> dict:
    """``["widths=[64,64]", "depth=3"]`` -> dict, values parsed as JSON where possible."""
    import json

    out = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or not key.isidentifier():
            raise GlobScopeError(f"model argument '{item}' is not KEY=VALUE")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



# --- the paper's zoo for CIFAR (issue: scale) ---------------------------------------------------------
class _BasicBlock(nn.Module):
    """ResNet basic block for CIFAR with the parameter-free "option A" shortcut of He et al. (2016)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            short = nn.functional.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return nn.functional.relu(out + short)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise GlobScopeError(f"ResNet depth must be 6n+2 (20, 32, 44, 56, 110), not {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(n):
                blocks.append(_BasicBlock(cin, cout, 2 if stage and b == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(nn.functional.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


@register("resnet20")
def resnet20(input_shape, num_classes, width=16):
    """ResNet-20 for CIFAR (0.27e6 parameters)."""
    return CifarResNet(20, int(num_classes), int(input_shape[0]), int(width))


@register("resnet56")
def resnet56(input_shape, num_classes, width=16):
    """ResNet-56 for CIFAR (0.86e6 parameters, the paper's 8.56e5)."""
    return CifarResNet(56, int(num_classes), int(input_shape[0]), int(width))


class CifarCNN(nn.Module):
    """A VGG-style CNN: conv blocks with max-pooling, then a wide classifier. The last block's 412
    channels make it the paper's size (4.72e6 parameters for CIFAR-10, 4.90e6 for CIFAR-100). ``batchnorm``: a
    BatchNorm2d after every conv (which then has no bias); off by default, so existing studies keep their layout."""

    def __init__(self, input_shape, num_classes: int, channels=(64, 128, 256, 412), hidden=2048, batchnorm=False):
        super().__init__()
        layers, cin = [], int(input_shape[0])
        for c in channels:
            if batchnorm:
                layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)]
            else:
                layers += [nn.Conv2d(cin, c, 3, padding=1)]
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            cin = c
        self.features = nn.Sequential(*layers)
        side = int(input_shape[1]) >> len(channels)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@register("cifar-cnn")
def cifar_cnn(input_shape, num_classes, channels=(64, 128, 256, 412), hidden=2048, batchnorm=False):
    """CNN of the paper's size on CIFAR: 4.73e6 parameters for 10 classes, 4.91e6 for 100."""
    if not isinstance(batchnorm, bool):
        raise ValueError(f"batchnorm must be true or false, not {batchnorm!r}")
    return CifarCNN(input_shape, int(num_classes), tuple(channels), int(hidden), batchnorm)


class ViT(nn.Module):
    """A small Vision Transformer: patch embedding, pre-norm encoder blocks, class token."""

    def __init__(self, input_shape, num_classes: int, patch=4, dim=320, depth=8, heads=8, mlp=1280):
        super().__init__()
        c, h, w = (int(s) for s in input_shape)
        if h % patch or w % patch:
            raise GlobScopeError(f"ViT: image {h}x{w} is not divisible into {patch}x{patch} patches")
        self.embed = nn.Conv2d(c, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (h // patch) * (w // patch) + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.encoder(x))[:, 0])


@register("vit")
def vit(input_shape, num_classes, patch=4, dim=320, depth=8, heads=8, mlp=1280):
    """A small ViT: 9.9e6 parameters on CIFAR with the defaults (the paper's "next: 1e7")."""
    return ViT(input_shape, int(num_classes), int(patch), int(dim), int(depth), int(heads), int(mlp))


def study_model(study) -> nn.Module:
    """A fresh model of ``study``'s architecture, checked against the layout its rows were stored in."""
    from ..storage.state_layout import StateLayout

    model = build_model(study.model_spec)
    if StateLayout.from_module(model) != study.layout:
        raise GlobScopeError(f"{study.h5_path}: the stored layout does not match model '{study.model_spec['name']}'")
    return model


# --- language models (networks/language_models.py): token ids [N, T] -> logits [N, T, vocab] ----------------
register("gpt")(language_models.gpt)
register("gpt2-small")(language_models.gpt2_small)
register("hf-causal-lm")(language_models.hf_causal_lm)
LANGUAGE_MODELS = ("gpt", "gpt2-small", "hf-causal-lm")


def check_inputs(name: str, dataset) -> None:
    """Refuse, before any work, a registry model that cannot read the data set's inputs: token ids go to the
    language models only, images and features to the others (a user's ``module:callable`` is not checked)."""
    if name not in _REGISTRY:
        return
    tokens = not dataset.train_x.is_floating_point()
    if tokens and name not in LANGUAGE_MODELS:
        raise GlobScopeError(f"model '{name}' reads images or features, but data set '{dataset.name}' is token ids: "
                             f"use a language model ({', '.join(LANGUAGE_MODELS)})")
    if not tokens and name in LANGUAGE_MODELS:
        raise GlobScopeError(f"model '{name}' is a language model, but data set '{dataset.name}' is not text: "
                             "use a text data set such as pydoc-text")
