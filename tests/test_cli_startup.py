"""CLI startup (cli/): subcommands that need no torch start without importing it (issue 16), in a fresh process."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from globscope_core.storage import vtk_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = ("import sys; from globscope_core.cli import main; rc = main(sys.argv[1:]); "
        "print('RC', rc, 'TORCH', 'torch' in sys.modules)")


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", CODE, *args], env=env, capture_output=True, text=True, timeout=300)
    last = [ln for ln in p.stdout.splitlines() if ln.startswith("RC ")]
    assert p.returncode == 0 and last, p.stdout[-2000:] + p.stderr[-2000:]
    rc, torch_loaded = last[-1].split()[1], last[-1].split()[3]
    return int(rc), torch_loaded == "True", p


def test_topology_and_info_do_not_import_torch(tiny_study, tmp_path):
    v = np.random.default_rng(0).random((1, 20, 30)).astype(np.float32)
    src = str(tmp_path / "f.vti")
    vtk_files.write_vti(src, vtk_files.ImageField((30, 20, 1), (0, 0, 0), (1, 1, 1), {"loss": v.ravel()}, {}, "loss"))
    rc, torch_loaded, p = run_cli("topology", src, "--out", str(tmp_path / "t"))
    assert rc == 0 and os.path.exists(tmp_path / "t" / "diagram.vtu")
    assert not torch_loaded, "globscope topology imported torch"
    rc, torch_loaded, p = run_cli("info", tiny_study.dir)
    assert rc == 0 and "run   0" in p.stdout
    assert not torch_loaded, "globscope info imported torch"


@pytest.mark.parametrize("cmd", ["render", "paraview", "serve"])
def test_render_and_paraview_do_not_import_torch(tmp_path, cmd):
    # a directory that is no study: the command runs its checks and stops with a one-line error
    rc, torch_loaded, p = run_cli(cmd, str(tmp_path))
    assert rc == 2 and "Traceback" not in p.stderr
    assert not torch_loaded, f"globscope {cmd} imported torch"
