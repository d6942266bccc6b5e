"""Train and import stages (stages/train.py, import_.py): plans, resume, NaN loss, checkpoint import, train/info CLI."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import make_study, one_line_error, run_cli

from globscope_core.errors import GlobScopeError
from globscope_core.networks import datasets, models
from globscope_core.networks.models import study_model
from globscope_core.stages.import_ import import_checkpoints, load_state_file
from globscope_core.storage.study import Study


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



# --- checkpoints of any floating precision -------------------------------------------------------------
def test_import_mixed_precision_checkpoints(tiny_study, tmp_path):
    row = tiny_study.run_rows(0)[-1]
    ref = torch.from_numpy(tiny_study.read_params([row])[0])
    state = tiny_study.layout.unflatten(ref)
    names = list(state)
    files, expect = [], []
    for dtype in (torch.float16, torch.bfloat16, torch.float64, "mixed"):
        if dtype == "mixed":  # weights in half precision, biases in double
            st = {k: v.to(torch.float16 if k.endswith("weight") else torch.float64) for k, v in state.items()}
        else:
            st = {k: v.to(dtype) for k, v in state.items()}
        path = tmp_path / f"{str(dtype).replace('torch.', '')}.pt"
        torch.save(st, path)
        files.append(str(path))
        expect.append(torch.cat([st[k].reshape(-1).float() for k in names]).numpy())
    dst = tmp_path / "study"
    shutil.copytree(tiny_study.dir, dst)
    rc, out, err = run_cli("import", dst, *files)
    assert rc == 0, err
    s = Study.open(str(dst))
    rows = s.run_rows(len(s.runs) - 1, label=None)
    got = s.read_params(rows)
    assert got.dtype == np.float32 and got.shape == (4, s.n_params)
    for g, e in zip(got, expect):
        np.testing.assert_array_equal(g, e)  # exact: every format widens losslessly (float64 rounds once)
    np.testing.assert_allclose(got[2], ref.numpy())  # float64 of float32 values comes back exactly
    # half precision changes the loss a little, not much
    loss32 = tiny_study.metrics["test_loss"][row]
    assert abs(s.metrics["test_loss"][rows[0]] - loss32) < 0.02 * loss32
    assert not np.array_equal(got[0], ref.numpy())


def test_import_refuses_integer_and_overflowing_checkpoints(tiny_study, tmp_path):
    state = tiny_study.layout.unflatten(torch.from_numpy(tiny_study.read_params([0])[0]))
    first = next(iter(state))
    quant = dict(state, **{first: (state[first] * 100).to(torch.int8)})
    torch.save(quant, tmp_path / "q.pt")
    big = {k: v.double() for k, v in state.items()}
    big[first] = big[first].clone()
    big[first][0] = 1e300
    torch.save(big, tmp_path / "big.pt")
    dst = tmp_path / "study"
    shutil.copytree(tiny_study.dir, dst)
    before = open(dst / "study.h5", "rb").read()
    with pytest.raises(GlobScopeError, match=rf"q.pt: '{first}' is int8, the model expects a floating tensor"):
        import_checkpoints(str(dst), [str(tmp_path / "q.pt")])
    rc, _, err = run_cli("import", dst, tmp_path / "big.pt")
    one_line_error(rc, err, f"big.pt: '{first}' has values that are NaN or Inf in float32")
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
