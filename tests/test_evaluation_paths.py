"""Every evaluation path (mlp, per-model, vmap, compiled; fp32 and bf16) against the one-model
``evaluate_model`` on the zoo's architectures, BatchNorm statistics included (issue 17)."""
import numpy as np
import pytest
import torch

from globscope_core.errors import GlobScopeError
from globscope_core.evaluation import many_models as batched
from globscope_core.evaluation.many_models import BatchedEvaluator
from globscope_core.evaluation.one_model import evaluate_model
from globscope_core.networks.models import build_model, make_spec
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
    monkeypatch.setattr(batched, "ACTIVATION_BUDGET", 7 * ev.per_sample_bytes)
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


def test_landscape_in_bf16_records_its_precision_and_resumes_only_in_it(study_copy):
    from globscope_core.reducers import fit_reducer
    from globscope_core.stages.landscape import compute_landscape
    from globscope_core.storage.vtk_files import read_vti

    fit_reducer(study_copy, "pca", 2)
    kw = dict(eval_samples=64, chunk_points=8, progress=False, trajectories=False, device="cpu")
    part = compute_landscape(study_copy, "pca-2d", 5, precision="bf16", max_chunks=1, **kw)
    assert not part["complete"]
    with pytest.raises(GlobScopeError, match="differs in: precision"):  # no fp32 chunk joins bf16 ones
        compute_landscape(study_copy, "pca-2d", 5, **kw)
    info = compute_landscape(study_copy, "pca-2d", 5, precision="bf16", **kw)
    assert info["complete"] and info["evaluation"] == {"path": "mlp", "precision": "bf16", "compile": False,
                                                       "compile_seconds": None}
    low = read_vti(f"{study_copy.dir}/landscape-2d.vti")
    assert low.field_data["precision"] == "bf16"
    ref = compute_landscape(study_copy, "pca-2d", 5, fresh=True, **kw)
    assert ref["evaluation"]["precision"] == "fp32"
    f32 = read_vti(f"{study_copy.dir}/landscape-2d.vti").point_arrays["loss"]
    rel = np.abs(low.point_arrays["loss"] - f32) / f32
    assert 0 < rel.max() < 2e-2
