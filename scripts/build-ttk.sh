#!/usr/bin/env bash
# Builds the Topology ToolKit's ParaView plugin and Python wrappers for the installed ParaView (run by
# `setup.sh --with-ttk`; root or sudo). Idempotent: a stamp in the prefix names the source and options, and a
# second run with the same ones returns at once. Every step is timed and logged; a failed step names its log.
#   TTK_PREFIX  install prefix, outside the checkout (default /opt/globscope-ttk/ttk-1.2.0-pv<ParaView major.minor>)
#   TTK_SOURCE  a TTK source tarball or directory (default: shallow clone of the 1.2.0 tag from GitHub)
#   TTK_JOBS    parallel compile jobs (default: number of cores)
# Result: $TTK_PREFIX/bin/plugins/TopologyToolKit/TopologyToolKit.so (loaded by globscope_core.stages.paraview_env) and the
# `topologytoolkit` Python package in $TTK_PREFIX/lib/python3/site-packages. Facts in shared/ttk/BUILD.md.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
command -v pvpython >/dev/null || { echo "setup: TTK needs ParaView first (run setup.sh without --with-ttk)" >&2; exit 1; }
pv=$(dpkg-query -W -f '${Version}' paraview 2>/dev/null | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')
[ -n "$pv" ] || pv=$(pvpython --version 2>/dev/null | sed -nE 's/.* ([0-9]+\.[0-9]+)\..*/\1/p')
[ -n "$pv" ] || { echo "setup: cannot tell the installed ParaView's version (dpkg-query paraview, pvpython --version)" >&2; exit 1; }
PREFIX=${TTK_PREFIX:-/opt/globscope-ttk/ttk-1.2.0-pv$pv}
BUILD_ROOT="$PREFIX.build"   # kept so that a rerun after a failure resumes the compilation
LOGS="$BUILD_ROOT/logs"
PLUGIN_SO="$PREFIX/bin/plugins/TopologyToolKit/TopologyToolKit.so"
MODULES="ttkAlgorithm ttkFTMTree ttkMergeTree ttkPersistenceDiagram ttkTopologicalSimplification
  ttkTopologicalSimplificationByPersistence ttkScalarFieldCriticalPoints ttkArrayPreconditioning"

if [ -n "${TTK_SOURCE:-}" ]; then
  [ -e "$TTK_SOURCE" ] || { echo "setup: TTK_SOURCE=$TTK_SOURCE does not exist" >&2; exit 1; }
  src_abs=$(realpath "$TTK_SOURCE")
  if [ -f "$src_abs" ]; then src_key="tar:$(sha256sum "$src_abs" | cut -c1-16)"
  elif [ -d "$src_abs/.git" ]; then src_key="git:$(git -C "$src_abs" rev-parse HEAD)"
  else src_key="dir:$src_abs"; fi
else
  src_abs=""; src_key="clone:1.2.0"
fi
key="$src_key pv$pv $(echo "$MODULES" | tr -s ' \n' ' ')"
if [ -f "$PLUGIN_SO" ] && [ "$(cat "$PREFIX/.globscope-ttk" 2>/dev/null)" = "$key" ]; then
  echo "setup: TTK already installed in $PREFIX"
  exit 0
fi

mkdir -p "$LOGS"
t_all=$(date +%s)
step() {  # step NAME COMMAND...: runs COMMAND with its output in $LOGS/NAME.log, timed
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "setup: TTK $name ... (log: $LOGS/$name.log)"
  if ! "$@" >"$LOGS/$name.log" 2>&1; then
    echo "setup: TTK step '$name' failed after $(( $(date +%s) - t0 )) s; last lines of $LOGS/$name.log:" >&2
    tail -n 25 "$LOGS/$name.log" >&2
    exit 1
  fi
  echo "setup: TTK $name done in $(( $(date +%s) - t0 )) s"
}

# qtxmlpatterns5-dev-tools is installed first: without it the build fails ~20 min in (BUILD.md trap 2). TTK's
# find_package(ParaView) wants every ParaView/VTK dependency (trap 1). Never name libexpat1-dev (trap 3).
PACKAGES="paraview-dev python3-paraview libboost-dev libopenmpi-dev libutfcpp-dev libdouble-conversion-dev
  liblz4-dev liblzma-dev zlib1g-dev libhdf5-dev libnetcdf-dev libgdal-dev libavcodec-dev libavformat-dev
  libavutil-dev libswscale-dev libtheora-dev libgl2ps-dev libpng-dev libx11-dev libxt-dev qtbase5-dev qttools5-dev
  libqt5svg5-dev libqt5opengl5-dev libglew-dev libgl-dev libjpeg-dev libtiff-dev libfreetype-dev cmake
  ninja-build g++ xz-utils git xvfb"
packages() {
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends qtxmlpatterns5-dev-tools
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -q --no-install-recommends $PACKAGES
  $SUDO apt-get clean
}

fetch() {
  local want="$src_key"
  if [ "$(cat "$BUILD_ROOT/src.key" 2>/dev/null)" = "$want" ] && [ -f "$BUILD_ROOT/src/CMakeLists.txt" ]; then
    echo "source already in place"; return 0
  fi
  rm -rf "$BUILD_ROOT/src" "$BUILD_ROOT/build"
  if [ -z "$src_abs" ]; then
    git clone --depth 1 --branch 1.2.0 https://github.com/topology-tool-kit/ttk.git "$BUILD_ROOT/src"
  elif [ -f "$src_abs" ]; then
    mkdir -p "$BUILD_ROOT/src"
    tar -xaf "$src_abs" -C "$BUILD_ROOT/src" --strip-components=1
  else
    mkdir -p "$BUILD_ROOT/src"
    tar -C "$src_abs" --exclude=.git -cf - . | tar -C "$BUILD_ROOT/src" -xf -
  fi
  [ -f "$BUILD_ROOT/src/CMakeLists.txt" ] || { echo "no CMakeLists.txt at the top of the TTK source"; return 1; }
  echo "$want" > "$BUILD_ROOT/src.key"
}

configure() {
  local opts=() m
  for m in $MODULES; do
    # 1.2.0 has ttkFTMTree, newer TTK ttkMergeTree: enable the ones this source has
    [ -d "$BUILD_ROOT/src/core/vtk/$m" ] && opts+=("-DVTK_MODULE_ENABLE_$m=YES")
  done
  cmake -S "$BUILD_ROOT/src" -B "$BUILD_ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$PREFIX" -DCMAKE_INSTALL_RPATH="$PREFIX/lib" -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
    -DTTK_BUILD_PARAVIEW_PLUGINS=ON -DTTK_BUILD_VTK_WRAPPERS=ON -DTTK_BUILD_STANDALONE_APPS=OFF \
    -DTTK_WHITELIST_MODE=ON -DTTK_PYTHON_MODULE_DIR=lib/python3/site-packages "${opts[@]}"
}

python_targets() {
  ninja -C "$BUILD_ROOT/build" -t targets all | sed -nE 's/^(ttk[A-Za-z]+Python): phony$/\1/p' | sort -u
}

compile() {
  # only the plugin and the wrapped modules: a full build compiles every base library (~2x the steps)
  local py; py=$(python_targets | tr '\n' ' ')
  [ -n "$py" ] || { echo "no ttk*Python targets in the build (TTK_BUILD_VTK_WRAPPERS / ParaView's Python?)"; return 1; }
  echo "targets: TopologyToolKit $py"
  # shellcheck disable=SC2086
  ninja -C "$BUILD_ROOT/build" -j "${TTK_JOBS:-$(nproc)}" TopologyToolKit $py
}

install_files() {
  local b="$BUILD_ROOT/build" stage="$PREFIX.new"
  rm -rf "$stage"
  mkdir -p "$stage/lib" "$stage/bin/plugins/TopologyToolKit" "$stage/lib/python3/site-packages"
  cp -a "$b"/lib/libttk*.so* "$stage/lib/"
  cp -a "$b/lib/TopologyToolKit/TopologyToolKit.so" "$stage/bin/plugins/TopologyToolKit/"
  cp -a "$b/lib/python3/site-packages/topologytoolkit" "$stage/lib/python3/site-packages/"
  echo "$key" > "$stage/.globscope-ttk"
  # swap in whole, so an interrupted install never leaves a half prefix that looks installed
  rm -rf "$PREFIX.old"; [ -e "$PREFIX" ] && mv "$PREFIX" "$PREFIX.old"
  mv "$stage" "$PREFIX"; rm -rf "$PREFIX.old"
}

check() {
  # the plugin loads and its merge-tree filter runs in pvpython (C++ proxies and Python wrappers)
  local x=(); [ -n "${DISPLAY:-}" ] || x=(xvfb-run -a)
  PYTHONPATH="$PREFIX/lib/python3/site-packages" "${x[@]}" pvpython -c "
from paraview.simple import *
LoadPlugin('$PLUGIN_SO', ns=globals())
import topologytoolkit
print('TTK plugin and topologytoolkit load')
"
}

# shellcheck disable=SC2086
if ! dpkg -s qtxmlpatterns5-dev-tools $PACKAGES >/dev/null 2>&1; then
  step packages packages
fi
step fetch fetch
step configure configure
step compile compile
step install install_files
step check check
echo "setup: TTK installed in $PREFIX in $(( $(date +%s) - t_all )) s"
