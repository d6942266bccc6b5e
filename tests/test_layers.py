"""The package's layout: layers import only downwards, no import cycles, no private names across packages, and
the parts ParaView's own Python imports stay free of torch and h5py."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = "globscope_core"
# higher imports lower; the algorithm packages share a layer (imports among them are fine, cycles are not)
LAYERS = {"cli": 4, "stages": 3, "reducers": 2, "topology": 2, "alignment": 2, "connectivity": 2, "networks": 2,
          "evaluation": 2, "storage": 1}
BASE = 0  # modules at the package root: errors.py, resources.py


def _modules(root: Path, pkg: str) -> dict[str, Path]:
    out = {}
    for path in (root / pkg).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict, pkg: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of ``pkg``, functions' own included."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in modules else (target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
    return [f for f in found if f[0] == pkg or f[0].startswith(pkg + ".")]


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], BASE) if len(parts) > 1 else 99


def _cycles(graph: dict[str, set]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]; counter[0] += 1; stack.append(start); on.add(start)  # noqa: E702
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)  # noqa: E702
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop(); on.discard(w); comp.append(w)  # noqa: E702
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def check_layout(root: Path, pkg: str = PKG) -> list[str]:
    """Every violation of the layout rules in ``root/pkg``, one line each (empty: the layout holds)."""
    modules = _modules(root, pkg)
    problems, graph = [], {}
    for name, path in sorted(modules.items()):
        graph[name] = set()
        for target, imported, line in _imports(name, path, modules, pkg):
            where = f"{path.relative_to(root)}:{line}"
            if target in modules and target != name:
                graph[name].add(target)
            if target != pkg and _layer(target) > _layer(name):
                problems.append(f"{where}: {name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
            if imported and imported.startswith("_") and not imported.startswith("__") \
                    and target.split(".")[:2] != name.split(".")[:2]:
                problems.append(f"{where}: private name {target}.{imported} used outside its package")
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def test_the_package_keeps_its_layers():
    assert check_layout(REPO) == []


@pytest.mark.parametrize("folder", ["plugin", "state_files", "bench", "tests"])
def test_no_private_names_of_the_package_outside_it(folder):
    bad = []
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PKG):
                bad += [f"{path.relative_to(REPO)}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert bad == []


def _write(root: Path, files: dict) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


def test_the_checker_finds_cycles_upward_imports_and_private_names(tmp_path):
    """The rules above can fail: a made-up package that breaks each one once."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/storage/__init__.py": "",
        "pkg/storage/files.py": "def read():\n    from ..stages.fit import fit  # upward, inside a function\n",
        "pkg/stages/__init__.py": "",
        "pkg/stages/fit.py": "from ..topology.tree import _private\nfrom ..storage import files\n",
        "pkg/topology/__init__.py": "",
        "pkg/topology/tree.py": "from . import kernels\n_private = 1\n",
        "pkg/topology/kernels.py": "from .tree import _private  # same package: allowed\nfrom . import tree\n",
    })
    problems = check_layout(tmp_path, "pkg")
    assert any("pkg.storage.files (layer 1) imports pkg.stages.fit (layer 3)" in p for p in problems)
    assert any("private name pkg.topology.tree._private" in p and "stages/fit.py" in p for p in problems)
    assert not any("kernels.py" in p and "private" in p for p in problems)
    cycles = [p for p in problems if p.startswith("import cycle")]
    assert "import cycle: pkg.topology.kernels -> pkg.topology.tree" in cycles
    assert any("pkg.stages.fit" in c and "pkg.storage.files" in c for c in cycles)


# what ParaView's own Python imports (the plugin, the state-file scripts): numpy only, never torch or h5py
PARAVIEW_SIDE = ["globscope_core.topology", "globscope_core.storage.vtk_files", "globscope_core.storage.study_files",
                 "globscope_core.errors"]


@pytest.mark.parametrize("module", PARAVIEW_SIDE)
def test_paraview_side_imports_neither_torch_nor_h5py(module):
    code = (f"import sys, {module}\n"
            "heavy = sorted(m for m in ('torch', 'h5py') if m in sys.modules)\n"
            "print(' '.join(heavy))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
