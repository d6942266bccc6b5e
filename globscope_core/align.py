"""Aligning models by permutation: weight matching, activation matching, and aligned studies.

An ``Aligner`` finds, for a model ``other``, the permutations (see permutation.py) that bring it
closest to a reference model: ``find(ref_state, other_state) -> {perm name: index array}``.
Methods are registered in ``ALIGNERS`` by name; a new one (a learned aligner such as Deep-Align)
subclasses ``Aligner`` and registers a factory ``(spec, study, **options) -> Aligner``.

``align_study`` writes a new study in which every run is permuted to a reference run -- one
permutation per run, found at its final checkpoint and applied to all its checkpoints, so
trajectories stay trajectories -- and measures the loss barrier of the straight line between
each run's final model and the reference's, before and after alignment.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from .errors import GlobScopeError
from .permutation import PermutationSpec, flat_index, spec_for_model


class Aligner:
    """Finds permutations of ``other`` that match it to ``ref``. States are {name: tensor}."""

    name = "base"

    def __init__(self, spec: PermutationSpec):
        self.spec = spec

    def find(self, ref_state: dict, other_state: dict) -> dict:
        raise NotImplementedError


def _np64(state: dict, names) -> dict:
    return {n: np.asarray(torch.as_tensor(state[n]).detach().cpu(), dtype=np.float64) for n in names}


class WeightMatching(Aligner):
    """Git Re-Basin weight matching (Ainsworth et al., Algorithm 1).

    For one permutation at a time (the others fixed), maximising the summed inner products
    <W_ref, permuted W_other> over all weights it touches is a linear assignment problem on
    the matrix sum_w W_ref(axis) W_other(axis)^T. Permutations are swept in random order until a
    full sweep improves nothing (coordinate ascent: the objective never decreases).
    """

    name = "weight-matching"

    def __init__(self, spec: PermutationSpec, max_iter: int = 100, seed: int = 0):
        super().__init__(spec)
        self.max_iter, self.seed = int(max_iter), int(seed)
        self.iterations = 0

    def find(self, ref_state: dict, other_state: dict, init: dict | None = None) -> dict:
        """``init``: permutations to start from (deep-align+wm), else the identity."""
        spec = self.spec
        a, b = _np64(ref_state, spec.axes), _np64(other_state, spec.axes)
        sizes = spec.sizes({n: w.shape for n, w in a.items()})
        places = spec.perm_to_axes
        names = sorted(sizes)
        perm = {p: np.asarray(init[p]) if init else np.arange(n) for p, n in sizes.items()}
        rng = np.random.default_rng(self.seed)
        for it in range(self.max_iter):
            improved = False
            for p in (names[i] for i in rng.permutation(len(names))):
                n = sizes[p]
                cost = np.zeros((n, n))
                for wname, axis in places[p]:
                    wb = _permute_one(spec, perm, wname, b[wname], skip_axis=axis)
                    wa = np.moveaxis(a[wname], axis, 0).reshape(n, -1)
                    wb = np.moveaxis(wb, axis, 0).reshape(n, -1)
                    cost += wa @ wb.T
                _, cols = linear_sum_assignment(cost, maximize=True)
                old = cost[np.arange(n), perm[p]].sum()
                new = cost[np.arange(n), cols].sum()
                if new > old + 1e-12 * max(1.0, abs(old)):
                    improved = True
                    perm[p] = cols
            self.iterations = it + 1
            if not improved:
                break
        return perm


def _permute_one(spec: PermutationSpec, perm: dict, name: str, w: np.ndarray, skip_axis: int) -> np.ndarray:
    """Entry ``name`` with every permutation applied except the one on ``skip_axis``."""
    for i, p in enumerate(spec.axes[name]):
        if p is not None and i != skip_axis:
            w = np.take(w, perm[p], axis=i)
    return w


class ActivationMatching(Aligner):
    """Match units by the correlation of their activations on data (Ainsworth et al.; Li et al. 2015).

    Both models run on the same inputs; for each permutation the outputs of the module named in
    ``spec.activations`` (channels on axis 1; spatial positions count as samples) are standardised
    and the assignment maximising the summed correlation is chosen. Units of one layer are
    functionally the same set whatever the other layers' permutations, so each permutation is
    solved on its own.
    """

    name = "activation-matching"

    def __init__(self, spec: PermutationSpec, build_model, x: torch.Tensor, batch_size: int = 1024, device="cpu"):
        super().__init__(spec)
        missing = [p for p in spec.perm_names if p not in spec.activations]
        if missing:
            raise GlobScopeError(f"activation matching: the permutation spec names no activation for {', '.join(missing)}")
        self.build_model, self.batch_size, self.device = build_model, batch_size, torch.device(device)
        self.x = x.to(self.device)

    @torch.no_grad()
    def _activations(self, state: dict) -> dict:
        model = self.build_model()
        model.load_state_dict(state, strict=False)
        model.to(self.device).eval()
        modules = dict(model.named_modules())
        feats: dict = {p: [] for p in self.spec.activations}
        hooks = []
        for p, mod_name in self.spec.activations.items():
            if mod_name not in modules:
                raise GlobScopeError(f"activation matching: the model has no module '{mod_name}'")

            def hook(_m, _inp, out, p=p):
                out = out.detach().to(torch.float64)
                feats[p].append(out.movedim(1, -1).reshape(-1, out.shape[1]) if out.ndim > 2 else out)

            hooks.append(modules[mod_name].register_forward_hook(hook))
        try:
            for s in range(0, len(self.x), self.batch_size):
                model(self.x[s : s + self.batch_size])
        finally:
            for h in hooks:
                h.remove()
        return {p: torch.cat(v).cpu().numpy() for p, v in feats.items()}

    def find(self, ref_state: dict, other_state: dict) -> dict:
        fa, fb = self._activations(ref_state), self._activations(other_state)
        perm = {}
        for p in self.spec.perm_names:
            za = (fa[p] - fa[p].mean(0)) / (fa[p].std(0) + 1e-8)  # dead units: correlation 0 with everything
            zb = (fb[p] - fb[p].mean(0)) / (fb[p].std(0) + 1e-8)
            corr = za.T @ zb / len(za)
            perm[p] = linear_sum_assignment(corr, maximize=True)[1]
        return perm


def _make_weight_matching(spec, study, max_iter=100, seed=0, **_):
    return WeightMatching(spec, max_iter=max_iter, seed=seed)


def _make_activation_matching(spec, study, act_samples=1024, seed=0, device="cpu", **_):
    from .data import load_dataset
    from .evaluation import subset

    ds = load_dataset(study.dataset_spec)
    x, _ = subset(ds.train_x, ds.train_y, act_samples, seed=seed)
    return ActivationMatching(spec, study.build_model, x, device=device)


def _make_deep_align(spec, study, **options):
    from .deep_align import make_deep_align  # learned aligner (DEEP-ALIGN), trained on the study when needed

    return make_deep_align(spec, study, **options)


ALIGNERS = {"weight-matching": _make_weight_matching, "activation-matching": _make_activation_matching,
            "deep-align": _make_deep_align,
            "deep-align+wm": lambda spec, study, **o: _make_deep_align(spec, study, refine=True, **o)}


def make_aligner(method: str, spec: PermutationSpec, study, **options) -> Aligner:
    if method not in ALIGNERS:
        raise GlobScopeError(f"unknown alignment method '{method}'; choose one of {', '.join(ALIGNERS)}")
    return ALIGNERS[method](spec, study, **options)


# --- interpolation barriers ----------------------------------------------------------------------
def losses_of_rows(study, rows: np.ndarray, x: torch.Tensor, y: torch.Tensor, device="cpu") -> np.ndarray:
    """Mean cross-entropy of each flat parameter row [B, P] of ``study``'s model on (x, y), batched."""
    from .batched import evaluate_flat

    rows = torch.as_tensor(np.asarray(rows, dtype=np.float32))
    return evaluate_flat(study, rows, x, y, device=device)[0].astype(np.float64)


