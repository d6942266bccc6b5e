"""Evaluation (evaluation/): every batched path (mlp, per-model, vmap, compiled; fp32, bf16) against one model.

The zoo's architectures and a study's checkpoints, BatchNorm statistics included (issue 17).
"""
import numpy as np
import pytest
import torch
from torch import nn

from globscope_core.errors import GlobScopeError
from globscope_core.evaluation import many_models
from globscope_core.evaluation.many_models import BatchedEvaluator, eval_data, evaluate_flat
from globscope_core.evaluation.one_model import evaluate_model
from globscope_core.networks import models
from globscope_core.networks.models import build_model, make_spec, study_model
from globscope_core.storage.state_layout import StateLayout

# small members of each family (same code paths as the full-size ones, seconds to run)
ZOO = {
    "resnet20": {"width": 4},
    "cifar-cnn": {"channels": [8, 16], "hidden": 32},
    "vit": {"patch": 8, "dim": 32, "depth": 2, "heads": 4, "mlp": 64},
    "mnist-mlp": {},
}


def _case(name, n_models=5, n=48, spread=0.05, scales=None):
    shape = (1, 28, 28) if name == "mnist-mlp" else (3, 32, 32)
    spec = make_spec(name, shape, 10, **ZOO[name])
    with torch.random.fork_rng():  # the same weights whatever ran before (bf16's tolerance depends on them)
        torch.manual_seed(0)
        model = build_model(spec).eval()
    layout = StateLayout.from_module(model)
    g = torch.Generator().manual_seed(0)
    base = layout.flatten(model.state_dict())
    params = base + spread * base.abs().mean() * torch.randn(n_models, layout.size, generator=g)
    if scales is not None:  # models far apart: larger weights, larger logits, other losses
        params *= torch.as_tensor(scales, dtype=torch.float32)[:, None]
    for e in layout.entries:  # different, positive running statistics per model
        if e.name.endswith("running_var"):
            params[:, e.offset : e.offset + e.numel] = 0.5 + torch.rand(n_models, e.numel, generator=g)
        elif e.name.endswith("running_mean"):
            params[:, e.offset : e.offset + e.numel] = 0.2 * torch.randn(n_models, e.numel, generator=g)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    ref = np.array([evaluate_model(layout.load_into(model, p), x, y) for p in params])
    return spec, layout, params, x, y, ref


