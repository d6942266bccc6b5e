"""Memory estimates that hold (issue 24, item 2): what a stage prints when it starts is its peak within 25%.

Each stage runs as the real command in its own process; the test reads the ``memory: about ...`` line it printed
and the process's peak resident memory (ru_maxrss of that child, from os.wait4). The studies are tiny, so the
interpreter, torch and the libraries a stage loads are nearly all of the peak: the part the estimates missed.
bench/bench_memory.py does the same on six studies up to 1.7e7 parameters.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import make_study

from globscope_core.networks import datasets
from globscope_core.reducers import fit_reducer
from globscope_core.stages.train import train_study

LINE = re.compile(r"memory: about ([\d.]+) (GiB|MiB) expected \(")
CNN = {"channels": [8, 16], "hidden": 32}  # cifar-cnn on the 8x8 digits: convolutions, BatchNorm, 1e4 parameters


def measured(*args) -> tuple[float | None, int, str]:
    """``globscope ARGS`` in a child of its own: (the estimate it printed in bytes, its peak resident bytes, stderr)."""
    exe = os.path.join(os.path.dirname(sys.executable), "globscope")
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([exe, *map(str, args)], stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        err.seek(0)
        text = err.read()
    assert os.waitstatus_to_exitcode(status) == 0, text
    m = LINE.search(text)
    est = float(m.group(1)) * (2**30 if m.group(2) == "GiB" else 2**20) if m else None
    return est, usage.ru_maxrss * 1024, text


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two tiny trained studies with an autoencoder fitted: an MLP and a small CNN (BatchNorm), on digits."""
    out = {}
    root = tmp_path_factory.mktemp("memory")
    out["mlp"] = make_study(root / "mlp", runs=2, epochs=6)
    out["cnn"] = train_study(str(root / "cnn"), datasets.make_spec("digits"), "cifar-cnn", CNN, runs=2, epochs=6,
                             progress=False)
    for s in out.values():
        fit_reducer(s, "ae", 2, epochs=100, device="cpu")
    return out


@pytest.mark.parametrize("stage", ["fit", "landscape"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_estimate_printed_at_start_is_the_peak_within_25_percent(fitted, tmp_path, model, stage):
    d = tmp_path / "study"
    shutil.copytree(fitted[model].dir, d)
    if stage == "fit":  # with the held-out fit and the metrics, as a user runs it
        args = ("fit", d, "--reducer", "ae", "--epochs", "100", "--eval-samples", "64", "--device", "cpu")
    else:
        args = ("landscape", d, "--reducer", "ae-2d", "--resolution", "9", "--eval-samples", "64", "--device", "cpu")
    est, peak, err = measured(*args)
    assert est is not None, f"{stage} printed no memory estimate:\n{err}"
    bars = err.find("%|")  # said when it starts: before the first progress bar
    assert bars == -1 or err.index("memory: about") < bars, err
    assert 0.8 <= est / peak <= 1.25, f"{model} {stage}: estimate {est / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB\n{err}"