def interpolation_curve(study, a: np.ndarray, b: np.ndarray, alphas: np.ndarray, x, y, device="cpu") -> np.ndarray:
    """Loss along (1 - alpha) a + alpha b (the whole flat state; BatchNorm running statistics are
    interpolated too, which is not what a recomputed BN would give: REPAIR-style resets are not done)."""
    path = (1.0 - alphas[:, None]) * a[None].astype(np.float64) + alphas[:, None] * b[None].astype(np.float64)
    return losses_of_rows(study, path.astype(np.float32), x, y, device)


def barrier(curve: np.ndarray, alphas: np.ndarray) -> float:
    """Entezari et al.: max over alpha of loss minus the straight line between the end losses."""
    return float(np.max(curve - ((1.0 - alphas) * curve[0] + alphas * curve[-1])))


# --- aligning a study ----------------------------------------------------------------------------
def _final_row(study, run: int) -> int:
    rows = study.run_rows(run)
    if not len(rows):
        rows = study.run_rows(run, label=None)
    if not len(rows):
        raise GlobScopeError(f"{study.h5_path}: run {run} has no checkpoints")
    return int(rows[-1])


def align_study(study_dir: str, out: str, reference: int = 0, method: str = "weight-matching",
                alphas: int = 25, eval_samples: int | None = 2000, seed: int = 0, progress: bool = True,
                plot: bool = True, device="auto", **options) -> dict:
    """Write ``out``: ``study_dir`` with every run permuted to run ``reference``. Returns the report.

    Report ("align" in out/report.json): per run the barrier of the straight line to the
    reference's final model (train split, ``eval_samples`` samples, ``alphas`` weights) before and
    after alignment, and the L2 distance between the final models before and after.
    The permutations are saved in out/permutations.npz (arrays named ``run{r}/{perm}``).
    ``device``: where activations and barrier losses are computed (weight matching itself is numpy).
    """
    from .data import load_dataset
    from .evaluation import resolve_device, subset
    from .store import Study

    t0 = time.time()
    dev = resolve_device(device)  # --device cuda without a GPU: a clear error before any work
    src = Study.open(study_dir)
    n_runs = len(src.runs)
    if not 0 <= reference < n_runs:
        raise GlobScopeError(f"{src.h5_path}: --reference {reference} is not a run (the study has runs 0..{n_runs - 1})")
    if os.path.abspath(out) == src.dir:
        raise GlobScopeError(f"{out}: the aligned study must be a new directory, not the source study")
    spec = spec_for_model(src.model_spec, src.layout, src.build_model())
    aligner = make_aligner(method, spec, src, seed=seed, device=dev, progress=progress, **options)

    # what decides the aligned study and its report: the same command finds its own finished work
    plan = {"aligned_from": src.h5_path, "reference": int(reference), "method": method, "seed": int(seed),
            "alphas": int(alphas), "eval_samples": eval_samples}
    if os.path.exists(os.path.join(out, "study.h5")):
        dst = Study.open(out)
        mine = (dst.plan or {}).get("aligned_from") == src.h5_path
        done = dst.read_report().get("align") if mine and dst.runs else None
        if done is not None:  # finished before (perhaps killed on its way out): the same command is done
            differ = [f"--{k.replace('_', '-')} {dst.plan.get(k)}" for k in plan if dst.plan.get(k) != plan[k]]
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

    ds = load_dataset(src.dataset_spec)
    x, y = subset(ds.train_x, ds.train_y, eval_samples, seed=1)
    al = np.linspace(0.0, 1.0, int(alphas))
    ref_final = src.read_params([_final_row(src, reference)])[0]
    ref_state = src.layout.unflatten(torch.from_numpy(ref_final))
    identity = spec.identity(src.layout)
    perms_out, runs_report = {}, []

    bar = tqdm(total=n_runs, desc=f"align ({method})", unit="run", disable=not progress)
    with dst.transaction(extra_bytes=src.n_checkpoints * src.n_params * 4) as w:  # space reserved up front
        for r in range(n_runs):
            final = src.read_params([_final_row(src, r)])[0]
            if r == reference:
                perms = identity
            else:
                perms = aligner.find(ref_state, src.layout.unflatten(torch.from_numpy(final)))
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
                runs_report.append({
                    "run": r, "barrier_before": barrier(before, al), "barrier_after": barrier(after, al),
                    "distance_before": float(np.linalg.norm(final - ref_final)),
                    "distance_after": float(np.linalg.norm(aligned - ref_final)),
                    "units_moved": int(sum((np.asarray(q) != np.arange(len(q))).sum() for q in perms.values())),
                    "sweeps": getattr(aligner, "iterations", None),
                    "loss_before": before.tolist(), "loss_after": after.tolist()})
            bar.update(1)
        _save_npz(os.path.join(dst.dir, "permutations.npz"), perms_out)  # before the study commits
    bar.close()
    bb = [d["barrier_before"] for d in runs_report]
    ba = [d["barrier_after"] for d in runs_report]
    report = {"source": src.dir, "reference": reference, "method": method, "split": "train",
              "eval_samples": int(len(x)), "alphas": al.tolist(), "runs": runs_report,
              "mean_barrier_before": float(np.mean(bb)) if bb else 0.0,
              "mean_barrier_after": float(np.mean(ba)) if ba else 0.0,
              "units": {p: int(len(q)) for p, q in identity.items()}, "seconds": round(time.time() - t0, 3)}
    if plot and runs_report:
        report["plot"] = plot_barriers(report, os.path.join(dst.dir, "align-barriers.png"))
    dst.update_report("align", report)
    return report


