"""Options checked before the work, and texts that blame the right thing (issue 24, items 10-12).

Each refused option ends in exit 2 and one line on stderr that names the option, with nothing written and no
work begun (no progress bar: the whole of stderr is that line). A short study fits without the held-out part
(a note says why) unless --holdout asks for it; bf16 on a CPU without bf16 units is said to be slow, and the
benchmarks name the CPU they ran on.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
from conftest import make_study, one_line_error, run_cli

from globscope_core.cli import main
from globscope_core.storage import safe_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["train", "--dataset", "digits", "--model", "mlp", "--model-arg", "widths=[16]", "--runs", 1, "--epochs", 1,
         "--out", "{N}"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """2 runs of a 64-16-10 MLP, 6 epochs: 14 checkpoints (enough to hold some out)."""
    d = tmp_path_factory.mktemp("options") / "study"
    make_study(d, runs=2, epochs=6, widths=(16,))
    return str(d)


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A newcomer's first study: 2 runs of 3 epochs, 4 checkpoints each (none can be held out)."""
    d = tmp_path_factory.mktemp("options") / "short"
    make_study(d, runs=2, epochs=3, widths=(16,))
    return str(d)


def _copy(src, tmp_path, name="study"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _tree(d):
    """{relative path: sha256} of every file under ``d`` (locks excluded: they are empty by design)."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            if not f.endswith(".lock"):
                with open(os.path.join(root, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(root, f), d)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _main(capsys, argv):
    safe_write._NOTED.clear()  # notes are once per process: each call here is a new command
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _fill(argv, **names):
    return [a.format(**names) if isinstance(a, str) else a for a in argv]


# --- refused before any work ---------------------------------------------------------------------------
REFUSED = [
    # sizes: the plane, the points, the autoencoder and the model are sized from the options, not found too big
    ("connect-plane-resolution", ["connect", "{S}", "--runs", 0, 1, "--epochs", 1, "--plane-resolution", 100000],
     "--plane-resolution"),
    ("connect-points", ["connect", "{S}", "--runs", 0, 1, "--epochs", 1, "--points", 100_000_000], "--points"),
    ("fit-width", ["fit", "{S}", "--width", 100_000_000, "--epochs", 5], "--width"),
    ("compare-width", ["compare", "{S}", "--reducers", "pca,ae", "--width", 100_000_000, "--epochs", 5], "--width"),
    ("train-model-arg", [*TRAIN[:6], "widths=[1000000000]", *TRAIN[7:]], "--model-arg"),
    # seeds: numpy's RandomState (kpca, umap) takes < 2**32, torch < 2**64
    ("train-seed", [*TRAIN, "--seed", 2**70], "--seed"),
    ("train-data-seed", [*TRAIN, "--data-seed", 2**70], "--data-seed"),
    ("fit-kpca-seed", ["fit", "{S}", "--reducer", "kpca", "--seed", 2**32], "--seed"),
    ("fit-ae-seed", ["fit", "{S}", "--seed", 2**70, "--epochs", 5], "--seed"),
    ("connect-seed", ["connect", "{S}", "--runs", 0, 1, "--epochs", 1, "--seed", 2**70], "--seed"),
    ("align-seed", ["align", "{S}", "--out", "{N}", "--seed", 2**70], "--seed"),
    # devices this build cannot use (the option's own error text offers mps: it is Apple's)
    *[(f"{cmd}-device-mps", [*argv, "--device", "mps"], "--device") for cmd, argv in (
        ("train", TRAIN), ("fit", ["fit", "{S}", "--reducer", "pca"]), ("compare", ["compare", "{S}"]),
        ("landscape", ["landscape", "{S}", "--reducer", "pca-2d"]), ("connect", ["connect", "{S}", "--runs", 0, 1]),
        ("align", ["align", "{S}", "--out", "{N}"]), ("import", ["import", "{N}", "{S}/study.h5"]))],
]


@pytest.mark.parametrize("argv,option", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_before_any_work(base, tmp_path, capsys, argv, option):
    s = _copy(base, tmp_path)
    new = str(tmp_path / "new")
    before = _tree(s)
    rc, out, err = _main(capsys, _fill(argv, S=s, N=new))
    one_line_error(rc, err, option)  # the whole of stderr: no progress bar, so no work was begun
    assert _tree(s) == before, "a refused command changed the study"
    assert not os.path.exists(new), "a refused command made its output directory"


def test_mps_is_refused_naming_what_is_there(capsys):
    if sys.platform == "darwin":
        pytest.skip("macOS: mps may be there")
    from globscope_core.errors import GlobScopeError
    from globscope_core.networks.device import available_devices, resolve_device

    with pytest.raises(GlobScopeError, match=r"--device mps: .*available: cpu"):  # the API refuses it too
        resolve_device("mps")
    assert "mps" not in available_devices() and available_devices()[0] == "cpu"


# --- texts that blame the right thing --------------------------------------------------------------------
def _error_lines(err):
    """What a terminal shows of stderr, without progress bars."""
    lines = [ln.split("\r")[-1] for ln in err.splitlines()]
    return [ln for ln in lines if ln.strip() and "|" not in ln and "it/s" not in ln]


@pytest.mark.parametrize("argv", [
    [*TRAIN, "--weight-decay", 1e10],
    ["connect", "{S}", "--runs", 0, 1, "--epochs", 1, "--weight-decay", 1e10, "--plane-resolution", 0,
     "--eval-samples", 64],
], ids=["train", "connect"])
def test_divergence_from_weight_decay_names_weight_decay(base, tmp_path, capsys, argv):
    s = _copy(base, tmp_path)
    rc, out, err = _main(capsys, _fill(argv, S=s, N=str(tmp_path / "new")))
    lines = [ln for ln in _error_lines(err) if ": error: " in ln]  # the work ran: other lines may come before
    assert rc == 2 and len(lines) == 1, err
    assert "--weight-decay" in lines[0] and "--lr" not in lines[0], lines[0]


def test_many_points_name_the_disk_they_need_not_a_full_disk(base, tmp_path, capsys):
    """--points whose paths.h5 does not fit the disk: the line says how much --points needs, not 'no space left'."""
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(tmp_path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'})")
    try:
        s = _copy(base, tmp_path)
        before = _tree(s)
        rc, out, err = _main(capsys, ["connect", s, "--runs", 0, 1, "--epochs", 1, "--points", 5000])
        one_line_error(rc, err, "--points 5000", "on disk")
        assert "no space left" not in err
        assert _tree(s) == before
    finally:
        subprocess.run(["umount", "-l", str(tmp_path)], capture_output=True)


def test_compare_on_a_read_only_study_is_refused_before_fitting(base, tmp_path, capsys):
    fs = tmp_path / "fs"
    fs.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(fs)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'})")
    try:
        s = _copy(base, fs)
        before = _tree(s)
        r = subprocess.run(["mount", "-o", "remount,ro", str(fs)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.strip()}")
        rc, out, err = _main(capsys, ["compare", s, "--reducers", "pca,kpca", "--eval-samples", 64])
        one_line_error(rc, err, "not writable", "compare not started")  # one line: no reducer was fitted
        assert _tree(s) == before
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def test_a_closed_stdout_ends_quietly(base):
    """`globscope info STUDY | head -1`: the reader goes away; the command ends without a word, as Unix tools do."""
    exe = os.path.join(os.path.dirname(sys.executable), "globscope")
    p = subprocess.Popen([exe, "info", base], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # before it writes anything
    err = p.stderr.read()
    rc = p.wait(timeout=120)
    assert rc == 141 and "Broken pipe" not in err and "error" not in err, (rc, err)
    # and when the reader is there, all of it comes through
    rc, out, err = run_cli("info", base)
    assert rc == 0 and out.startswith("study") and "runs" in out


class Untrusted:  # pickled by reference: weights-only loading refuses it
    pass


@pytest.mark.parametrize("how", ["pickle", "torch-zip", "torch-legacy"])
def test_import_of_a_pickle_is_one_line_without_torch_warnings(base, tmp_path, how):
    """Pickle protocol 4 (Python's default): torch warns about the protocol before it refuses the object."""
    path = tmp_path / "model.pt"
    if how == "pickle":
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0], "obj": Untrusted()}, protocol=4))
    else:
        import torch

        torch.save({"w": torch.zeros(2), "obj": Untrusted()}, path, pickle_protocol=4,
                   _use_new_zipfile_serialization=how == "torch-zip")
    s = _copy(base, tmp_path)
    before = _tree(s)
    rc, out, err = run_cli("import", s, path, "--eval-samples", 64)
    one_line_error(rc, err, f"{path}: cannot load as a weights-only checkpoint")
    assert "Warning" not in err and _tree(s) == before


