"""Shared fixtures and helpers: small real studies trained on digits (seconds, not minutes), the installed command."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
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


def run_cli(*args, env=None):
    """Run the installed command in a subprocess (``env``: variables added to ours): exit status, stdout, stderr."""
    exe = os.path.join(os.path.dirname(sys.executable), "globscope")
    p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    return p.returncode, p.stdout, p.stderr


def one_line_error(rc, err, *needles):
    """Exit status 2 and one line on stderr, no traceback, holding every needle."""
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def random_perms(spec, layout, seed):
    """A random permutation of every permutable axis of ``spec`` on ``layout``."""
    rng = np.random.default_rng(seed)
    return {p: rng.permutation(n) for p, n in spec.identity(layout).items()}
