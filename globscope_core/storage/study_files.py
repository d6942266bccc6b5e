"""The names of a study directory's files: every stage, the CLI, the plugin and the state files take them here.

A study directory holds::

    study.h5  paths.h5  report.json                    the store (storage/study.py), connect's points, the report
    reducers/NAME.pt                                   fitted reducers (NAME: <kind>-<dim>d)
    landscape-{2,3}d.vti  trajectories-{2,3}d.vtp      the loss on the latent grid, the runs in latent space
    .landscape-{2,3}d.partial/config.json, chunk-NNNNNN.npz     an unfinished landscape (resumable)
    topology-{2,3}d/{nodes,arcs,diagram}.vtu, segmentation.vti  TTK's merge tree outputs
    connect-A-B.pt .partial.pt .png -{2,3}d.vtp -plane.vti -plane.vtp      `globscope connect`'s curve A-B
    compare-{2,3}d.png                                 `globscope fit compare`
    permutations.npz  align-barriers.png  renders/align-compare-2d.png      an aligned study
    aligners/deep-align.pt                             the learned aligner of a study
    decoded/NAME.safetensors                           models decoded at latent points (`globscope decode`)
    renders/VIEW.png                                   `globscope render`

The standard library only: ParaView's own Python (the plugin, state_files/pvstate.py and fit_view.py) imports
this module, and it has neither torch nor h5py. Also here, for the same readers: which views a study can show
(``available_views``) and the colours of connect's two paths (``CONNECT_PATHS``).
"""
from __future__ import annotations

import glob
import os

from ..errors import GlobScopeError

# --- the store and the report --------------------------------------------------------------------------
STUDY_H5 = "study.h5"
PATHS_H5 = "paths.h5"  # connect's curve and line points: study.h5's layout, kept apart from the ensemble
REPORT = "report.json"


def study_h5(study_dir: str) -> str:
    return os.path.join(study_dir, STUDY_H5)


def paths_h5(study_dir: str) -> str:
    return os.path.join(study_dir, PATHS_H5)


def report_json(study_dir: str) -> str:
    return os.path.join(study_dir, REPORT)


# --- reducers and aligners -----------------------------------------------------------------------------
REDUCERS_DIR = "reducers"
ALIGNERS_DIR = "aligners"


def reducers_dir(study_dir: str) -> str:
    return os.path.join(study_dir, REDUCERS_DIR)


def reducer_file(study_dir: str, name: str) -> str:
    """``STUDY/reducers/NAME.pt``."""
    return os.path.join(study_dir, REDUCERS_DIR, f"{name}.pt")


def reducer_files(study_dir: str, dim: int) -> list[str]:
    """The saved reducers of one latent dimension (``reducers/*-{dim}d.pt``), sorted."""
    return sorted(glob.glob(os.path.join(study_dir, REDUCERS_DIR, f"*-{dim}d.pt")))


DECODED_DIR = "decoded"


def decoded_file(study_dir: str, name: str) -> str:
    """``STUDY/decoded/NAME``: where `globscope decode` and `globscope serve` put decoded models by default."""
    return os.path.join(study_dir, DECODED_DIR, name)


def aligner_file(study_dir: str) -> str:
    """``STUDY/aligners/deep-align.pt``: the learned aligner."""
    return os.path.join(study_dir, ALIGNERS_DIR, "deep-align.pt")


# --- landscapes and merge trees --------------------------------------------------------------------------
TOPOLOGY_FILES = ("nodes.vtu", "arcs.vtu", "segmentation.vti", "diagram.vtu")  # TTK's outputs, in this order
PARTIAL_CONFIG = "config.json"
CHUNK_PATTERN = "chunk-*.npz"
CHUNK_ANY = "chunk-*"  # chunks and their temporary files


def landscape_vti(study_dir: str, dim: int) -> str:
    return os.path.join(study_dir, f"landscape-{dim}d.vti")


def trajectories_vtp(study_dir: str, dim: int) -> str:
    return os.path.join(study_dir, f"trajectories-{dim}d.vtp")


def landscape_partial_dir(study_dir: str, dim: int) -> str:
    """``STUDY/.landscape-{dim}d.partial/``: an unfinished landscape's config and chunks."""
    return os.path.join(study_dir, f".landscape-{dim}d.partial")


def chunk_name(k: int) -> str:
    return f"chunk-{k:06d}.npz"


def topology_dir(study_dir: str, dim: int) -> str:
    return os.path.join(study_dir, f"topology-{dim}d")


def topology_files(directory: str) -> list[str]:
    """[nodes.vtu, arcs.vtu, segmentation.vti, diagram.vtu] in ``directory`` (a study's ``topology-Xd/``)."""
    return [os.path.join(directory, f) for f in TOPOLOGY_FILES]


