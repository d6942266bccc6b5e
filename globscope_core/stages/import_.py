"""Importing existing checkpoints (state_dict files or safetensors) into a study.

Checkpoints are untrusted: ``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)``,
which refuses pickled code; ``.safetensors`` files hold tensors only.
"""
from __future__ import annotations

import os
import stat
import warnings

import torch

from ..errors import GlobScopeError
from ..evaluation.one_model import evaluate_model, subset
from ..networks import datasets, models
from ..networks.device import resolve_device
from ..storage.safe_write import check_writable
from ..storage.state_layout import StateLayout
from ..storage.study import Study
from ..storage.study_files import study_h5

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def check_regular_file(path: str) -> None:
    """Refuse, without opening it, what is not a regular file: reading a FIFO would wait forever for a writer,
    a device never ends."""
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
        if not model_name or not dataset:
            raise GlobScopeError(f"{study_dir}: new study: give --model and --dataset")
        study = None
    ds = datasets.load_dataset(dataset)
    if study is None:
        spec = models.make_spec(model_name, ds.input_shape, ds.num_classes, **(model_kwargs or {}))
    model = models.build_model(spec).to(dev)
    layout = StateLayout.from_module(model)
    if study is not None and study.layout != layout:
        raise GlobScopeError(f"{study.h5_path}: stored layout does not match model '{spec['name']}'")
    ev_train = subset(ds.train_x, ds.train_y, eval_samples, seed=1)
    ev_test = subset(ds.test_x, ds.test_y, eval_samples, seed=2)

    rows = []  # load and check every file before writing anything
    for i, path in enumerate(files):
        state = load_state_file(path)
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
