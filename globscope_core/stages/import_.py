"""Importing existing checkpoints (state_dict files, safetensors, Hugging Face model directories) into a study.

Checkpoints are untrusted: ``.pt``/``.pth``/``.bin`` files are read with ``torch.load(weights_only=True)``,
which refuses pickled code; ``.safetensors`` files hold tensors only. A Hugging Face directory's config.json
is read as JSON data, never as code (``trust_remote_code`` is never set).
"""
from __future__ import annotations

import json
import os
import stat
import warnings

import torch

from ..errors import GlobScopeError
from ..evaluation.one_model import evaluate_model, subset
from ..networks import datasets, models
from ..networks.device import resolve_device
from ..networks.language_models import full_config, read_config
from ..storage.safe_write import check_writable
from ..storage.state_layout import StateLayout
from ..storage.study import Study
from ..storage.study_files import study_h5

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def check_regular_file(path: str) -> None:
    """Refuse, without opening it, what is not a regular file: reading a FIFO would wait forever for a writer,
    a device never ends. A directory with a config.json is a Hugging Face model (``load_hf_directory``)."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise GlobScopeError(f"{path}: checkpoint file does not exist") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a special file")
        raise GlobScopeError(f"{path}: is {kind}, not a checkpoint file; give a regular file (it was not opened)")


def load_state_file(path: str) -> dict:
    """A flat {name: tensor} state_dict from a checkpoint file, without running any pickled code."""
    check_regular_file(path)
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file

            return load_file(path)
        except Exception as exc:
            raise GlobScopeError(f"{path}: not a readable safetensors file: {exc}") from None
    try:
        with warnings.catch_warnings():  # torch's own warnings about the pickle (protocol, legacy format): the
            warnings.simplefilter("ignore")  # refusal below says what matters, in one line
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GlobScopeError(f"{path}: cannot load as a weights-only checkpoint ({_load_reason(exc)})") from None
    for key in _NESTED_KEYS:  # common wrappers: {"state_dict": {...}, "epoch": ...}
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise GlobScopeError(f"{path}: does not hold a state_dict (a dict of tensors)")
    # DataParallel checkpoints prefix every key with "module."
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


# --- Hugging Face model directories ---------------------------------------------------------------------
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # each alone, or sharded with an ``.index.json``
HF_PREFIX = "lm."  # networks.language_models.HFCausalLM keeps the Hugging Face model as ``lm``


def hf_weight_files(directory: str) -> list[str]:
    """The weight files of a Hugging Face model directory: one file, or every shard its index names."""
    for name in HF_WEIGHTS:
        index = os.path.join(directory, name + ".index.json")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise GlobScopeError(f"{index}: not a shard index with a weight_map ({exc})") from None
            files = [os.path.join(directory, s) for s in shards]
            missing = [s for s, f in zip(shards, files) if not os.path.isfile(f)]
            if missing:
                raise GlobScopeError(f"{index}: {len(missing)} of {len(shards)} shards are missing: "
                                     f"{', '.join(missing[:3])}")
            return files
        if os.path.isfile(os.path.join(directory, name)):
            return [os.path.join(directory, name)]
    raise GlobScopeError(f"{directory}: Hugging Face model directory without weights (no "
                         f"{' or '.join(HF_WEIGHTS)}, nor a sharded index)")


# keys that name, label or tokenize, but do not change the function the weights compute
_CONFIG_BOOKKEEPING = ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "use_cache",
                       "id2label", "label2id", "task_specific_params", "tokenizer_class", "prefix")


def check_same_config(stored: dict, found: dict, directory: str) -> None:
    """Refuse a Hugging Face directory whose architecture differs from the study's (bookkeeping keys aside)."""
    stored, found = full_config(stored), full_config(found)
    keys = sorted(k for k in (set(stored) | set(found)) - set(_CONFIG_BOOKKEEPING) if not k.endswith("_token_id"))
    differ = [k for k in keys if stored.get(k) != found.get(k)]
    if differ:
        k = differ[0]
        raise GlobScopeError(f"{os.path.join(directory, 'config.json')}: another architecture than the study's "
                             f"({k}: {found.get(k)!r}, the study has {stored.get(k)!r}"
                             f"{f'; {len(differ) - 1} more keys differ' if len(differ) > 1 else ''})")


def load_hf_directory(directory: str, layout: StateLayout, base_prefix: str | None = None) -> dict:
    """The state of a Hugging Face model directory under the names of ``layout`` (``lm.`` + Hugging Face's).

    Checkpoints of a base model (``h.0.attn...`` where the causal LM says ``transformer.h.0.attn...``) are
    matched with ``base_prefix``; entries the layout does not have (a tied output layer, old attention masks)
    are left out.
    """
    raw = {}
    for path in hf_weight_files(directory):
        raw.update(load_state_file(path))
    state = {}
    for e in layout.entries:
        key = e.name[len(HF_PREFIX):] if e.name.startswith(HF_PREFIX) else e.name
        if key not in raw and base_prefix and key.startswith(base_prefix + "."):
            key = key[len(base_prefix) + 1:]
        if key in raw:
            state[e.name] = raw[key]
    return state


