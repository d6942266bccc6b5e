"""CLI errors (cli/): every subcommand refuses bad values with exactly one line on stderr and a non-zero exit.

In-process through ``globscope_core.cli.main`` (parsing errors need no training), with GLOBSCOPE_DEBUG=1 so
that main's last-resort net (one line for an unexpected exception) re-raises instead of hiding a traceback:
a case passes only when its real cause gives the message. The few cases that need a study use a copy of
the tiny digits study with PCA reducers (no evaluation) and a 5x5 landscape.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from globscope_core.cli import main

BAD_NUMBERS = ["0", "-1", "nan", "inf", "x", "1.5"]


@pytest.fixture(scope="module")
def env(tiny_study, tmp_path_factory):
    """Paths the cases refer to: a study with reducers and a landscape, a file, an empty dir, a broken study."""
    from globscope_core.reducers import fit_reducer
    from globscope_core.stages.landscape import compute_landscape

    root = tmp_path_factory.mktemp("cli")
    study = root / "study"
    shutil.copytree(tiny_study.dir, study)
    from globscope_core.storage.study import Study

    s = Study.open(str(study))
    fit_reducer(s, "pca", 2)
    fit_reducer(s, "pca", 3)
    compute_landscape(s, "pca-2d", resolution=5, eval_samples=64, device="cpu", progress=False)
    (root / "afile").write_text("not a directory\n")
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "study.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(2000))
    (root / "ckpt.pt").write_bytes(b"garbage, not a checkpoint")
    (root / "field.vti").write_text("<VTKFile type='ImageData'> broken")
    return {"S": str(study), "F": str(root / "afile"), "E": str(root / "empty"), "B": str(root / "broken"),
            "M": str(root / "missing"), "C": str(root / "ckpt.pt"), "V": str(root / "field.vti"), "R": str(root)}


TRAIN = ["train", "--dataset", "digits", "--model", "mlp", "--out", "{R}/new"]

# (argv, a fragment the one line must contain); {S} etc. are the paths of the ``env`` fixture
CASES = [
    ([], "required: COMMAND"),
    (["nosuch"], "invalid choice"),
    (["train"], "required"),
    *[(TRAIN + [opt, v], f"argument {opt}") for opt in ("--runs", "--epochs", "--batch-size", "--every")
      for v in BAD_NUMBERS],
    *[(TRAIN + ["--lr", v], "argument --lr") for v in ("0", "-1", "nan", "inf", "x", "0.1,x", "0.1,-1", ",")],
    (TRAIN + ["--optimizer", "sgd,foo"], "'foo' is not one of sgd, adam, adamw"),
    (TRAIN + ["--weight-decay", "-1"], "argument --weight-decay: must be 0 or more"),
    (TRAIN + ["--weight-decay", "nan"], "not a finite number"),
    (TRAIN + ["--eval-samples", "0"], "argument --eval-samples"),
    (TRAIN + ["--seed", "-1"], "argument --seed"),
    (TRAIN + ["--data-seed", "x"], "argument --data-seed"),
    (TRAIN + ["--device", "gpu"], "not a device"),
    (["train", "--dataset", "mnist", "--model", "mlp", "--out", "{R}/new", "--data-dir", "{M}"],
     "MNIST directory does not exist"),
    (["train", "--dataset", "mnist", "--model", "mlp", "--out", "{R}/new", "--data-dir", "{F}"], "afile"),
    (["train", "--dataset", "digits", "--model", "mlp", "--out", "{F}"], "is a file, not a directory"),
    (TRAIN + ["--model-arg", "widths=[0]"], "widths must be a list of positive integers"),
    (TRAIN + ["--model-arg", "widths=[-3,8]"], "widths must be a list of positive integers"),
    (TRAIN + ["--model-arg", "widths=abc"], "widths must be a list of positive integers"),
    (TRAIN + ["--model-arg", "nokeyvalue"], "not KEY=VALUE"),
    (TRAIN + ["--model-arg", "depth=3"], "bad constructor arguments"),
    (["train", "--dataset", "digits", "--model", "nosuch", "--out", "{R}/new"], "unknown model 'nosuch'"),
    (["train", "--dataset", "nosuch", "--model", "mlp", "--out", "{R}/new"], "unknown dataset 'nosuch'"),
    (["train", "--dataset", "mnist", "--model", "mlp", "--out", "{R}/new"], "give --data-dir"),
    (["import", "{S}", "{M}"], "checkpoint file does not exist"),
    (["import", "{S}", "{E}"], "is a directory, not a checkpoint file"),
    (["import", "{F}", "{C}"], "is a file, not a directory"),
    (["import", "{S}", "{C}", "--steps", "x"], "argument --steps"),
    (["import", "{S}", "{C}", "--steps", "-1"], "argument --steps"),
    (["import", "{S}", "{C}", "--steps", "1,2"], "2 steps given for 1 files"),
    (["import", "{S}", "{C}", "--eval-samples", "0"], "argument --eval-samples"),
    (["import", "{S}", "{C}", "--device", "tpu"], "not a device"),
    (["import", "{E}/new", "{C}"], "give --model and --dataset"),
    (["import", "{S}", "{C}"], "cannot load as a weights-only checkpoint"),
    (["train", "--dataset", "digits", "--model", "mlp", "--out", "{S}"], "a study already exists here"),
    (["info", "{M}"], "directory does not exist"),
    (["info", "{F}"], "is a file, not a directory"),
    (["info", "{E}"], "not a study (no study.h5"),
    (["info", "{B}"], "unreadable study file"),
    (["fit", "{S}", "--dim", "4"], "argument --dim"),
    (["fit", "{S}", "--reducer", "tsne"], "argument --reducer"),
    *[(["fit", "{S}", opt, v], f"argument {opt}") for opt in ("--max-rank", "--width", "--depth", "--epochs",
                                                                "--eval-samples") for v in ("0", "-2", "x")],
    *[(["fit", "{S}", "--lr", v], "argument --lr") for v in ("nan", "-1", "0", "inf")],
    (["fit", "{S}", "--seed", "-1"], "argument --seed"),
    (["fit", "{S}", "--device", "cuda:x"], "not a device"),
    (["fit", "{M}"], "directory does not exist"),
    (["fit", "{E}"], "not a study"),
    (["fit", "{B}", "--reducer", "pca"], "unreadable study file"),
    (["compare", "{S}", "--dim", "5"], "argument --dim"),
    (["compare", "{S}", "--reducers", "pca,foo"], "'foo' is not one of"),
    (["compare", "{S}", "--reducers", ","], "argument --reducers"),
    (["compare", "{S}", "--max-rank", "-1"], "argument --max-rank"),
    (["compare", "{S}", "--eval-samples", "nan"], "argument --eval-samples"),
    *[(["landscape", "{S}", "--reducer", "pca-2d", "--chunk-points", v], "argument --chunk-points")
      for v in ("-3", "0", "x")],
    *[(["landscape", "{S}", "--reducer", "pca-2d", "--resolution", v], "argument --resolution")
      for v in ("0", "1", "-5", "x", "nan")],
    *[(["landscape", "{S}", "--reducer", "pca-2d", "--bounds", v], "argument --bounds")
      for v in ("a,b", "0,1,0,inf", "0,1,0,nan", "0,1", "1,0,0,1", "0,1,0,1,0", ",")],
    (["landscape", "{S}", "--reducer", "pca-2d", "--bounds", "-1e308,1e308,0,1"], "wider than a float can hold"),
    (["landscape", "{S}", "--reducer", "pca-2d", "--bounds", "0,1,0,1,0,1"], "--bounds needs 4 numbers"),
    (["landscape", "{S}", "--reducer", "{C}"], "not a GlobScope reducer file"),
    (["landscape", "{S}", "--reducer", "pca-3d", "--resolution", "1291"], "more than a landscape may have"),
    (["landscape", "{S}", "--reducer", "pca-3d", "--resolution", "2097152"], "more than a landscape may have"),
    (["landscape", "{S}", "--reducer", "pca-2d", "--resolution", "4294967296"], "more than a landscape may have"),
    (["landscape", "{S}", "--reducer", "pca-2d", "--margin", "-1"], "argument --margin"),
    (["landscape", "{S}", "--reducer", "pca-2d", "--margin", "nan"], "argument --margin"),
    (["landscape", "{S}", "--reducer", "pca-2d", "--eval-samples", "-1"], "argument --eval-samples"),
    (["landscape", "{S}", "--reducer", "pca-2d", "--split", "val"], "argument --split"),
    (["landscape", "{S}", "--reducer", "pca-2d", "--device", "cpu0"], "not a device"),
    (["landscape", "{S}", "--reducer", "nosuch-2d"], "nosuch-2d"),
    (["landscape", "{S}", "--reducer", "pca-2d", "--precision", "tf32", "--device", "cpu"], "tf32 is a CUDA mode"),
    (["landscape", "{S}", "--reducer", "pca-2d", "--precision", "fp16"], "argument --precision"),
    (["landscape", "{S}"], "required: --reducer"),
    (["landscape", "{E}", "--reducer", "pca-2d"], "not a study"),
    (["topology", "{S}", "--relative", "--absolute"], "not allowed with argument"),
    (["topology", "{S}", "--persistence", "-1"], "argument --persistence"),
    (["topology", "{S}", "--persistence", "nan"], "argument --persistence"),
    (["topology", "{S}", "--tree", "contour"], "argument --tree"),
    (["topology", "{S}", "--dim", "4"], "argument --dim"),
    (["topology", "{M}"], "no such file or directory"),
    (["topology", "{F}"], "expected a .vti file or a study directory"),
    (["topology", "{E}"], "no landscape-2d.vti or landscape-3d.vti"),
    (["topology", "{V}"], "--out DIR is required"),
    (["topology", "{V}", "--out", "{R}/topo"], "field.vti"),
    (["topology", "{S}", "--scalar", "nosuch"], "no point array 'nosuch'"),
    (["align", "{S}", "--out", "{R}/al", "--alphas", "1"], "argument --alphas: must be at least 2"),
    *[(["align", "{S}", "--out", "{R}/al", opt, "0"], f"argument {opt}")
      for opt in ("--eval-samples", "--act-samples", "--max-iter", "--resolution")],
    (["align", "{S}", "--out", "{R}/al", "--reference", "-1"], "argument --reference"),
    (["align", "{S}", "--out", "{R}/al", "--reference", "99"], "--reference 99 is not a run"),
    (["align", "{S}", "--out", "{R}/al", "--method", "magic"], "unknown alignment method 'magic'"),
    (["align", "{S}", "--out", "{R}/al", "--reducer", "tsne"], "argument --reducer"),
    (["align", "{S}", "--out", "{F}"], "is a file, not a directory"),
    (["align", "{S}", "--out", "{S}"], "must be a new directory"),
    (["align", "{S}"], "required: --out"),
    (["connect", "{S}", "--runs", "0", "x"], "argument --runs"),
    (["connect", "{S}", "--runs", "0", "-1"], "argument --runs"),
    (["connect", "{S}", "--runs", "0", "{E}:1"], "not a study"),
    (["connect", "{S}", "--runs", "0", "99"], "no run 99"),
    (["connect", "{S}", "--runs", "1", "1"], "the same run twice"),
    (["connect", "{S}", "--runs", "0", "1", "--reducer", "nosuch"], "no such reducer"),
    (["connect", "{S}", "--runs", "0"], "argument --runs"),
    *[(["connect", "{S}", "--runs", "0", "1", opt, v], f"argument {opt}")
      for opt, v in (("--bends", "0"), ("--epochs", "0"), ("--lr", "0"), ("--lr", "nan"), ("--batch-size", "0"),
                     ("--weight-decay", "-1"), ("--points", "2"), ("--eval-samples", "0"),
                     ("--plane-resolution", "1"), ("--plane-resolution", "-1"), ("--plane-eval-samples", "0"),
                     ("--curve", "spline"), ("--optimizer", "lbfgs"), ("--seed", "x"), ("--device", "gpu"))],
    (["render", "{M}"], "directory does not exist"),
    (["render", "{F}"], "is a file"),
    (["render", "{E}"], "no landscape-2d.vti or landscape-3d.vti"),
    (["render", "{S}", "--timeout", "0"], "argument --timeout"),
    (["render", "{S}", "--out", "{F}"], "is a file, not a directory"),
    (["paraview", "{M}"], "directory does not exist"),
    (["paraview", "{E}"], "no landscape-2d.vti"),
    *[(["demo", "--out", "{R}/demo", opt, v], f"argument {opt}")
      for opt, v in (("--runs", "0"), ("--epochs", "-1"), ("--resolution-2d", "1"), ("--resolution-3d", "x"),
                     ("--device", "cuda:"))],
    (["demo", "--out", "{F}"], "is a file, not a directory"),
]


if not torch.cuda.is_available():  # a GPU asked for where there is none: said before any work
    CASES += [([cmd, "{S}", "--device", "cuda"] + extra, "no CUDA GPU") for cmd, extra in
              (("fit", []), ("landscape", ["--reducer", "pca-2d"]), ("align", ["--out", "{R}/al"]),
               ("connect", ["--runs", "0", "1"]))]


def _ids():
    return [" ".join(argv) or "(none)" for argv, _ in CASES]


@pytest.mark.parametrize("argv,fragment", CASES, ids=_ids())
def test_bad_values_give_one_line(argv, fragment, env, capfd, monkeypatch):
    monkeypatch.setenv("GLOBSCOPE_DEBUG", "1")  # no safety net: an unexpected exception fails the test
    args = [a.format(**env) for a in argv]
    before = _snapshot(env["S"])
    rc = main(args)
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0, f"exit 0 for {args}; stdout: {out[-500:]}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr for {args}:\n{err[-2000:]}"
    assert lines[0].startswith("globscope"), lines[0]
    assert fragment.format(**env) in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert _snapshot(env["S"]) == before, "a refused command changed the study"
    assert not os.path.exists(os.path.join(env["R"], "new")) and not os.path.exists(os.path.join(env["R"], "al"))


def _snapshot(study):
    """Names and sizes and mtimes of the study's files: a refused command must not touch any (but the writers'
    locks, taken before the checks: storage/locks.py)."""
    out = {}
    for root, _, files in os.walk(study):
        for f in (f for f in files if not f.endswith(".lock")):
            st = os.stat(os.path.join(root, f))
            out[os.path.relpath(os.path.join(root, f), study)] = (st.st_size, st.st_mtime_ns)
    return out


def test_argparse_errors_name_the_command_and_option(capfd):
    rc = main(["train", "--dataset", "digits", "--model", "mlp", "--out", "x", "--epochs", "0"])
    assert rc == 2
    assert capfd.readouterr().err == "globscope train: error: argument --epochs: must be a positive integer, not 0\n"


def test_unexpected_exception_is_one_line_with_a_hint(monkeypatch, capfd, env):
    """The last-resort net: a bug becomes one line naming GLOBSCOPE_DEBUG; with it set, the traceback."""
    import globscope_core.cli.info as info_cli

    def boom(args):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(info_cli, "cmd_info", boom)
    monkeypatch.delenv("GLOBSCOPE_DEBUG", raising=False)
    assert main(["info", env["S"]]) == 3
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "internal error: ZeroDivisionError: division by zero second line" in err and "GLOBSCOPE_DEBUG=1" in err
    monkeypatch.setenv("GLOBSCOPE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["info", env["S"]])


def test_file_system_error_is_one_line_and_its_traceback_on_request(monkeypatch, capfd, env):
    """An OSError no stage turned into a GlobScopeError: one line naming the file (exit 2); GLOBSCOPE_DEBUG=1
    shows its traceback, as for any other error."""
    import globscope_core.cli.info as info_cli

    def denied(args):
        raise PermissionError(13, "Permission denied", "/some/study/report.json")

    monkeypatch.setattr(info_cli, "cmd_info", denied)
    monkeypatch.delenv("GLOBSCOPE_DEBUG", raising=False)
    assert main(["info", env["S"]]) == 2
    assert capfd.readouterr().err == "globscope info: error: /some/study/report.json: Permission denied\n"
    monkeypatch.setenv("GLOBSCOPE_DEBUG", "1")
    with pytest.raises(PermissionError):
        main(["info", env["S"]])


def test_help_shows_defaults(capfd):
    for argv, expect in ((["train", "--help"], ["epochs per run (default: 40)", "(default: 6)"]),
                         (["import", "--help"], ["(default: 10000)", "(default: imported)"]),
                         (["compare", "--help"], ["latent dimension: 2 or 3 (default: 2)"]),
                         (["demo", "--help"], ["(default: 65)", "(default: 33)", "(default: 6)"]),
                         (["render", "--help"], ["stopped (default: 900)"]),
                         (["landscape", "--help"], ["(default: test)", "(default: 0.05)", "(clamp, default:", "(default: 1024)"])):
        assert main(argv) == 0
        text = " ".join(capfd.readouterr().out.split())  # argparse wraps lines
        for e in expect:
            assert e in text, (argv, e, text)


def test_good_values_still_parse(env):
    """The checks refuse bad values only: negative bounds, 0 = whole split, lists and defaults pass."""
    from globscope_core.cli import build_parser

    a = build_parser().parse_args(["landscape", env["S"], "--reducer", "pca-2d", "--bounds", "-2,2,-1e3,5",
                                   "--eval-samples", "0", "--resolution", "2", "--chunk-points", "1"])
    assert a.bounds == [-2.0, 2.0, -1000.0, 5.0] and a.eval_samples == 0 and a.resolution == 2
    a = build_parser().parse_args(["train", "--dataset", "digits", "--model", "mlp", "--out", env["R"] + "/n",
                                   "--lr", "0.1,1e-3", "--optimizer", "sgd,adam", "--device", "cuda:1"])
    assert a.lr == [0.1, 0.001] and a.optimizer == ["sgd", "adam"] and a.device == "cuda:1"
    assert a.epochs is None  # not given: the stored plan's value on --resume, train.DEFAULTS otherwise
    a = build_parser().parse_args(["connect", env["S"], "--runs", "0", env["S"] + ":2", "--plane-resolution", "0"])
    assert a.runs == ["0", env["S"] + ":2"] and a.plane_resolution == 0
    a = build_parser().parse_args(["topology", env["S"], "--absolute", "--persistence", "0"])
    assert a.absolute and not a.relative and a.persistence == 0.0
