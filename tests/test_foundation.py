"""The foundation: store, flat layout, data sets, models, training, import, CLI errors."""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import make_study
from torch import nn

from globscope_core.errors import GlobScopeError
from globscope_core.networks import datasets, models
from globscope_core.networks.models import study_model
from globscope_core.stages.import_ import import_checkpoints, load_state_file
from globscope_core.stages.train import train_study
from globscope_core.storage.state_layout import StateLayout
from globscope_core.storage.study import Study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    """Run the installed command in a subprocess: exit status, stdout, stderr."""
    exe = os.path.join(os.path.dirname(sys.executable), "globscope")
    p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


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


# --- training ---------------------------------------------------------------------------------------
def test_training_lowers_loss_and_stores_trajectories(tiny_study):
    s = tiny_study
    assert len(s.runs) == 3 and s.n_checkpoints == 21  # 3 runs x (step 0 + 6 epochs)
    for r, last in s.final_rows().items():
        first = s.run_rows(r)[0]
        assert s.step[first] == 0
        assert s.metrics["train_loss"][last] < s.metrics["train_loss"][first] / 4
        assert s.metrics["test_acc"][last] > 0.85
    # different seeds give different trajectories
    finals = s.read_params(list(s.final_rows().values()))
    assert np.abs(finals[0] - finals[1]).max() > 1e-3
    # the stored final vector evaluates to the stored loss
    from globscope_core.evaluation.one_model import evaluate_model

    model = study_model(s)
    s.layout.load_into(model, finals[0])
    ds = datasets.load_dataset(s.dataset_spec)
    loss, acc = evaluate_model(model, ds.test_x, ds.test_y)
    row = s.final_rows()[0]
    assert abs(loss - s.metrics["test_loss"][row]) < 1e-5 and acc == s.metrics["test_acc"][row]


def test_optimizers_lrs_cycle_and_every(tmp_path):
    s = make_study(tmp_path / "s", runs=2, epochs=2, every=10, optimizers=("sgd", "adam"), lrs=(0.05, 0.002))
    assert [r["optimizer"] for r in s.runs] == ["sgd", "adam"] and s.runs[1]["lr"] == 0.002
    steps = s.step[s.run_rows(0)]
    assert list(steps) == [0, 10, 20, 30, 40, 46]  # 2 epochs x 23 steps, every 10, plus the final step


def test_resume_trains_only_missing_runs(tmp_path):
    s = make_study(tmp_path / "s", runs=2, epochs=1)
    before = s.read_params()
    with pytest.raises(GlobScopeError, match="already exists"):
        make_study(tmp_path / "s", runs=3, epochs=1)
    s2 = make_study(tmp_path / "s", runs=3, epochs=1, resume=True)
    assert len(s2.runs) == 3 and s2.runs[2]["seed"] == 2
    np.testing.assert_array_equal(s2.read_params(np.arange(len(before))), before)
    with pytest.raises(GlobScopeError, match="written for model"):
        make_study(tmp_path / "s", runs=3, epochs=1, widths=(8,), resume=True)


def test_nan_loss_names_the_run_and_keeps_earlier_runs(tmp_path):
    with pytest.raises(GlobScopeError, match=r"run 1 \(seed 1, sgd, lr 1e\+30\).*not finite|run 1 \(seed 1, sgd, lr 1e\+30\).*became"):
        make_study(tmp_path / "s", runs=2, epochs=2, lrs=(0.05, 1e30))
    s = Study.open(str(tmp_path / "s"))
    assert len(s.runs) == 1 and s.n_checkpoints == 3


# --- data sets ------------------------------------------------------------------------------------
def _write_idx(path, arr, gz=False):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    body = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(header + body)


def test_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", 30, True), ("t10k", 10, False)):
        ext = ".gz" if gz else ""
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{ext}", rng.integers(0, 10, n, dtype=np.uint8), gz)
    ds = datasets.load_dataset(datasets.make_spec("mnist", str(tmp_path)))
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_y.shape == (10,) and ds.num_classes == 10
    # the paper's MNIST MLP builds on it
    model = models.build_model(models.make_spec("mnist-mlp", ds.input_shape, ds.num_classes))
    assert models.count_parameters(model) == 134_794  # 784*128+128 + 2*(128*128+128) + 128*10+10: the paper's 1.35e5
    # a truncated file is named in the error
    raw = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:-5])
    with pytest.raises(GlobScopeError, match="t10k-images-idx3-ubyte: IDX header says"):
        datasets.load_dataset(datasets.make_spec("mnist", str(tmp_path)))


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_python_batches(tmp_path, classes):
    rng = np.random.default_rng(0)
    key = b"labels" if classes == 10 else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    for name in names:
        d = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), key: list(rng.integers(0, classes, 4))}
        with open(tmp_path / name, "wb") as f:
            pickle.dump(d, f)
    ds = datasets.load_dataset(datasets.make_spec(f"cifar{classes}", str(tmp_path)))
    assert ds.train_x.shape == ((20 if classes == 10 else 4), 3, 32, 32) and ds.num_classes == classes


def test_cifar_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    for name in ["data_batch_1", "test_batch"]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(GlobScopeError, match="data_batch_1: not a CIFAR python batch.*refusing"):
        datasets.load_dataset(datasets.make_spec("cifar10", str(tmp_path)))


