"""The ``align`` stage: aligned studies (the methods are in ``alignment/``).

``align_study`` writes a new study in which every run is permuted to a reference run -- one
permutation per run, found at its final checkpoint and applied to all its checkpoints, so
trajectories stay trajectories -- and measures the loss barrier of the straight line between
each run's final model and the reference's, before and after alignment. For a BatchNorm network both with
the models' own (interpolated) running statistics and with the statistics of every point recomputed on a
fixed training subset (Jordan et al., REPAIR: the raw barrier is mostly the variance collapse).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..alignment.methods import make_aligner
from ..alignment.permutation import flat_index, spec_for_model
from ..errors import GlobScopeError
from ..evaluation.paths import barrier, interpolation_curve
from ..networks.batchnorm import BN_SAMPLES, BN_SEED, bn_subset, layout_has_bn
from ..networks.models import study_model
from ..storage import study_files
from ..storage.locks import holding, output_lock


# --- aligning a study ----------------------------------------------------------------------------
# the aligned study: a second align into it waits, then finds the first one's work done (a new --out: the second
# Study.create is refused)
@holding(lambda a: (a["out"], "align"))
def align_study(study_dir: str, out: str, reference: int = 0, method: str = "weight-matching",
                alphas: int = 25, eval_samples: int | None = 2000, seed: int = 0, progress: bool = True,
                plot: bool = True, device="auto", bn_samples: int | None = BN_SAMPLES, **options) -> dict:
    """Write ``out``: ``study_dir`` with every run permuted to run ``reference``. Returns the report.

    Report ("align" in out/report.json): per run the barrier of the straight line to the
    reference's final model (train split, ``eval_samples`` samples, ``alphas`` weights) before and
    after alignment, and the L2 distance between the final models before and after. For a model with BatchNorm
    the barriers (``barrier_before``, ``barrier_after``) use the models' own, interpolated running statistics, and
    ``barrier_before_bn_recomputed`` / ``barrier_after_bn_recomputed`` those recomputed at every point on
    ``bn_samples`` training samples (0: not recomputed); ``batchnorm`` says on what and at what cost.
    The permutations are saved in out/permutations.npz (arrays named ``run{r}/{perm}``).
    ``device``: where activations and barrier losses are computed (weight matching itself is numpy).
    """
    from ..evaluation.one_model import subset
    from ..networks.datasets import load_dataset
    from ..networks.device import resolve_device
    from ..storage.study import Study

    t0 = time.time()
    dev = resolve_device(device)  # --device cuda without a GPU: a clear error before any work
    src = Study.open(study_dir)
    n_runs = len(src.runs)
    if not 0 <= reference < n_runs:
        raise GlobScopeError(f"{src.h5_path}: --reference {reference} is not a run (the study has runs 0..{n_runs - 1})")
    if os.path.abspath(out) == src.dir:
        raise GlobScopeError(f"{out}: the aligned study must be a new directory, not the source study")
    spec = spec_for_model(src.model_spec, src.layout, study_model(src))
    if bn_samples is not None and bn_samples < 0:
        raise GlobScopeError(f"--bn-samples must be 0 (no recomputation) or positive, not {bn_samples}")
    bn_samples = (bn_samples or 0) if layout_has_bn(src.layout) else 0  # nothing to recompute without BatchNorm
    # refused before any work, said when the work starts
    memory = _check_memory(src, spec, alphas, eval_samples, bn_samples, method)
    with output_lock(src, "aligners", what=f"align --method {method}"):  # DEEP-ALIGN trains and saves its net here
        aligner = make_aligner(method, spec, src, seed=seed, device=dev, progress=progress, **options)

    # what decides the aligned study and its report: the same command finds its own finished work
    plan = {"aligned_from": src.h5_path, "reference": int(reference), "method": method, "seed": int(seed),
            "alphas": int(alphas), "eval_samples": eval_samples}
    if layout_has_bn(src.layout):  # only BatchNorm networks: the plans of other aligned studies stay as they were
        plan["bn_samples"] = int(bn_samples)
    if options.get("aligner") is not None:  # only an aligner trained elsewhere: other plans stay as they were
        plan["aligner"] = os.path.abspath(options["aligner"])
    if os.path.exists(study_files.study_h5(out)):
        dst = Study.open(out)
        mine = (dst.plan or {}).get("aligned_from") == src.h5_path
        done = dst.read_report().get("align") if mine and dst.runs else None
        if done is not None:  # finished before (perhaps killed on its way out): the same command is done
            differ = [f"--{k.replace('_', '-')} {dst.plan.get(k)}" for k in plan if dst.plan.get(k) != plan[k]
                      and k != "aligner"]
            if dst.plan.get("aligner") != plan.get("aligner"):  # absent from both: no aligner of another study
                differ.append(f"--aligner {dst.plan['aligner']}" if dst.plan.get("aligner") else "no --aligner")
            if differ:
                raise GlobScopeError(f"{dst.h5_path}: already aligned with {', '.join(differ)} "
                                     "(use another --out)")
            return {**done, "already_done": True}
        if mine and dst.runs:  # killed after its commit, before its report: redo
            os.remove(dst.h5_path)
            dst = Study.create(out, src.model_spec, src.dataset_spec, src.layout, plan=plan)
        if dst.n_checkpoints or dst.runs:  # an empty one is what an interrupted earlier call leaves
            raise GlobScopeError(f"{dst.h5_path}: a study already exists here (use another --out)")
        if dst.model_spec != src.model_spec or dst.layout != src.layout:
            raise GlobScopeError(f"{dst.h5_path}: an empty study for another model is in the way (use another --out)")
        if dst.plan != plan:
            dst.set_plan(plan)
    else:
        dst = Study.create(out, src.model_spec, src.dataset_spec, src.layout, plan=plan)

    print(memory, file=sys.stderr, flush=True)  # after every refusal above: an error stays one line
    ds = load_dataset(src.dataset_spec)
    x, y = subset(ds.train_x, ds.train_y, eval_samples, seed=1)
    bn_x = bn_subset(ds.train_x, bn_samples, BN_SEED) if bn_samples else None
    bn_seconds = 0.0
    al = np.linspace(0.0, 1.0, int(alphas))
    ref_final = src.read_params([src.final_row(reference)])[0]
    ref_state = src.layout.unflatten(torch.from_numpy(ref_final))
    identity = spec.identity(src.layout)
    perms_out, runs_report = {}, []

    bar = tqdm(total=n_runs, desc=f"align ({method})", unit="run", disable=not progress)
    with dst.transaction(extra_bytes=src.n_checkpoints * src.n_params * 4) as w:  # space reserved up front
        for r in range(n_runs):
            final = src.read_params([src.final_row(r)])[0]
            if r == reference:
                perms = identity
            else:
                t_find = time.perf_counter()
                perms = aligner.find(ref_state, src.layout.unflatten(torch.from_numpy(final)))
                find_seconds = time.perf_counter() - t_find
            index = flat_index(spec, src.layout, perms)
            new_run = w.add_run(**{**src.runs[r], "aligned_to": reference, "align_method": method})
            rows = src.run_rows(r, label=None)
            rows = rows[np.argsort(rows, kind="stable")]  # keep the stored order of rows
            block = src.read_params(rows)[:, index]
            for i, row in enumerate(rows):
                w.append(new_run, int(src.step[row]), block[i], label=str(src.labels[row]),
                         **{m: float(v[row]) for m, v in src.metrics.items()})
            for p, q in perms.items():
                perms_out[f"run{r}/{p}"] = np.asarray(q, dtype=np.int64)
            if r != reference:
                aligned = final[index]
                before = interpolation_curve(src, final, ref_final, al, x, y, dev)
                after = interpolation_curve(src, aligned, ref_final, al, x, y, dev)
                recomputed = {}
                if bn_x is not None:  # the same lines with every point's statistics recomputed
                    t_bn = time.time()
                    for key, start in (("before", final), ("after", aligned)):
                        curve = interpolation_curve(src, start, ref_final, al, x, y, dev, bn_x=bn_x)
                        recomputed[f"barrier_{key}_bn_recomputed"] = barrier(curve, al)[0]
                        recomputed[f"loss_{key}_bn_recomputed"] = curve.tolist()
                    bn_seconds += time.time() - t_bn
                runs_report.append({
                    "run": r, "barrier_before": barrier(before, al)[0], "barrier_after": barrier(after, al)[0],
                    "distance_before": float(np.linalg.norm(final - ref_final)),
                    "distance_after": float(np.linalg.norm(aligned - ref_final)),
                    "units_moved": int(sum((np.asarray(q) != np.arange(len(q))).sum() for q in perms.values())),
                    "sweeps": getattr(aligner, "iterations", None), "seconds": round(find_seconds, 4),
                    "loss_before": before.tolist(), "loss_after": after.tolist(), **recomputed})
            bar.update(1)
        _save_npz(study_files.permutations_npz(dst.dir), perms_out)  # before the study commits
    bar.close()
    bb = [d["barrier_before"] for d in runs_report]
    ba = [d["barrier_after"] for d in runs_report]
    report = {"source": src.dir, "reference": reference, "method": method, "split": "train",
              "eval_samples": int(len(x)), "alphas": al.tolist(), "runs": runs_report,
              "mean_barrier_before": float(np.mean(bb)) if bb else 0.0,
              "mean_barrier_after": float(np.mean(ba)) if ba else 0.0,
              "units": {p: int(len(q)) for p, q in identity.items()}, "seconds": round(time.time() - t0, 3),
              "seconds_per_pair": round(float(np.mean([d["seconds"] for d in runs_report])), 4) if bb else 0.0}
    # a learned aligner, alone or refined (its ``start``): where and how long it was trained
    provenance = getattr(aligner, "provenance", None) or getattr(getattr(aligner, "start", None), "provenance", None)
    if provenance is not None:
        report["aligner"] = provenance
    if layout_has_bn(src.layout):
        report["batchnorm"] = {"own_statistics": "interpolated running statistics (barrier_before, barrier_after)",
                               "recomputed_on": None if bn_x is None else f"{len(bn_x)} train samples (seed {BN_SEED})",
                               "samples": 0 if bn_x is None else int(len(bn_x)), "seconds": round(bn_seconds, 3)}
        if bn_x is not None:
            for key in ("before", "after"):
                vals = [d[f"barrier_{key}_bn_recomputed"] for d in runs_report]
                report[f"mean_barrier_{key}_bn_recomputed"] = float(np.mean(vals)) if vals else 0.0
    if plot and runs_report:
        report["plot"] = plot_barriers(report, study_files.align_barriers_png(dst.dir))
    dst.update_report("align", report)
    return report


def _check_memory(src, spec, alphas: int, eval_samples, bn_samples: int = 0, method: str = "") -> str:
    """Refuse aligning when what it needs (resources.estimate_align) does not fit; the ``memory:`` line to say."""
    import math

    from ..resources import estimate_align, memory_line, require
    from .memory_plan import data_bytes, data_libraries

    rows = max((len(src.run_rows(r, label=None)) for r in range(len(src.runs))), default=0)
    units = max(spec.identity(src.layout).values(), key=len, default=())
    shape = (src.model_spec.get("kwargs") or {}).get("input_shape") or [1]
    parts = estimate_align(src.n_params, rows, int(alphas), 4 * len(units) ** 2 * 8,
                           ((eval_samples or 0) + bn_samples) * 4 * math.prod(shape), data_bytes(src.dataset_spec),
                           data_libraries(src.dataset_spec), refine_bytes=_refinement_bytes(method, src))
    require(parts, f"align {src.dir}", hint="use fewer --alphas")
    return memory_line(parts)


def _refinement_bytes(method: str, src) -> int:
    """What a refinement on the loss between the models holds while it works on a pair: autograd's tensors of one
    chunk of samples at each point of the segment (loss-guided: CHUNK samples at 3 points; Sinkhorn: its batch at
    one point) and, at most as large again, their gradients in the backward pass; the permuted and interpolated
    states; its training samples. (A BatchNorm CNN on mnist-5k: 0.93 GiB expected, 0.88 GiB measured.)"""
    import math

    from ..alignment.loss_guided import CHUNK, POINTS
    from .memory_plan import activation_bytes

    if not method.endswith(("+loss", "sinkhorn")):
        return 0
    points = len(POINTS) if method.endswith("+loss") else 1
    largest, saved = activation_bytes(src.model_spec)
    shape = (src.model_spec.get("kwargs") or {}).get("input_shape") or [1]
    samples = 4096 * 4 * math.prod(shape)  # at most sinkhorn's 4096 (loss-guided: 2048) training samples
    return points * CHUNK * 2 * (saved + largest) + (points + 2) * src.n_params * 4 + samples


def _save_npz(path: str, arrays: dict) -> None:
    from ..storage.safe_write import atomic_file

    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def load_permutations(aligned_dir: str) -> dict:
    """{run: {perm: index array}} as saved by align_study (no pickle)."""
    path = study_files.permutations_npz(aligned_dir)
    try:
        with np.load(path, allow_pickle=False) as f:
            out: dict = {}
            for key in f.files:
                run, _, p = key.partition("/")
                out.setdefault(int(run[3:]), {})[p] = f[key]
            return out
    except (OSError, ValueError) as exc:
        raise GlobScopeError(f"{path}: cannot read permutations: {exc}") from None


def plot_barriers(report: dict, path: str) -> str:
    """PNG: loss against the interpolation weight, before (dashed) and after (solid) alignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    al = np.asarray(report["alphas"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colors = plt.get_cmap("tab10")
    for i, d in enumerate(report["runs"]):
        c = colors(i % 10)
        ax.plot(al, d["loss_before"], "--", color=c, alpha=0.8)
        ax.plot(al, d["loss_after"], "-", color=c, label=f"run {d['run']}")
        if "loss_after_bn_recomputed" in d:
            ax.plot(al, d["loss_after_bn_recomputed"], ":", color=c)
    ax.plot([], [], "k--", label=f"raw (mean barrier {report['mean_barrier_before']:.3g})")
    ax.plot([], [], "k-", label=f"aligned (mean barrier {report['mean_barrier_after']:.3g})")
    if "mean_barrier_after_bn_recomputed" in report:
        ax.plot([], [], "k:", label=f"aligned, BatchNorm recomputed ({report['mean_barrier_after_bn_recomputed']:.3g})")
    ax.set_xlabel(f"interpolation weight (0: run, 1: reference run {report['reference']})")
    ax.set_ylabel(f"{report['split']} loss")
    ax.set_title(f"Linear interpolation to the reference, {report['method']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    from ..storage.safe_write import save_figure

    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return os.path.basename(path)


# --- the global view before and after -----------------------------------------------------------
def compare_basins(raw_dir: str, aligned_dir: str, reducer: str = "pca", dim: int = 2, resolution: int | None = None,
                   eval_samples: int | None = 1024, persistence: float | None = None, progress: bool = True,
                   device="auto") -> dict:
    """The same pipeline (fit -> landscape -> topology basins) on the raw and the aligned study.

    The basins of both fields are counted with one absolute persistence threshold: ``persistence``
    (default DEFAULT_PERSISTENCE of stages.topology) times the raw field's loss range.
    Each stage writes its usual files into its study (reducers/, landscape-*, topology-*). Writes a side-by-side quick
    look ``ALIGNED/renders/align-compare-{dim}d.png`` of both loss fields with the final models, and
    the report section ``align-basins-{dim}d`` of the aligned study; returns that section.
    """
    from ..reducers import fit_reducer
    from ..storage.study import Study
    from .landscape import compute_landscape
    from .topology import DEFAULT_PERSISTENCE, study_topology

    name = f"{reducer}-{dim}d"
    out = {"reducer": name, "dim": dim}
    for key, d in (("raw", raw_dir), ("aligned", aligned_dir)):
        study = Study.open(d)
        # fitted afresh: both studies get the very same pipeline
        with output_lock(study, f"fit-{name}"):  # as `globscope fit` saves a reducer
            fit_reducer(study, reducer, dim, **({"device": device} if reducer == "ae" else {}))
        land = compute_landscape(study, name, resolution, eval_samples=eval_samples, progress=progress, device=device)
        if key == "raw":
            basins = study_topology(study.dir, dim=dim, verbose=False, relative=True,
                                    persistence=DEFAULT_PERSISTENCE if persistence is None else persistence)
        else:  # the raw field's absolute threshold: a flatter aligned field must not get a finer one
            basins = study_topology(study.dir, dim=dim, verbose=False, relative=False,
                                    persistence=out["raw"]["threshold"])
        out[key] = {"study": study.dir, "n_basins": basins["n_basins_with_runs"], "basins": basins["basins"],
                    "leaves": basins["leaves"], "threshold": basins["threshold"],
                    "landscape_seconds": land.get("seconds")}
    if dim == 2:
        out["image"] = _plot_side_by_side(raw_dir, aligned_dir, out)
    update = Study.open(aligned_dir)
    update.update_report(f"align-basins-{dim}d", out)
    return out


def _plot_side_by_side(raw_dir: str, aligned_dir: str, section: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..storage import vtk_files
    from .topology import final_points

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), dpi=110)
    for ax, key, d in zip(axes, ("raw", "aligned"), (raw_dir, aligned_dir)):
        f = vtk_files.read_vti(study_files.landscape_vti(d, 2))
        nx, ny, _ = f.dims
        ext = [f.origin[0], f.origin[0] + (nx - 1) * f.spacing[0], f.origin[1], f.origin[1] + (ny - 1) * f.spacing[1]]
        im = ax.imshow(np.log10(np.maximum(f.grid("loss")[0], 1e-6)), origin="lower", extent=ext, aspect="auto",
                       cmap="viridis")
        runs, pos = final_points(study_files.trajectories_vtp(d, 2))
        ax.scatter(pos[:, 0], pos[:, 1], c="red", s=18, edgecolors="white", linewidths=0.5)
        for r, p in zip(runs, pos):
            ax.annotate(str(r), p[:2], color="white", fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{key}: final models in {section[key]['n_basins']} basin(s)")
        fig.colorbar(im, ax=ax, label="log10 loss")
    fig.suptitle(f"Loss landscape ({section['reducer']}) before and after permutation alignment")
    fig.tight_layout()
    path = study_files.align_compare_png(aligned_dir, 2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from ..storage.safe_write import save_figure

    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return os.path.relpath(path, aligned_dir)
