"""Shared fixtures: small real studies trained on digits (seconds, not minutes)."""
from __future__ import annotations

import os

import pytest
import torch

from globscope_core.networks import datasets
from globscope_core.stages.train import train_study
from globscope_core.storage.study import Study

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_study(path, runs=3, epochs=6, widths=(32,), every=None, seed=0, **kw) -> Study:
    """A real digits study: ``runs`` MLPs trained for ``epochs`` epochs."""
    return train_study(str(path), datasets.make_spec("digits"), "mlp", {"widths": list(widths)}, runs=runs,
                       epochs=epochs, every=every, seed=seed, progress=False, **kw)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Study:
    """3 runs of a 64-32-10 MLP (2410 parameters), 6 epochs, a checkpoint per epoch: 21 checkpoints.

    Session-scoped and shared: tests must not write into it (copy it first, see ``study_copy``).
    """
    return make_study(tmp_path_factory.mktemp("tiny") / "study")


@pytest.fixture
def study_copy(tiny_study, tmp_path) -> Study:
    """A private copy of tiny_study that a test may modify."""
    import shutil

    dst = tmp_path / "study"
    shutil.copytree(tiny_study.dir, dst)
    return Study.open(str(dst))