def test_user_model_and_dataset(tmp_path, monkeypatch):
    (tmp_path / "usermod.py").write_text(
        "import torch\n"
        "def build(input_shape, num_classes, hidden=5):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, hidden), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(hidden, num_classes))\n"
        "def blobs():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(200, 4, generator=g); y = (x[:, 0] > 0).long()\n"
        "    return x[:150], y[:150], x[150:], y[150:]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    s = train_study(str(tmp_path / "s"), datasets.make_spec("usermod:blobs"), "usermod:build", {"hidden": 6}, runs=1,
                    epochs=5, progress=False)
    assert s.model_spec["name"] == "usermod:build" and s.n_params == 4 * 6 + 6 + 6 * 2 + 2
    assert s.metrics["test_acc"][s.final_rows()[0]] > 0.8


# --- import ---------------------------------------------------------------------------------------
def test_import_state_dicts_and_safetensors(tiny_study, tmp_path):
    from safetensors.torch import save_file

    model = study_model(tiny_study)
    files = []
    for i, row in enumerate(tiny_study.run_rows(1)[:3]):
        state = tiny_study.layout.unflatten(torch.from_numpy(tiny_study.read_params([row])[0]))
        path = tmp_path / (f"c{i}.safetensors" if i == 1 else f"c{i}.pt")
        if i == 1:
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save({"state_dict": state, "epoch": i} if i == 2 else state, path)
        files.append(str(path))
    dst = tmp_path / "study"
    shutil.copytree(tiny_study.dir, dst)
    s = import_checkpoints(str(dst), files, steps=[0, 23, 46])
    new = s.run_rows(len(s.runs) - 1, label=None)
    np.testing.assert_array_equal(s.read_params(new), tiny_study.read_params(tiny_study.run_rows(1)[:3]))
    np.testing.assert_allclose(s.metrics["train_loss"][new], tiny_study.metrics["train_loss"][tiny_study.run_rows(1)[:3]],
                               rtol=1e-5)
    assert list(s.step[new]) == [0, 23, 46] and model is not None


class Payload:  # a pickled object of a non-tensor class: weights_only loading must refuse it
    pass


def test_import_refuses_code_and_wrong_shapes(tiny_study, tmp_path):
    torch.save({"obj": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(GlobScopeError, match="evil.pt: cannot load as a weights-only checkpoint"):
        load_state_file(str(tmp_path / "evil.pt"))
    torch.save(models.mlp((1, 8, 8), 10, widths=(33,)).state_dict(), tmp_path / "other.pt")
    dst = tmp_path / "study"
    shutil.copytree(tiny_study.dir, dst)
    before = open(dst / "study.h5", "rb").read()
    with pytest.raises(GlobScopeError, match=r"other.pt: does not match the model"):
        import_checkpoints(str(dst), [str(tmp_path / "other.pt")])
    assert open(dst / "study.h5", "rb").read() == before


# --- the command line ---------------------------------------------------------------------------------
def test_cli_train_info_and_errors(tmp_path):
    rc, out, err = run_cli("train", "--dataset", "digits", "--model", "mlp", "--model-arg", "widths=[16]",
                           "--runs", "2", "--epochs", "2", "--out", tmp_path / "s")
    assert rc == 0, err
    assert "2 runs, 6 checkpoints, 1210 parameters" in out
    rc, out, err = run_cli("info", tmp_path / "s")
    assert rc == 0 and "runs       2" in out and "seed 1 sgd lr 0.05" in out

    for args, msg in [
        (("train", "--dataset", "imagenet", "--model", "mlp", "--out", tmp_path / "x"), "unknown dataset 'imagenet'"),
        (("train", "--dataset", "digits", "--model", "resnet1000", "--out", tmp_path / "x"), "unknown model 'resnet1000'"),
        (("train", "--dataset", "mnist", "--data-dir", tmp_path / "nope", "--model", "mlp", "--out", tmp_path / "x"),
         "nope: MNIST directory does not exist"),
        (("info", tmp_path / "missing"), "missing: study directory does not exist"),
        (("import", tmp_path / "s", tmp_path / "none.pt"), "none.pt: checkpoint file does not exist"),
    ]:
        rc, out, err = run_cli(*args)
        assert rc == 2, (args, err)
        assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("name,params", [("resnet20", 269_722), ("resnet56", 853_018), ("cifar-cnn", 4_718_118),
                                         ("vit", 9_904_330)])
def test_model_zoo_sizes_and_flat_round_trip(name, params):
    """The paper's models at the paper's sizes; BN statistics are part of the flat state."""
    torch.manual_seed(0)
    model = models.build_model(models.make_spec(name, (3, 32, 32), 10))
    assert models.count_parameters(model) == params
    model.train()
    x = torch.randn(4, 3, 32, 32)
    model(x)  # updates BatchNorm statistics where there are some
    model.eval()
    layout = StateLayout.from_module(model)
    vec = layout.flatten(model.state_dict())
    fresh = models.build_model(models.make_spec(name, (3, 32, 32), 10)).eval()
    layout.load_into(fresh, vec)
    assert torch.equal(fresh(x), model(x))