# --- short studies fit; --holdout still asks for the held-out part ---------------------------------------
@pytest.mark.parametrize("cmd", ["fit", "compare"])
def test_a_short_study_fits_without_the_held_out_part(short, tmp_path, capsys, cmd):
    s = _copy(short, tmp_path)
    argv = [cmd, s, "--eval-samples", 64] + (["--reducer", "pca"] if cmd == "fit" else ["--reducers", "pca"])
    rc, out, err = _main(capsys, argv)
    assert rc == 0, err
    notes = [ln for ln in _error_lines(err) if "held-out" in ln]
    assert len(notes) == 1 and "skipped" in notes[0] and "5 or more checkpoints" in notes[0], err
    assert "held-out: skipped: no run has 5 or more checkpoints" in out, out
    with open(os.path.join(s, "report.json")) as f:
        report = json.load(f)
    if cmd == "fit":
        assert os.path.exists(os.path.join(s, "reducers", "pca-2d.pt"))
        assert "5 or more checkpoints" in report["fit-pca-2d"]["held_out"]["skipped"]
    else:
        assert os.path.exists(os.path.join(s, "compare-2d.png"))
        assert "5 or more checkpoints" in report["compare-2d"][0]["ho_skipped"]


@pytest.mark.parametrize("cmd", ["fit", "compare"])
def test_holdout_asked_for_on_a_short_study_is_refused(short, tmp_path, capsys, cmd):
    s = _copy(short, tmp_path)
    before = _tree(s)
    argv = [cmd, s, "--holdout"] + (["--reducer", "pca"] if cmd == "fit" else ["--reducers", "pca"])
    rc, out, err = _main(capsys, argv)
    one_line_error(rc, err, "--holdout", "5 or more checkpoints")
    assert _tree(s) == before