def _save_npz(path: str, arrays: dict) -> None:
    from .safe_write import atomic_file

    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def load_permutations(aligned_dir: str) -> dict:
    """{run: {perm: index array}} as saved by align_study (no pickle)."""
    path = os.path.join(aligned_dir, "permutations.npz")
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
    ax.plot([], [], "k--", label=f"raw (mean barrier {report['mean_barrier_before']:.3g})")
    ax.plot([], [], "k-", label=f"aligned (mean barrier {report['mean_barrier_after']:.3g})")
    ax.set_xlabel(f"interpolation weight (0: run, 1: reference run {report['reference']})")
    ax.set_ylabel(f"{report['split']} loss")
    ax.set_title(f"Linear interpolation to the reference, {report['method']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    from .safe_write import save_figure

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
    (default DEFAULT_PERSISTENCE of topology_io) times the raw field's loss range.
    Each stage writes its usual files into its study (reducers/, landscape-*, topology-*). Writes a side-by-side quick
    look ``ALIGNED/renders/align-compare-{dim}d.png`` of both loss fields with the final models, and
    the report section ``align-basins-{dim}d`` of the aligned study; returns that section.
    """
    from .landscape import compute_landscape
    from .reducers import fit_reducer
    from .store import Study
    from .topology_io import DEFAULT_PERSISTENCE, study_topology

    name = f"{reducer}-{dim}d"
    out = {"reducer": name, "dim": dim}
    for key, d in (("raw", raw_dir), ("aligned", aligned_dir)):
        study = Study.open(d)
        # fitted afresh: both studies get the very same pipeline
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

    from . import vtkio
    from .topology_io import final_points

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), dpi=110)
    for ax, key, d in zip(axes, ("raw", "aligned"), (raw_dir, aligned_dir)):
        f = vtkio.read_vti(os.path.join(d, "landscape-2d.vti"))
        nx, ny, _ = f.dims
        ext = [f.origin[0], f.origin[0] + (nx - 1) * f.spacing[0], f.origin[1], f.origin[1] + (ny - 1) * f.spacing[1]]
        im = ax.imshow(np.log10(np.maximum(f.grid("loss")[0], 1e-6)), origin="lower", extent=ext, aspect="auto",
                       cmap="viridis")
        runs, pos = final_points(os.path.join(d, "trajectories-2d.vtp"))
        ax.scatter(pos[:, 0], pos[:, 1], c="red", s=18, edgecolors="white", linewidths=0.5)
        for r, p in zip(runs, pos):
            ax.annotate(str(r), p[:2], color="white", fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{key}: final models in {section[key]['n_basins']} basin(s)")
        fig.colorbar(im, ax=ax, label="log10 loss")
    fig.suptitle(f"Loss landscape ({section['reducer']}) before and after permutation alignment")
    fig.tight_layout()
    path = os.path.join(aligned_dir, "renders", "align-compare-2d.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from .safe_write import save_figure

    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return os.path.relpath(path, aligned_dir)