@pytest.mark.parametrize("name", list(ZOO))
def test_every_path_equals_one_model_at_a_time(name, monkeypatch):
    spec, layout, params, x, y, ref = _case(name)
    paths = ["per-model", "vmap"] + (["mlp"] if name == "mnist-mlp" else [])
    default = BatchedEvaluator(spec, x, y, device="cpu", layout=layout)
    assert default.path == ("mlp" if name == "mnist-mlp" else "per-model")  # the CPU's choice
    for path in paths:
        ev = BatchedEvaluator(spec, x, y, device="cpu", layout=layout, path=path)
        loss, acc = ev.evaluate(params)
        np.testing.assert_allclose(loss, ref[:, 0], rtol=2e-5, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(acc, ref[:, 1], atol=1e-9, err_msg=path)
    # sample blocks smaller than the set: the same numbers
    ev = BatchedEvaluator(spec, x, y, device="cpu", layout=layout, path="per-model")
    monkeypatch.setattr(many_models, "ACTIVATION_BUDGET", 7 * ev.per_sample_bytes)
    assert ev._tiles(len(params)) == (1, 7)
    np.testing.assert_allclose(ev.evaluate(params)[0], ref[:, 0], rtol=2e-5, atol=1e-6)
    # FLOPs: counted by torch's flop counter for the general paths, directly for the MLP; the two agree
    if name == "mnist-mlp":
        assert default.flops_per_model == ev.flops_per_model == 2 * len(x) * (784 * 128 + 2 * 128 * 128 + 128 * 10)
    else:
        assert ev.flops_per_model > 0


@pytest.mark.parametrize("name", list(ZOO))
def test_bf16_agrees_with_fp32_to_its_tolerance(name):
    # models far apart (losses differ by more than the tolerance): each must be evaluated with its own weights
    spec, layout, params, x, y, ref = _case(name, spread=0.3, scales=[0.5, 1.0, 2.0, 3.0, 4.0])
    assert np.ptp(ref[:, 0]) > 0.5 * ref[:, 0].min()  # wrong weights would be off by more than 5e-2
    for path in ["per-model", "vmap"] + (["mlp"] if name == "mnist-mlp" else []):
        ev = BatchedEvaluator(spec, x, y, device="cpu", layout=layout, precision="bf16", path=path)
        loss, _ = ev.evaluate(params)
        rel = np.abs(loss - ref[:, 0]) / ref[:, 0]
        assert 0 < rel.max() < 5e-2, path  # close, and really computed in another precision


def test_compiled_per_model_path_equals_one_model_at_a_time():
    spec, layout, params, x, y, ref = _case("resnet20", n_models=3)
    ev = BatchedEvaluator(spec, x, y, device="cpu", layout=layout, compile=True)
    assert ev.path == "per-model" and ev.compile_seconds is None
    loss, acc = ev.evaluate(params)
    assert ev.compile_seconds > 0
    np.testing.assert_allclose(loss, ref[:, 0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(acc, ref[:, 1], atol=1e-9)
    bad = params.clone()  # a negative decoded variance is clamped here too, and the batch is left alone
    var = next(e for e in layout.entries if e.name.endswith("running_var"))
    bad[0, var.offset : var.offset + var.numel] = -1e-3
    assert np.isfinite(ev.evaluate(bad)[0]).all() and (bad[0, var.offset] == -1e-3)


def test_unavailable_modes_are_clear_errors():
    spec, layout, params, x, y, _ = _case("resnet20", n_models=1, n=4)
    with pytest.raises(GlobScopeError, match="tf32 is a CUDA mode"):
        BatchedEvaluator(spec, x, y, device="cpu", precision="tf32")
    with pytest.raises(GlobScopeError, match="--precision must be one of"):
        BatchedEvaluator(spec, x, y, device="cpu", precision="fp8")
    with pytest.raises(GlobScopeError, match="path 'mlp' is not available"):
        BatchedEvaluator(spec, x, y, device="cpu", path="mlp")
    # compiling an MLP model by model was slower than its GEMM path: the MLP keeps its path
    spec, layout, _, x, y, _ = _case("mnist-mlp", n_models=1, n=4)
    ev = BatchedEvaluator(spec, x, y, device="cpu", compile=True)
    assert ev.path == "mlp" and not ev.compile


# --- over a study's checkpoints: BatchedEvaluator and evaluate_flat --------------------------------
def test_batched_paths_match_one_model_at_a_time(tiny_study):
    x, y = eval_data(tiny_study, "test", 100)
    rows = np.arange(0, tiny_study.n_checkpoints, 3)
    params = torch.from_numpy(tiny_study.read_params(rows))
    params[-1] += 0.05 * torch.randn(params.shape[1], generator=torch.Generator().manual_seed(0))
    model = study_model(tiny_study)
    ref = np.array([evaluate_model(tiny_study.layout.load_into(model, p), x, y) for p in params])
    fast = BatchedEvaluator(tiny_study.model_spec, x, y, device="cpu")
    general = BatchedEvaluator(tiny_study.model_spec, x, y, device="cpu", fast=False)
    assert fast.fast and not general.fast
    for ev in (fast, general):
        loss, acc = ev.evaluate(params)
        np.testing.assert_allclose(loss, ref[:, 0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(acc, ref[:, 1], atol=1e-9)
    # the convenience function over a Study, in several model batches
    loss, acc = evaluate_flat(tiny_study, params, x, y, device="cpu", max_models=2)
    np.testing.assert_allclose(loss, ref[:, 0], rtol=1e-5, atol=1e-6)
    assert fast.flops_per_model == 2 * len(x) * (64 * 32 + 32 * 10)


def test_cpu_tiles_split_models_and_samples_without_changing_results(tiny_study, monkeypatch):
    x, y = eval_data(tiny_study, "test", 100)
    params = torch.from_numpy(tiny_study.read_params(np.arange(0, tiny_study.n_checkpoints, 2)))
    whole = BatchedEvaluator(tiny_study.model_spec, x, y, device="cpu").evaluate(params)
    # tiles of 3 models x 32 samples: ragged last group and last sample block
    monkeypatch.setattr(many_models, "CPU_TILE_SAMPLES", 32)
    monkeypatch.setattr(many_models, "CPU_TILE_BYTES", 4 * 64 * 32 * 3)
    ev = BatchedEvaluator(tiny_study.model_spec, x, y, device="cpu")
    assert ev._tiles(len(params)) == (3, 32) and len(params) % 3 and len(x) % 32
    tiled = ev.evaluate(params)
    np.testing.assert_allclose(tiled[0], whole[0], rtol=1e-6)
    np.testing.assert_array_equal(tiled[1], whole[1])


class _BNNet(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x.flatten(1)))))


def test_general_path_uses_decoded_batchnorm_statistics(tiny_study):
    models.register("test-bn-net")(_BNNet)
    spec = models.make_spec("test-bn-net", (1, 8, 8), 10)
    model = models.build_model(spec)
    layout = StateLayout.from_module(model)
    assert any("running_var" in e.name for e in layout.entries)
    g = torch.Generator().manual_seed(1)
    params = 0.3 * torch.randn(5, layout.size, generator=g)
    for e in layout.entries:  # positive variances, and different running stats per model
        if e.name.endswith("running_var"):
            params[:, e.offset : e.offset + e.numel] = 0.5 + torch.rand(5, e.numel, generator=g)
    x, y = eval_data(tiny_study, "test", 64)
    ev = BatchedEvaluator(spec, x, y, device="cpu")
    assert not ev.fast
    loss, acc = ev.evaluate(params)
    ref = np.array([evaluate_model(layout.load_into(model, p), x, y) for p in params])
    np.testing.assert_allclose(loss, ref[:, 0], rtol=1e-5)
    np.testing.assert_allclose(acc, ref[:, 1])

    # a decoded point with slightly negative variances (decoders extrapolate) is evaluated with them
    # clamped at 0, not turned into NaN, and the caller's batch is left as it was
    var = next(e for e in layout.entries if e.name.endswith("running_var"))
    bad = params.clone()
    bad[0, var.offset : var.offset + var.numel] = -1e-3
    before = bad.clone()
    clamped = bad.clone()
    clamped[0, var.offset : var.offset + var.numel] = 0
    loss_bad, _ = ev.evaluate(bad)
    assert np.isfinite(loss_bad).all() and torch.equal(bad, before)
    ref0 = evaluate_model(layout.load_into(model, clamped[0]), x, y)[0]
    np.testing.assert_allclose(loss_bad[0], ref0, rtol=1e-5)
