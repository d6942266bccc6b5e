"""Networks (networks/): data sets (MNIST IDX, CIFAR batches, user code) and the model zoo at the paper's sizes."""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from globscope_core.errors import GlobScopeError
from globscope_core.networks import datasets, models
from globscope_core.stages.train import train_study
from globscope_core.storage.state_layout import StateLayout


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



# --- the model zoo --------------------------------------------------------------------------------
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