def view_files(study_dir: str, dim: int) -> list[str]:
    """What the study reader shows for one dimension, in its port order: landscape, trajectories, then the
    merge tree's nodes, arcs, segmentation and diagram."""
    nodes, arcs, segmentation, diagram = topology_files(topology_dir(study_dir, dim))
    return [landscape_vti(study_dir, dim), trajectories_vtp(study_dir, dim), nodes, arcs, segmentation, diagram]


# --- fit, align, render ----------------------------------------------------------------------------------
RENDERS_DIR = "renders"
PERMUTATIONS = "permutations.npz"
ALIGN_BARRIERS = "align-barriers.png"


def compare_png(study_dir: str, dim: int) -> str:
    return os.path.join(study_dir, f"compare-{dim}d.png")


def permutations_npz(study_dir: str) -> str:
    return os.path.join(study_dir, PERMUTATIONS)


def align_barriers_png(study_dir: str) -> str:
    return os.path.join(study_dir, ALIGN_BARRIERS)


def renders_dir(study_dir: str) -> str:
    return os.path.join(study_dir, RENDERS_DIR)


def render_png(out_dir: str, view: str) -> str:
    """The picture of ``view`` in a render directory (default ``STUDY/renders``)."""
    return os.path.join(out_dir, view + ".png")


def align_compare_png(aligned_dir: str, dim: int) -> str:
    return os.path.join(aligned_dir, RENDERS_DIR, f"align-compare-{dim}d.png")


# --- globscope connect -------------------------------------------------------------------------------------
def connect_key(tag: str) -> str:
    """``connect-A-B``: the report section and the stem of the curve's files (``tag``: "A-B")."""
    return f"connect-{tag}"


def connect_base(study_dir: str, key: str) -> str:
    """``STUDY/connect-A-B``: add one of the suffixes below."""
    return os.path.join(study_dir, key)


def connect_pt(base: str) -> str:
    return base + ".pt"


def connect_partial(base: str) -> str:
    return base + ".partial.pt"


def connect_png(base: str) -> str:
    return base + ".png"


def connect_vtp(base: str, dim: int) -> str:
    return f"{base}-{dim}d.vtp"


def plane_vti(base: str) -> str:
    return base + "-plane.vti"


def plane_vtp(base: str) -> str:
    return base + "-plane.vtp"


def plane_paths(vti: str) -> str:
    """The paths drawn in a plane: ``connect-A-B-plane.vtp`` next to ``connect-A-B-plane.vti``."""
    return vti[:-4] + ".vtp"


def connect_files(study_dir: str, kind: str) -> list[str]:
    """``globscope connect``'s files: kind "2d"/"3d" (latent paths .vtp) or "plane" (.vti with its .vtp)."""
    ext = ".vti" if kind == "plane" else ".vtp"
    found = sorted(glob.glob(os.path.join(glob.escape(study_dir), f"connect-*-{kind}{ext}")))
    return [p for p in found if kind != "plane" or os.path.exists(plane_paths(p))]


def connect_key_of(path: str) -> str:
    """``connect-A-B`` of one of its files (``connect-A-B-2d.vtp``, ``connect-A-B-plane.vti``, ...)."""
    return os.path.basename(path).rsplit("-", 1)[0]


def newest_plane(study_dir: str) -> str | None:
    planes = connect_files(study_dir, "plane")
    return max(planes, key=lambda p: (os.path.getmtime(p), p)) if planes else None


# --- what a study can show ---------------------------------------------------------------------------------
VIEWS = {"landscape-2d": 2, "landscape-3d": 3, "trajectories-2d": 2}  # view: the landscape it needs
PLANE_VIEW = "connect-plane"  # the loss in the plane of the newest connect curve


def available_views(study_dir: str) -> list[str]:
    """The views ``study_dir`` has the files for (VIEWS, then PLANE_VIEW); a GlobScopeError when none."""
    have = [n for n, d in VIEWS.items() if os.path.exists(landscape_vti(study_dir, d))]
    if not os.path.isdir(study_dir):
        raise GlobScopeError(f"{study_dir}: not a study directory")
    if not have:
        raise GlobScopeError(f"{study_dir}: no landscape-2d.vti or landscape-3d.vti (run `globscope landscape` first)")
    return have + ([PLANE_VIEW] if newest_plane(study_dir) else [])


# connect's two paths (cell array ``path``): name in ParaView, legend label, colour (RGB, 0-1). Pink: unlike
# the dark red tree arcs, the rainbow runs and viridis; green: thicker than the runs' tubes
CONNECT_PATHS = {0: ("Line", "straight line", (1.0, 0.1, 0.55)), 1: ("Curve", "trained curve", (0.15, 0.95, 0.25))}
CONNECT_LEGEND = "pink: straight line A-B    green: trained low-loss curve"


def hex_colour(rgb) -> str:
    """``(1.0, 0.1, 0.55)`` -> ``"#ff1a8c"`` (matplotlib's form of a ParaView colour)."""
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgb)