# --- bf16 on CPUs without bf16 units; the CPU in the benchmarks' results ---------------------------------
CPUINFO = {  # the lines that matter of /proc/cpuinfo on each machine
    "AMD EPYC 7B13 (Zen 3: AVX2, no AVX-512)": ("model name\t: AMD EPYC 7B13 64-Core Processor\n"
                                               "flags\t\t: fpu sse sse2 avx avx2 fma bmi2 sha_ni\n", True),
    "Intel Cascade Lake (AVX-512, no BF16)": ("model name\t: Intel(R) Xeon(R) Platinum 8280 CPU @ 2.70GHz\n"
                                              "flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n", True),
    "Intel Sapphire Rapids (AMX)": ("model name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                                    "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n", False),
    "AMD EPYC 9654 (Zen 4: AVX512-BF16)": ("model name\t: AMD EPYC 9654 96-Core Processor\n"
                                           "flags\t\t: avx2 avx512f avx512_bf16\n", False),
    "Arm Neoverse V1 (bf16 feature)": ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", False),
    "Arm Neoverse N1 (no bf16)": ("processor\t: 0\nFeatures\t: fp asimd aes crc32 atomics\n", True),
    "no /proc/cpuinfo (not Linux)": ("", False),
}


@pytest.mark.parametrize("name", list(CPUINFO))
def test_bf16_on_a_cpu_without_bf16_units_is_said_to_be_slow(name):
    from globscope_core.networks.device import bf16_cpu_warning, cpu_info

    text, slow = CPUINFO[name]
    msg = bf16_cpu_warning(text)
    assert (msg is not None) == slow, msg
    if slow:
        assert len(msg.splitlines()) == 1 and "--precision bf16" in msg and "fp32 is faster" in msg
        model = cpu_info(text)["name"]
        assert model is None or model in msg


def test_the_landscape_warns_once_on_this_cpu_when_it_has_no_bf16_units(base, tmp_path, capsys):
    with open("/proc/cpuinfo") as f:
        flags = next((ln.split(":", 1)[1].split() for ln in f if ln.lower().startswith(("flags", "features"))), [])
    if {"avx512_bf16", "amx_bf16", "bf16"} & set(flags):
        pytest.skip("this CPU has bf16 units: no warning is due here (the cases above cover the rule)")
    s = _copy(base, tmp_path)
    _main(capsys, ["fit", s, "--reducer", "pca", "--no-eval"])
    rc, out, err = _main(capsys, ["landscape", s, "--reducer", "pca-2d", "--resolution", 3, "--eval-samples", 16,
                                  "--precision", "bf16", "--device", "cpu", "--no-progress"])
    warnings = [ln for ln in _error_lines(err) if "warning: --precision bf16" in ln]
    assert rc == 0 and len(warnings) == 1 and "fp32 is faster here" in warnings[0], err


def test_bench_results_name_the_cpu_they_were_taken_on(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import machine
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        want = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        if want:
            assert machine.machine()["cpu"] == " ".join(want.split())
    for doc in ({"rows": [1]}, [{"row": 1}]):
        path = str(tmp_path / "r.json")
        machine.write_json(path, doc)
        with open(path) as f:
            got = json.load(f)
        assert got["machine"]["cpu"] and got["machine"]["cpu_count"] == os.cpu_count()
        assert got.get("rows", got.get("results")) == (doc["rows"] if isinstance(doc, dict) else doc)
    # every benchmark writes its JSON through it
    for name in sorted(os.listdir(os.path.join(ROOT, "bench"))):
        if name.endswith(".py") and name != "machine.py":
            with open(os.path.join(ROOT, "bench", name)) as f:
                text = f.read()
            assert "json.dump(" not in text.replace("json.dump(stamped(", ""), f"bench/{name} writes JSON itself"