def _load_reason(exc: Exception) -> str:
    """torch's reason without its advice: "re-running with weights_only=False will likely succeed" is wrong
    advice for an untrusted file (it would run the pickled code)."""
    import re

    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"Unsupported operand \d+", text)
    if found:
        what = found.group(1) if found.groups() else found.group(0)
        return f"it holds pickled objects beyond tensors ({what}); they are never run, so it is refused"
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds pickled objects beyond tensors; they are never run, so it is refused"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def flatten_checked(layout: StateLayout, state: dict, path: str) -> torch.Tensor:
    """Flatten a checkpoint of any floating precision (float16, bfloat16, float64, mixed) to float32.

    Refused with the entry named: integer/bool/complex tensors where the model has floating ones
    (quantized checkpoints), and float64 values outside float32's range (they would become Inf).
    """
    layout.check(state, path)
    for e in layout.entries:
        t = state[e.name]
        if not t.is_floating_point():
            raise GlobScopeError(f"{path}: '{e.name}' is {str(t.dtype).replace('torch.', '')}, the model expects a "
                                 f"floating tensor ({e.dtype}); quantized or integer checkpoints are not supported")
    vec = layout.flatten(state, source=path)
    if not torch.isfinite(vec).all():
        bad = int((~torch.isfinite(vec)).nonzero()[0, 0])
        name = next(e.name for e in layout.entries if e.offset <= bad < e.offset + e.numel)
        raise GlobScopeError(f"{path}: '{name}' has values that are NaN or Inf in float32 (the study stores "
                             "float32; float64 values beyond 3.4e38 overflow)")
    return vec


def import_checkpoints(study_dir: str, files: list[str], model_name: str | None = None,
                       model_kwargs: dict | None = None, dataset: dict | None = None, steps: list[int] | None = None,
                       label: str = "imported", eval_samples: int | None = 10000, device: str = "auto") -> Study:
    """Add the files, in order, as the trajectory of one new run (creating the study if needed)."""
    if not files:
        raise GlobScopeError("import: no checkpoint files given")
    if steps is not None and len(steps) != len(files):
        raise GlobScopeError(f"import: {len(steps)} steps given for {len(files)} files")
    for path in files:  # before any work, and never opened
        check_regular_file(path)
    dev = resolve_device(device)
    check_writable(study_dir, what="import")
    if os.path.exists(study_h5(study_dir)):
        study = Study.open(study_dir)
        spec, dataset = study.model_spec, study.dataset_spec
    else:
        if not dataset or not (model_name or any(os.path.isdir(p) for p in files)):
            raise GlobScopeError(f"{study_dir}: new study: give --model and --dataset")
        study = None
    ds = datasets.load_dataset(dataset)
    hf_dirs = [p for p in files if os.path.isdir(p)]
    if study is None:
        model_kwargs = dict(model_kwargs or {})
        if hf_dirs and model_name in (None, "hf-causal-lm"):  # the architecture is the directory's config.json
            model_name = "hf-causal-lm"
            model_kwargs.setdefault("config", read_config(hf_dirs[0]))
        models.check_inputs(model_name, ds)
        spec = models.make_spec(model_name, ds.input_shape, ds.num_classes, **model_kwargs)
    if spec["name"] == "hf-causal-lm":
        for path in hf_dirs:  # shapes alone would not show another activation or norm
            check_same_config(spec["kwargs"]["config"], read_config(path), path)
    model = models.build_model(spec).to(dev)
    layout = StateLayout.from_module(model)
    if study is not None and study.layout != layout:
        raise GlobScopeError(f"{study.h5_path}: stored layout does not match model '{spec['name']}'")
    ev_train = subset(ds.train_x, ds.train_y, eval_samples, seed=1)
    ev_test = subset(ds.test_x, ds.test_y, eval_samples, seed=2)

    rows = []  # load and check every file before writing anything
    base_prefix = getattr(getattr(model, "lm", None), "base_model_prefix", None)
    for i, path in enumerate(files):
        state = load_hf_directory(path, layout, base_prefix) if os.path.isdir(path) else load_state_file(path)
        vec = flatten_checked(layout, state, path)
        layout.load_into(model, vec.to(dev))
        tl, ta = evaluate_model(model, *ev_train, device=dev)
        vl, va = evaluate_model(model, *ev_test, device=dev)
        rows.append((steps[i] if steps else i, vec.numpy(), dict(train_loss=tl, train_acc=ta, test_loss=vl, test_acc=va)))
    if study is None:
        study = Study.create(study_dir, spec, dataset, layout)
    with study.transaction(extra_bytes=sum(v.nbytes for _, v, _ in rows)) as w:
        # imported runs take no place in the training plan (no seed, no plan index): train --resume skips nothing
        r = w.add_run(seed=None, optimizer=None, lr=None, label=label, index=None, imported=True, complete=True,
                      files=[os.path.abspath(f) for f in files])
        for step, vec, m in rows:
            w.append(r, step, vec, **m)
    return study
