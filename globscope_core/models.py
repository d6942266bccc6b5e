"""The model registry: a name and JSON-able constructor arguments rebuild any model.

A model spec is ``{"name": str, "kwargs": dict}``. ``name`` is a registry name (``mlp``, ...)
or a user's ``module:callable`` that returns an ``nn.Module``. The spec is stored in the study,
so every later stage (fit, landscape, connect, align) rebuilds exactly the same architecture.
"""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from .errors import GlobScopeError

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
    return MLP(in_features, int(num_classes), tuple(widths))


@register("mnist-mlp")
def mnist_mlp(input_shape, num_classes):
    """The paper's MNIST MLP, 784-128-128-128-10 (1.35e5 parameters)."""
    return mlp(input_shape, num_classes, widths=(128, 128, 128))


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
    return {"name": name, "kwargs": kw}


def build_model(spec: dict) -> nn.Module:
    name, kwargs = spec["name"], dict(spec.get("kwargs", {}))
    if ":" in name:
        fn = _resolve_callable(name)
    elif name in _REGISTRY:
        fn = _REGISTRY[name]
    else:
        raise GlobScopeError(f"unknown model '{name}'; registered: {', '.join(registered())}, or module:callable")
    try:
        model = fn(**kwargs)
    except TypeError as exc:
        raise GlobScopeError(f"model '{name}': bad constructor arguments {kwargs}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise GlobScopeError(f"model '{name}' did not return a torch.nn.Module")
    return model


def parse_kwargs(items: list[str] | None) -> dict:
    """``["widths=[64,64]", "depth=3"]`` -> dict, values parsed as JSON where possible."""
    import json

    out = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep:
            raise GlobScopeError(f"model argument '{item}' is not KEY=VALUE")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

