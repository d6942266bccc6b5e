#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine (root or sudo), idempotent and quick when already done:
#  - Debian's ParaView 5.11, xvfb and MPI when pvpython is missing (the viewer and the batch renderer)
#  - a virtual environment at .venv with the CPU build of torch (pinned: the local wheel on our machines)
#    and globscope installed (editable) with its test dependencies.
# A user with a GPU: create .venv, install the CUDA torch of your choice into it, then run this script.
# trame (the browser view, `globscope serve`) goes into .venv/paraview-site, for ParaView's own Python: never into the
#   venv's site-packages, whose pip vtk would crash ParaView.
# --with-browser: also Debian's chromium and chromedriver (the browser tests drive a real Chromium).
# --with-ttk: also build the Topology ToolKit's ParaView plugin (and its Python wrappers) for the installed
#   ParaView, into $TTK_PREFIX (default /opt/globscope-ttk/ttk-1.2.0-pv<version>, outside the checkout so later
#   runs and other checkouts reuse it), from $TTK_SOURCE (a tarball or a TTK source directory) or, when unset, a
#   shallow clone of TTK's 1.2.0 tag. ~15-30 min on 2 cores the first time, seconds once installed.
set -euo pipefail
cd "$(dirname "$0")"
WITH_TTK=0
WITH_BROWSER=0
for a in "$@"; do
  case "$a" in
    --with-ttk) WITH_TTK=1 ;;
    --with-browser) WITH_BROWSER=1 ;;
    *) echo "setup: unknown option $a (known: --with-ttk, --with-browser)" >&2; exit 2 ;;
  esac
done

if ! command -v pvpython >/dev/null || ! command -v xvfb-run >/dev/null || ! command -v mpiexec >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Debian's ParaView, xvfb and MPI (a few minutes)"
  $SUDO apt-get update -q
  # python3-numba and python3-h5py make the plugin fast inside ParaView's own Python; iproute2 for the
  # client-server tests' private network namespace. Do not add libexpat1-dev (see shared/paraview.md).
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q paraview python3-paraview xvfb openmpi-bin \
    python3-numba python3-h5py iproute2 >/tmp/globscope-apt.log 2>&1 || { tail -n 30 /tmp/globscope-apt.log; exit 1; }
  $SUDO apt-get clean
fi

if [ "$WITH_BROWSER" = 1 ] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Debian's chromium and chromedriver (the browser tests)"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver >/tmp/globscope-apt.log 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium \
         chromium-driver >/tmp/globscope-apt.log 2>&1; } || { tail -n 30 /tmp/globscope-apt.log; exit 1; }
  $SUDO apt-get clean
fi

PY=${PYTHON:-python3}
stamp=.venv/.globscope-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating .venv and installing globscope"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  # torch first and pinned: a looser requirement with no torch installed pulls the CUDA build (GBs)
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch" || { echo "setup: torch did not install"; exit 1; }
  .venv/bin/pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import globscope_core, torch, vtk, h5py, sklearn, umap, gudhi" || { echo "setup: install failed"; exit 1; }
  echo "$want" > "$stamp"
fi

# trame for ParaView's Python (pinned: globscope_core/stages/serve.py TRAME_PINS); pure Python but aiohttp's
# wheels, built for CPython 3.11 like Debian's ParaView
TRAME=.venv/paraview-site
if [ ! -f "$TRAME/.globscope-installed" ]; then
  echo "setup: installing trame for ParaView's Python into $TRAME"
  rm -rf "$TRAME"
  .venv/bin/pip install -q --disable-pip-version-check --target "$TRAME" trame==4.0.0 trame-vtk==2.11.17 \
    trame-vuetify==3.3.0 2>&1 | grep -v "^WARNING: Location" || true
  [ -d "$TRAME/trame_vtk" ] || { echo "setup: trame did not install"; exit 1; }
  touch "$TRAME/.globscope-installed"
fi

[ "$WITH_TTK" = 1 ] && bash scripts/build-ttk.sh
exit 0
