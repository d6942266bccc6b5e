"""Shared fixtures and helpers: small real studies trained on digits (seconds, not minutes), the installed command."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from globscope_core.networks import datasets
from globscope_core.stages.train import train_study
from globscope_core.storage.study import Study

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def default_signals() -> None:
    """``preexec_fn`` for a child that is sent SIGINT or SIGHUP: a test run started in the background of a
    script (or under nohup) passes them on ignored, and Python then never raises KeyboardInterrupt."""
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


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


@pytest.fixture(scope="session")
def wide_pair(tmp_path_factory):
    """3 runs of a 64-64 MLP on digits, 20 epochs (weight matching leaves a barrier a refinement can lower), with
    the final models of runs 0 and 1: (study, its spec, (row, state) of run 0, (row, state) of run 1). Read only."""
    import torch

    from globscope_core.alignment.permutation import spec_for_model
    from globscope_core.networks.models import study_model

    study = make_study(tmp_path_factory.mktemp("wide") / "study", runs=3, epochs=20, widths=(64, 64))
    rows = [int(study.run_rows(r)[-1]) for r in (0, 1)]
    states = [study.layout.unflatten(torch.from_numpy(study.read_params([r])[0])) for r in rows]
    return study, spec_for_model(study.model_spec, study.layout, study_model(study)), *zip(rows, states)


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


# --- fault helpers (tests/test_faults*.py) ----------------------------------------------------------
def make_ready_study(d):
    """A small study with a pca-2d reducer, a 9x9 landscape and its merge tree (the inputs of every stage),
    and a checkpoint file next to it: (study dir, checkpoint path)."""
    from globscope_core.reducers import fit_reducer
    from globscope_core.stages.landscape import compute_landscape
    from globscope_core.stages.topology import study_topology

    s = make_study(d, runs=3, epochs=3, widths=(16,), eval_samples=256)
    fit_reducer(s, "pca", 2)
    compute_landscape(s, "pca-2d", 9, eval_samples=64, progress=False)
    study_topology(str(d), dim=2, verbose=False)
    ck = str(d.parent / "ck.pt")
    torch.save(s.layout.unflatten(torch.from_numpy(s.read_params([0])[0] + 0.01)), ck)
    return str(d), ck


def file_digests(d):
    """{relative path: sha256} of every file under ``d`` (locks excluded: they are empty by design)."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            if not f.endswith(".lock"):
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, d)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def leftovers(d):
    """Temporaries (``*.tmp*``) anywhere under ``d``."""
    return [p for p in glob.glob(os.path.join(d, "**", "*"), recursive=True) if ".tmp" in os.path.basename(p)]


@contextlib.contextmanager
def tmpfs(path, size="20m"):
    """A real small file system at ``path`` (we are root in CI; elsewhere the case is skipped with the reason)."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'}); full-disk and read-only "
                    "cases need one")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory, leave: int = 0) -> str:
    """Fill the file system of ``directory`` until about ``leave`` bytes are free (0: until it is full)."""
    path = os.path.join(directory, "filler")
    with open(path, "wb", buffering=0) as fh:
        try:
            while shutil.disk_usage(directory).free > leave:
                fh.write(b"\0" * max(4096, min(1 << 20, shutil.disk_usage(directory).free - leave)))
        except OSError:  # full
            pass
    return path
