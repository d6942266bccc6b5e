"""Storage (storage/): the flat state layout, the study.h5 store, transactions, a killed writer, refusals."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from globscope_core.errors import GlobScopeError
from globscope_core.networks import models
from globscope_core.storage.state_layout import StateLayout
from globscope_core.storage.study import Study


# --- flat layout --------------------------------------------------------------------------------
class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_flatten_unflatten_rebuilds_identical_model():
    torch.manual_seed(0)
    net = BNNet()
    net.train()
    net(torch.randn(16, 1, 8, 8))  # moves BN running statistics away from their defaults
    net.eval()
    layout = StateLayout.from_module(net)
    names = [e.name for e in layout.entries]
    assert "bn.running_mean" in names and "bn.running_var" in names
    assert "bn.num_batches_tracked" not in names  # integer buffer: not a landscape coordinate
    vec = layout.flatten(net.state_dict())
    assert vec.shape == (layout.size,) and layout.size == sum(
        t.numel() for t in net.state_dict().values() if t.is_floating_point())
    fresh = BNNet().eval()
    layout.load_into(fresh, vec)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(fresh(x), net(x))
    # batched views agree with single unflatten; JSON round trip keeps the layout
    batch = torch.stack([vec, 2 * vec])
    views = layout.unflatten_batch(batch)
    assert torch.equal(views["bn.running_var"][1], 2 * net.bn.running_var)
    assert StateLayout.from_json(layout.to_json()) == layout


def test_flatten_reports_shape_mismatch():
    layout = StateLayout.from_module(models.mlp((1, 8, 8), 10, widths=(16,)))
    wrong = models.mlp((1, 8, 8), 10, widths=(17,)).state_dict()
    with pytest.raises(GlobScopeError, match=r"ckpt.pt: does not match the model: 'net.0.weight' has shape"):
        layout.flatten(wrong, source="ckpt.pt")



# --- store ----------------------------------------------------------------------------------------
def _new_study(tmp_path, n_params=7):
    layout = StateLayout.from_state_dict({"w": torch.zeros(n_params)})
    return Study.create(str(tmp_path / "s"), {"name": "mlp", "kwargs": {}}, {"name": "digits"}, layout)


def test_store_round_trip_and_append(tmp_path):
    s = _new_study(tmp_path)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 7)).astype(np.float32), rng.standard_normal((2, 7)).astype(np.float32)
    with s.transaction() as w:
        r = w.add_run(seed=1, optimizer="sgd", lr=0.1, label="x")
        w.append(r, [0, 5, 10], a, train_loss=[3.0, 2.0, 1.0], test_acc=0.5)
    with s.transaction() as w:
        r2 = w.add_run(seed=2, optimizer="adam", lr=0.01, label="y")
        w.append(r2, [0, 7], b, train_loss=[4.0, 0.5])
    s2 = Study.open(s.dir)
    assert s2.n_checkpoints == 5 and s2.n_params == 7
    np.testing.assert_array_equal(s2.read_params(), np.concatenate([a, b]))
    np.testing.assert_array_equal(s2.read_params([4, 0, 4]), np.stack([b[1], a[0], b[1]]))
    assert list(s2.run) == [0, 0, 0, 1, 1] and list(s2.step) == [0, 5, 10, 0, 7]
    assert s2.runs[1]["optimizer"] == "adam" and s2.runs[0]["seed"] == 1
    assert s2.final_rows() == {0: 2, 1: 4}
    assert np.isnan(s2.metrics["test_loss"]).all() and s2.metrics["test_acc"][0] == 0.5
    blocks = list(s2.iter_params(block_rows=2))
    assert [len(i) for i, _ in blocks] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([blk for _, blk in blocks]), s2.read_params())


def test_failed_transaction_changes_nothing(tmp_path):
    s = _new_study(tmp_path)
    with s.transaction() as w:
        w.append(w.add_run(seed=0), [0], np.ones(7))
    before = open(s.h5_path, "rb").read()
    with pytest.raises(RuntimeError):
        with s.transaction() as w:
            w.append(w.add_run(seed=1), [0, 1], np.zeros((2, 7)))
            raise RuntimeError("boom")
    assert open(s.h5_path, "rb").read() == before
    assert not [f for f in os.listdir(s.dir) if ".tmp-" in f]


def test_rows_that_read_back_differently_change_nothing(tmp_path):
    """A commit reads the rows it wrote back from the new file, a row at a time, bit for bit: one that differs
    (here the caller's array changed after it was appended; on a disk, a bad write) is refused with its row, and
    the study stays as it was. NaN rows with the same bits pass."""
    s = _new_study(tmp_path, n_params=5_000_000)  # more than one comparison slice a row
    nan_rows = np.full((2, s.n_params), np.nan, np.float32)
    with s.transaction() as w:
        w.append(w.add_run(seed=0), [0, 1], nan_rows)
    before = open(s.h5_path, "rb").read()
    for changed in (1.0, -0.0):  # another value; the other zero (equal to 0.0 as a number, not in its bits)
        rows = np.zeros((2, s.n_params), np.float32)
        with pytest.raises(GlobScopeError, match=r"row 3 read back differently"):
            with s.transaction() as w:
                w.append(w.add_run(seed=1), [0, 1], rows)
                rows[1, -1] = changed  # after the write, before the read-back
        assert open(s.h5_path, "rb").read() == before
    assert Study.open(s.dir).n_checkpoints == 2


def test_killed_writer_leaves_a_readable_study(tmp_path):
    """SIGKILL in the middle of a large write: the study is the old one, intact, and writable again."""
    s = _new_study(tmp_path, n_params=200_000)
    with s.transaction() as w:
        w.append(w.add_run(seed=0), [0], np.ones(200_000))
    script = (
        "import numpy as np, sys\n"
        "from globscope_core.storage.study import Study\n"
        "s = Study.open(sys.argv[1])\n"
        "with s.transaction() as w:\n"
        "    r = w.add_run(seed=1)\n"
        "    for i in range(10_000):\n"
        "        w.append(r, [i], np.full((4, 200_000), i, np.float32))\n"
        "        if i == 3: print('writing', flush=True)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script, s.dir], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    s2 = Study.open(s.dir)
    assert s2.n_checkpoints == 1 and len(s2.runs) == 1
    np.testing.assert_array_equal(s2.read_params(), np.ones((1, 200_000), np.float32))
    with s2.transaction() as w:  # the stale temporary is cleaned up and writing works again
        w.append(0, [1], np.zeros(200_000))
    assert Study.open(s.dir).n_checkpoints == 2
    assert not [f for f in os.listdir(s.dir) if ".tmp-" in f]


def test_open_rejects_non_study(tmp_path):
    with pytest.raises(GlobScopeError, match="no study here"):
        Study.open(str(tmp_path))
    with h5py.File(tmp_path / "study.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(GlobScopeError, match="not a GlobScope study"):
        Study.open(str(tmp_path))
    (tmp_path / "study.h5").write_bytes(b"garbage")
    with pytest.raises(GlobScopeError, match="unreadable study file"):
        Study.open(str(tmp_path))


def test_rows_are_read_in_any_order_without_extra_copies(tiny_study):
    """read_params in the order asked, repeats included; increasing rows are h5py's array itself, other orders one
    copy more (it made two more: at 1.2e8 parameters 12 rows are 6 GB a copy, and the trajectories peaked at
    18.9 GiB)."""
    import tracemalloc

    every = tiny_study.read_params()
    rows = [5, 1, 5, 20, 0]
    np.testing.assert_array_equal(tiny_study.read_params(rows), every[rows])
    one = 4 * tiny_study.n_params
    for asked, copies in ((list(range(2, 18)), 1), (list(range(17, 1, -1)), 2)):
        tracemalloc.start()
        got = tiny_study.read_params(asked)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        np.testing.assert_array_equal(got, every[asked])
        assert peak < (copies + 0.5) * len(asked) * one, (asked[:2], peak / (len(asked) * one))


def test_streamed_blocks_reuse_one_buffer(tmp_path):
    """iter_params(reuse=True): the same rows as read_params, in any order, every block read into one buffer. A
    caller's loop keeps the block before while the next is read, so a fresh block each time held two rows at once
    (with HDF5's chunk buffer, three: 1.5 GB at 1.2e8 parameters, past the landscape's memory estimate)."""
    import tracemalloc

    from conftest import make_study

    study = make_study(tmp_path / "s", runs=1, epochs=4, widths=(512, 512))  # 1.2 MB a row: above any overhead
    every = study.read_params()
    one = 4 * study.n_params
    for rows in (None, [1, 2, 3], [4, 0, 0, 2, 3]):
        for block_rows in (1, 2):
            seen, buffers = [], set()
            tracemalloc.start()
            for idx, B in study.iter_params(block_rows, rows=rows, reuse=True):
                for j, r in enumerate(idx):
                    assert np.array_equal(B[j], every[r]), (rows, r)
                seen += list(idx)
                buffers.add(B.__array_interface__["data"][0])
                B *= 0  # the caller may overwrite it; the loop variable B stays alive while the next is read
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert seen == (list(range(len(every))) if rows is None else rows)
            assert len(buffers) == 1, (rows, block_rows)
            assert peak < (block_rows + 0.5) * one, (rows, block_rows, peak / one)  # fresh blocks: 2 x block_rows
