"""Landscape beyond one machine: ``torchrun --nnodes 2``, two node agents on this machine meeting on 127.0.0.1.

Each node is its own torchrun (``--nproc-per-node 1``), as on a cluster where every node starts one; the field
must equal the single process's bit for bit. Static rendezvous (``--master-addr``/``--master-port``, the README's
cluster command: also an interrupted landscape resumed from both nodes' chunks) and c10d rendezvous
(``--rdzv-endpoint``, the README's Slurm command) are both checked.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from globscope_core.reducers import fit_reducer
from globscope_core.storage.vtk_files import read_vti

VENV_BIN = os.path.dirname(sys.executable)
# one thread, as torchrun's workers run: the bitwise comparison needs the same GEMM rounding (test_stage_landscape.py)
ENV = dict(os.environ, OMP_NUM_THREADS="1")
NODE_ENV = dict(ENV, GLOBSCOPE_DEBUG="1")  # a worker's unexpected error comes with its traceback in the failure
TIMEOUT = 240  # seconds for both nodes together; on expiry every process of the test is killed and the test fails


def _free_port() -> int:
    """A port free now on the loopback address (the OS picks it: two test runs never share one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_using(path: str) -> list[int]:
    """Processes whose command line names ``path`` (the test's own study directory: torchrun agents and workers;
    the workers run in sessions of their own, so a process group does not reach them)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if path.encode() in argv:
            out.append(int(d))
    return out


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _field(study_dir):
    return read_vti(os.path.join(study_dir, "landscape-2d.vti"))


def _two_nodes(study: str, args: list, rendezvous: str, logs_dir) -> None:
    """``globscope ARGS`` under two torchrun agents, node ranks 0 and 1 of one process each, meeting on 127.0.0.1;
    both must exit 0 within TIMEOUT and leave no process behind."""
    port = _free_port()
    if rendezvous == "static":
        meet = ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    else:
        meet = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}"]
    nodes, paths = [], [os.path.join(logs_dir, f"node-{r}-{port}.log") for r in (0, 1)]
    for node_rank in (0, 1):
        cmd = [os.path.join(VENV_BIN, "torchrun"), "--nnodes", "2", "--node-rank", str(node_rank),
               "--nproc-per-node", "1", *meet, "-m", "globscope_core.cli", *args]
        with open(paths[node_rank], "wb") as log:  # a file, not a pipe: no full pipe can block a node
            nodes.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=NODE_ENV))
    deadline, timed_out = time.monotonic() + TIMEOUT, False
    try:
        for p in nodes:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # one node failed and the other waits for it, or both hang: kill them all
        timed_out = True
        for p in nodes:  # the agents first, so that none starts a worker after the sweep below
            p.kill()
            p.wait()
        _kill(_pids_using(study))  # their workers, in sessions of their own, outlive them
    logs = "".join(f"\n--- node {r} (exit {p.returncode}):\n{open(path, errors='replace').read()[-4000:]}"
                   for r, (p, path) in enumerate(zip(nodes, paths)))
    assert not timed_out, f"two-node torchrun did not finish in {TIMEOUT} s (killed){logs}"
    assert [p.returncode for p in nodes] == [0, 0], logs
    leftover = _pids_using(study)
    _kill(leftover)
    assert not leftover, f"processes left running after both nodes exited: {leftover}"


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_give_the_single_process_field_and_resume(study_copy, tmp_path, rendezvous):
    fit_reducer(study_copy, "pca", 2)
    study = study_copy.dir
    args = ["landscape", study, "--reducer", "pca-2d", "--resolution", "11", "--chunk-points", "7",
            "--eval-samples", "100", "--no-progress"]
    r = subprocess.run([sys.executable, "-m", "globscope_core.cli", *args], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    single = _field(study)
    os.remove(os.path.join(study, "landscape-2d.vti"))

    partial = os.path.join(study, ".landscape-2d.partial")
    resumed = rendezvous == "static"  # resuming does not depend on the rendezvous: checked once
    if resumed:
        # stopped after two chunks per process: both nodes' chunks are in the one partial directory (18 chunks:
        # rank 0 takes 0, 2, 4, ..., rank 1 takes 1, 3, 5, ...)
        _two_nodes(study, [*args, "--fresh", "--max-chunks", "2"], rendezvous, tmp_path)
        assert sorted(f for f in os.listdir(partial) if f.startswith("chunk-")) == \
            [f"chunk-{k:06d}.npz" for k in (0, 1, 2, 3)]
        assert not os.path.exists(os.path.join(study, "landscape-2d.vti"))

    # static: the rerun resumes (rank 0 finds both nodes' chunks, the 14 missing ones are shared out); c10d: fresh
    _two_nodes(study, args if resumed else [*args, "--fresh"], rendezvous, tmp_path)
    report = json.load(open(os.path.join(study, "report.json")))["landscape-2d"]
    assert report["processes"] == 2 and report["complete"]
    assert report["points_computed_now"] == (121 - 4 * 7 if resumed else 121)
    assert not os.path.exists(partial)  # rank 0 removed every node's chunks
    multi = _field(study)
    for name in ("loss", "accuracy", "trust", "trusted"):
        np.testing.assert_array_equal(multi.point_arrays[name], single.point_arrays[name])
