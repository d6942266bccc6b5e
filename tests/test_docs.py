"""The documentation: the README's Python example is docs/api_example.py, and it runs; the README's links resolve."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_readme_example_is_the_example_file():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "README has no Python example"
    code = (REPO / "docs" / "api_example.py").read_text()
    body = code.split('"""', 2)[2].lstrip("\n")  # the file less its docstring
    assert blocks[0] == body


def test_api_example_runs_the_pipeline(tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "docs" / "api_example.py"), str(out)], capture_output=True,
                       text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("study.h5", "reducers/ae-2d.pt", "landscape-2d.vti", "trajectories-2d.vtp", "report.json",
                 "topology-2d/nodes.vtu"):
        assert (out / name).exists(), name
    assert "basins-2d" in r.stdout and "lowest trusted grid loss:" in r.stdout


def test_readme_and_docs_links_resolve():
    missing = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(REPO)}: {target}")
    assert missing == []
