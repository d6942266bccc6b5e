"""One build step on top of pyproject.toml: ship the ParaView files inside the package.

plugin/ and state_files/ stay at the repository root (ParaView users, CMakeLists.txt and the docs use them there),
so a wheel (``pip install .``, not editable) would not contain them. ``build_py`` copies them into the built
package as ``globscope_core/paraview/plugin`` and ``globscope_core/paraview/state_files`` (siblings, as in the
checkout: pvstate.py finds the plugin at ../plugin), and writes ``globscope_core/paraview/python/globscope_core``,
a stub package for ParaView's own Python (see ``SHIM`` below). globscope_core.stages.paraview_env looks for them
there first, then in the checkout. Editable installs (setup.sh's ``pip install -e``) copy nothing: they use the
checkout's files in place.
"""
from __future__ import annotations

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIRS = ("plugin", "state_files")  # repository root -> globscope_core/paraview/<name>
IGNORE = shutil.ignore_patterns("__pycache__", "*.py[cod]", ".*")

# ParaView's pvpython/pvbatch need ``import globscope_core`` (topology, storage: numpy only) from a PYTHONPATH
# entry that holds nothing else: the installed package's parent is site-packages, whose pip vtk and numpy 2
# would shadow ParaView's own (paraview_env's docstring). This stub is that entry's only content: it runs the
# real package's __init__.py and points __path__ at the real package, so every submodule is the installed one.
SHIM = '''\
"""Stub package written by globscope's setup.py: globscope_core for ParaView's own Python (pvpython, pvbatch).

globscope_core.stages.paraview_env puts the directory above on PYTHONPATH instead of site-packages (whose pip vtk
and numpy 2 would shadow ParaView's own); this stub runs the installed globscope_core/__init__.py and points
__path__ there, so every submodule (globscope_core.topology, globscope_core.storage...) is the installed one.
"""
import os as _os

__path__ = [_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))))]
__file__ = _os.path.join(__path__[0], "__init__.py")
with open(__file__, encoding="utf-8") as _f:
    _code = compile(_f.read(), __file__, "exec")
del _f, _os
exec(_code)
del _code
'''


class build_py_paraview(build_py):
    """build_py, then copy plugin/ and state_files/ into the built package (not for editable installs)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # paraview_env finds the checkout's plugin/ and state_files/
        dest = os.path.join(self.build_lib, "globscope_core", "paraview")
        for name in DATA_DIRS:
            src = os.path.join(HERE, name)
            if not os.path.isfile(os.path.join(src, "GlobScopePlugin.py" if name == "plugin" else "pvstate.py")):
                raise RuntimeError(f"{src}: missing (an sdist without it? see MANIFEST.in)")
            out = os.path.join(dest, name)
            if os.path.isdir(out):
                shutil.rmtree(out)  # no stale files from an earlier build
            shutil.copytree(src, out, ignore=IGNORE)
        shim = os.path.join(dest, "python", "globscope_core")
        os.makedirs(shim, exist_ok=True)
        with open(os.path.join(shim, "__init__.py"), "w", encoding="utf-8") as f:
            f.write(SHIM)


setup(cmdclass={"build_py": build_py_paraview})
