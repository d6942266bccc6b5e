"""pydoc-text with a fixed part of its training split (bench_lm.py): a run then takes a few dozen steps, not 393
per epoch. ``--dataset lm_data:pydoc_part`` with bench/ on PYTHONPATH; LM_TRAIN_SEQUENCES sequences (the first of
the split, which is in topic order), the whole test split."""
from __future__ import annotations

import os

from globscope_core.networks.datasets import load_dataset, make_spec


def pydoc_part():
    ds = load_dataset(make_spec("pydoc-text"))
    n = int(os.environ.get("LM_TRAIN_SEQUENCES", "108"))
    return ds.train_x[:n], ds.train_y[:n], ds.test_x, ds.test_y, ds.num_classes
