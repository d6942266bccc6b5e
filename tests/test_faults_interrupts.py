"""Interrupts and odd files (issue 24, item 9): Ctrl-C and SIGTERM say the exact command that continues,
symbolic links stay links, a path that is not UTF-8 is refused before the work, a FIFO is never opened.

Real processes and real signals (SIGINT is what Ctrl-C sends), on tiny studies.
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import default_signals, make_ready_study

from globscope_core.storage.study import Study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "globscope_core.cli"]
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(scope="module")
def ready(tmp_path_factory):
    return make_ready_study(tmp_path_factory.mktemp("interrupts") / "study")


def _copy(ready, dst) -> str:
    shutil.copytree(ready[0], dst)
    return str(dst)


def _spawn(argv):
    return subprocess.Popen([*CLI, *map(str, argv)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_signals)


def _until(cond, proc, what, timeout=240):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"it ended (exit {proc.returncode}) before {what}"
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)


def _leftovers(d):
    return [p for p in glob.glob(os.path.join(d, "**", "*"), recursive=True) if ".tmp-" in os.path.basename(p)]


# --- Ctrl-C and SIGTERM: the message names the command that continues -------------------------------------------
def _case(stage, d, out):
    """(argv, when to interrupt, the command's text after "interrupted: ")"""
    if stage == "train":
        argv = ["train", "--dataset", "digits", "--model", "mlp", "--model-arg", "widths=[16]", "--out", out,
                "--runs", 4, "--epochs", 40, "--eval-samples", 256]
        # 40 epochs: a run takes seconds, so the signal lands while runs 1-3 still train (at 3 epochs all four
        # runs took 1.2 s and CI's process once ended with 0 before the signal arrived)
        return argv, lambda: os.path.exists(os.path.join(out, "study.h5")), "the finished runs are kept; continue with"
    if stage == "landscape":  # started with --fresh: continuing with it would throw the kept chunks away
        argv = ["landscape", d, "--reducer", "pca-2d", "--resolution", 17, "--chunk-points", 8, "--eval-samples", 64,
                "--no-progress", "--fresh"]
        return argv, lambda: len(glob.glob(os.path.join(d, ".landscape-2d.partial", "chunk-*"))) >= 2, \
            "the finished chunks are kept; continue with"
    if stage == "connect":
        argv = ["connect", d, "--runs", 0, 1, "--epochs", 10, "--batch-size", 256, "--points", 11,
                "--eval-samples", 64, "--plane-resolution", 0, "--reducer", "pca-2d"]
        return argv, lambda: os.path.exists(os.path.join(d, "connect-0-1.partial.pt")), \
            "the curve's training so far is kept; continue with"
    assert stage == "fit"  # interrupted in the autoencoder's training (its progress bar has begun)
    argv = ["fit", d, "--reducer", "ae", "--epochs", 2000, "--no-holdout", "--eval-samples", 64]
    return argv, "fit ae-2d:", "nothing was kept; rerun"


@pytest.mark.parametrize("stage,sig", [("train", signal.SIGINT), ("landscape", signal.SIGTERM),
                                       ("connect", signal.SIGTERM), ("fit", signal.SIGINT)])
def test_an_interrupt_names_the_command_that_continues(stage, sig, ready, tmp_path):
    """Issue 24.9: Ctrl-C said "rerun to resume" but the rerun was refused without --resume, and fit cannot
    resume; SIGTERM ended the command without a word."""
    import threading

    d = _copy(ready, tmp_path / "s")
    argv, started, kept = _case(stage, d, str(tmp_path / "t"))
    p = _spawn(argv)
    buf = []
    pump = threading.Thread(target=lambda: buf.extend(iter(lambda: p.stderr.read(1), "")), daemon=True)
    pump.start()
    if isinstance(started, str):  # a progress bar's text on stderr
        marker = started
        started = lambda: marker in "".join(buf[-4000:])  # noqa: E731
    _until(started, p, "the work began")
    p.send_signal(sig)
    p.wait(timeout=120)
    pump.join(timeout=60)
    err = "".join(buf).replace("\r", "\n")
    assert p.returncode == (143 if sig == signal.SIGTERM else 130), (p.returncode, err)
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"globscope {stage}: interrupted: {kept}: "), err
    command = shlex.split(last.split(f"{kept}: ", 1)[1])
    expect = ["globscope", *map(str, argv)]
    if stage == "train":
        expect.append("--resume")  # refused without it: the study exists now
    if stage == "landscape":
        expect.remove("--fresh")
    assert command == expect
    assert not _leftovers(str(tmp_path))  # the same cleanup as any failure: no temporaries left
    if stage == "fit":
        assert not os.path.exists(os.path.join(d, "reducers", "ae-2d.pt"))  # "nothing was kept": true
        return  # and the rerun is the command itself
    if stage == "landscape":
        assert glob.glob(os.path.join(d, ".landscape-2d.partial", "chunk-*"))  # kept, as it says
    r = subprocess.run([*CLI, *command[1:]], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    if stage == "train":
        assert sorted(run["seed"] for run in Study.open(str(tmp_path / "t")).runs) == [0, 1, 2, 3]
    elif stage == "landscape":
        section = Study.open(d).read_report()["landscape-2d"]
        assert section["complete"] and section["points_computed_now"] < 17 * 17  # resumed, not redone
    else:
        assert "connect-0-1" in Study.open(d).read_report()


DROPPED = """
import signal, sys, time
from globscope_core.cli import stop_signals

class Finalized:
    def __del__(self):  # where h5py's weak-reference callbacks once received CI's Ctrl-C
        raise {exc}

with stop_signals():
    try:
        Finalized()  # Python drops what its finalizer raised
        time.sleep(10)
        print("ran on")
    except KeyboardInterrupt as exc:
        print("interrupted", getattr(exc, "signum", signal.SIGINT))
"""


@pytest.mark.parametrize("exc,signum", [("KeyboardInterrupt", signal.SIGINT),
                                        ("__import__('globscope_core.errors').errors.Terminated(15)", signal.SIGTERM)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_dropped_in_a_finalizer_is_raised_again(exc, signum):
    """CI: a Ctrl-C that landed in a weak-reference callback during train's commit was dropped by Python with a
    traceback, and train ran to its end (exit 0)."""
    r = subprocess.run([sys.executable, "-c", DROPPED.format(exc=exc)], env=ENV, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["interrupted", str(int(signum))]
    assert "Traceback" not in r.stderr and "ignored" not in r.stderr, r.stderr


# --- symbolic links ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["study.h5", "report.json", "reducers/pca-2d.pt"])
def test_a_symlinked_file_stays_a_link_and_its_target_is_written(name, ready, tmp_path):
    """Issue 24.9: a study.h5 that is a symlink was replaced by a regular file at the first write."""
    d = _copy(ready, tmp_path / "s")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = str(elsewhere / os.path.basename(name))
    link = os.path.join(d, name)
    shutil.move(link, target)
    os.symlink(target, link)
    if name == "study.h5":
        from globscope_core.stages.import_ import import_checkpoints

        n = len(Study.open(d).runs)
        import_checkpoints(d, [ready[1]], eval_samples=64)
        assert len(Study.open(d).runs) == n + 1
    elif name == "report.json":
        from globscope_core.storage.study import update_report

        update_report(d, "new-section", {"x": 1})
        assert Study.open(d).read_report()["new-section"] == {"x": 1}
    else:
        from globscope_core.reducers import fit_reducer

        before = os.path.getmtime(target)
        fit_reducer(Study.open(d), "pca", 2, max_rank=3)
        assert os.path.getmtime(target) > before
    assert os.path.islink(link) and os.path.realpath(link) == os.path.realpath(target)
    assert not _leftovers(str(tmp_path))


# --- a study path that is not UTF-8 --------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["landscape", "topology", "connect"])
def test_a_path_that_is_not_utf8_is_refused_before_the_work(stage, ready, tmp_path):
    """Issue 24.9: a non-UTF-8 byte in the study path aborted `landscape` after the work (VTK's writer)."""
    d = os.path.join(os.fsdecode(bytes(tmp_path) + b"/bad\xffname"), "study")
    os.makedirs(os.path.dirname(d))
    shutil.copytree(ready[0], d)
    before = sorted(p for p in os.listdir(d) if not p.endswith(".lock"))
    argv = {"landscape": ["landscape", d, "--reducer", "pca-2d", "--resolution", 9, "--no-progress"],
            "topology": ["topology", d],
            "connect": ["connect", d, "--runs", 0, 1, "--epochs", 1, "--points", 5, "--plane-resolution", 0]}[stage]
    t0 = time.time()
    r = subprocess.run([*CLI, *map(str, argv)], env=ENV, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ": error: " in ln]  # (notes may come before it)
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "bad\\xffname/study: the path is not valid UTF-8 (byte 0xff)" in lines[0] and f"{stage} not started" in lines[0]
    assert sorted(p for p in os.listdir(d) if not p.endswith(".lock")) == before  # nothing was computed
    assert time.time() - t0 < 120


# --- files that are not regular files --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo.pt", "fifo.safetensors", "device.pt"])
def test_import_refuses_what_is_not_a_regular_file_without_opening_it(kind, ready, tmp_path):
    """Issue 24.9: importing a FIFO blocked forever (and a device was called "pickled objects")."""
    d = _copy(ready, tmp_path / "s")
    path = str(tmp_path / kind)
    if kind.startswith("fifo"):
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)
    try:
        r = subprocess.run([*CLI, "import", d, path, "--eval-samples", "64"], env=ENV, capture_output=True,
                           text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"import of {kind} blocked")
    lines = [ln for ln in r.stderr.splitlines() if ": error: " in ln]  # (notes may come before it)
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    what = "a FIFO (named pipe)" if kind.startswith("fifo") else "a device"
    assert f"{path}: is {what}, not a checkpoint file" in lines[0]
    assert len(Study.open(d).runs) == len(Study.open(ready[0]).runs)


def test_the_interrupt_message_is_one_line_per_command():
    """The table of what each command keeps: every command of the CLI has a line, the option it needs is added
    once and --fresh is dropped (abbreviated too, as argparse accepts it)."""
    from globscope_core.cli import build_parser, interrupted_message

    commands = build_parser()._subparsers._group_actions[0].choices
    for c in commands:
        msg = interrupted_message(c, [c, "x"])
        assert msg.startswith(f"globscope {c}: interrupted") and "\n" not in msg
    assert interrupted_message("train", ["train", "--out", "a b", "--res"]).endswith("globscope train --out 'a b' --res")
    assert interrupted_message("landscape", ["landscape", "s", "--fre", "--reducer", "ae-2d"]).endswith(
        "continue with: globscope landscape s --reducer ae-2d")
    for c in ("fit", "compare", "topology", "import", "render"):
        assert interrupted_message(c, [c, "s"]) == f"globscope {c}: interrupted: nothing was kept; rerun: globscope {c} s"
