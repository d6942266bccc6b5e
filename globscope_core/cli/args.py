"""Argument types shared by the subcommands (argparse refuses a bad value with one line naming the option), and
the data set and model options that train and import share.

Use them as ``type=`` (``p.add_argument("--epochs", type=positive_int)``), so a value is checked before any work.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

from ..storage.study_files import study_h5


def _number(kind, text: str, what: str):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return v


def _checked(kind, rule: str, ok):
    """A number of ``kind`` (int or float) for which ``ok(v)`` holds; otherwise "must be <rule>, not <value>"."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        v = _number(kind, text, what)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {v if kind is int else text}")
        return v

    parse.__name__ = rule
    return parse


positive_int = _checked(int, "a positive integer", lambda v: v > 0)
nonnegative_int = _checked(int, "0 or more", lambda v: v >= 0)
positive_float = _checked(float, "a positive number", lambda v: v > 0)
nonnegative_float = _checked(float, "0 or more", lambda v: v >= 0)
finite_float = _checked(float, "a finite number", lambda v: True)
port = _checked(int, "a port from 0 to 65535", lambda v: 0 <= v <= 65535)
# every --seed and --data-seed: numpy's RandomState (scikit-learn's KernelPCA, UMAP) takes seeds below 2**32, torch
# below 2**64 (and train adds the run number); one range for all, so a seed that works for one command works for all
SEED_LIMIT = 2**32
seed = _checked(int, f"a seed from 0 to {SEED_LIMIT - 1}", lambda v: 0 <= v < SEED_LIMIT)


def csv_of(kind):
    """A comma-separated list whose items are checked by ``kind`` (one of the types above, or int/float/str)."""

    def parse(text: str) -> list:
        items = [t for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
        out = []
        for t in items:
            try:
                out.append(kind(t.strip()))
            except ValueError:
                raise argparse.ArgumentTypeError(f"cannot parse '{t}' in '{text}'") from None
        return out

    parse.__name__ = f"list of {getattr(kind, '__name__', 'values')}"
    return parse


def at_least(low: int):
    """An integer >= ``low`` (e.g. grid points per axis: at_least(2))."""
    return _checked(int, f"at least {low}", lambda v: v >= low)


def zero_or_at_least(low: int):
    """0 (meaning: none / off) or an integer >= ``low``."""
    return _checked(int, f"0 or at least {low}", lambda v: v == 0 or v >= low)


def one_of(*choices: str):
    """A string from ``choices``; with csv_of, a comma list of them (argparse's choices= cannot check lists)."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"'{text}' is not one of {', '.join(choices)}")
        return text

    parse.__name__ = "one of " + ", ".join(choices)
    return parse


_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


def device(text: str) -> str:
    """auto, cpu, cuda, cuda:N or mps (checked without importing torch; whether a GPU is there is checked before
    any work, networks/device.py). MPS is Apple's GPU: elsewhere no torch build has it, so it is refused here."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a device (use auto, cpu, cuda, cuda:N or mps)")
    if text == "mps" and sys.platform != "darwin":
        raise argparse.ArgumentTypeError(f"'mps' is Apple's GPU (macOS only), not available on {sys.platform} "
                                         "(use auto, cpu, or cuda where there is an NVIDIA GPU)")
    return text


def bounds(text: str) -> list:
    """lo,hi per axis: an even count of finite numbers with lo < hi (the count per dimension is checked later)."""
    vals = []
    for t in text.split(","):
        try:
            vals.append(_number(float, t.strip(), "a number"))
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"in '{text}': {exc}") from None
    if len(vals) not in (4, 6):
        raise argparse.ArgumentTypeError(f"expected lo,hi per axis (4 numbers in 2D, 6 in 3D), got {len(vals)} in '{text}'")
    bad = [i for i in range(0, len(vals), 2) if not vals[i] < vals[i + 1]]
    if bad:
        raise argparse.ArgumentTypeError(f"lo must be below hi on every axis ('{text}', axis {bad[0] // 2})")
    if not all(math.isfinite(vals[i + 1] - vals[i]) for i in range(0, len(vals), 2)):
        raise argparse.ArgumentTypeError(f"'{text}': an axis is wider than a float can hold")
    return vals


def existing_file(what: str = "file"):
    """An existing file (not a directory); ``what`` names it in the message, e.g. "checkpoint file"."""

    def parse(text: str) -> str:
        if not os.path.exists(text):
            raise argparse.ArgumentTypeError(f"{text}: {what} does not exist")
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"{text}: is a directory, not a {what}")
        return text

    parse.__name__ = what
    return parse


def checkpoint_path(text: str) -> str:
    """A checkpoint file, or a Hugging Face model directory (config.json with safetensors or .bin weights)."""
    if os.path.isdir(text) and not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"{text}: is a directory, not a checkpoint file (nor a Hugging Face model "
                                         "directory: it has no config.json)")
    return text if os.path.isdir(text) else existing_file("checkpoint file")(text)


checkpoint_path.__name__ = "checkpoint"


def existing_dir(text: str, what: str = "directory") -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: {what} does not exist")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a file, not a directory")
    return text


def new_or_dir(text: str) -> str:
    """A directory that may not exist yet (it is created), but not a file."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a file, not a directory")
    return text


def study_dir(text: str) -> str:
    """An existing study directory (one with study.h5); the file's content is checked when it is opened."""
    existing_dir(text, "study directory")
    if not os.path.isfile(study_h5(text)):
        raise argparse.ArgumentTypeError(f"{text}: not a study (no study.h5; make one with `globscope train --out {text}`)")
    return text


# --- options shared by train and import --------------------------------------------------------
def add_dataset_args(p, required=True):
    p.add_argument("--dataset", required=required,
                   help="digits, mnist-5k, pydoc-text (built in), mnist, cifar10, cifar100 (local files), or module:callable")
    p.add_argument("--data-dir", help="directory with the data files (MNIST IDX, CIFAR python batches)")
    p.add_argument("--data-seed", type=seed, default=0, help="seed of the digits train/test split")


def add_model_args(p, required=True):
    p.add_argument("--model", required=required, help="registered model name or module:callable")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="constructor argument, JSON value (e.g. widths=[512,512]); repeatable")


def dataset_spec(args):
    """The data set spec of --dataset, --data-dir and --data-seed."""
    from ..networks import datasets  # imports torch: only for the commands that need it

    return datasets.make_spec(args.dataset, args.data_dir, args.data_seed)
