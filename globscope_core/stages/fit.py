"""Fitting reducers on a study and comparing them (what `globscope fit` and `compare` run).

Python API:
  fit_study(study_dir, kind="ae", dim=2, evaluate=True, **config) -> (reducer, metrics dict)
  compare_study(study_dir, dim=2, kinds=("ae", "pca", "kpca", "umap")) -> list of table rows
"""
from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np

from ..errors import GlobScopeError
from ..storage.locks import holding
from ..storage.study_files import compare_png

KINDS = ("ae", "pca", "kpca", "umap")


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 10 ms)."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _check_dim(dim):
    if dim not in (2, 3):
        raise GlobScopeError(f"--dim must be 2 or 3, not {dim}")


# the reducer file and its report section: a second fit of the same reducer waits, and then replaces both
@holding(lambda a: (a["study_dir"], f"fit-{a['kind']}-{a['dim']}d") if a["save"] else None)
def fit_study(study_dir, kind="ae", dim=2, evaluate=True, progress=True, eval_samples=2000, device="auto",
              holdout=None, save=True, scorer=None, say_memory=True, plan=None, **config):
    """Fit, save STUDY/reducers/<kind>-<dim>d.pt and add its numbers to report.json ("fit-<name>").

    ``holdout`` (with ``evaluate``): first fit on the held-out split's fitted rows and score the held-out
    checkpoints (reducers/holdout.py), then fit on everything for the saved reducer. None (default): when the
    study has checkpoints to hold out, else skipped with a note (held_out = {"skipped": why}); True: required;
    False: off. ``save=False`` (compare): nothing is written, neither the reducer nor its report section.
    ``say_memory``: check and print the memory estimate first (compare checks all its fits at once).
    """
    from ..networks.device import resolve_device
    from ..reducers import fit_reducer
    from ..reducers.metrics import evaluate_reducer
    from ..storage.study import Study

    _check_dim(dim)
    resolve_device(device)  # --device cuda without a GPU: a clear error before any work
    study = Study.open(study_dir)
    if kind == "ae":
        config.setdefault("device", device)
        _check_ae_size(study, dim, config)
    eval_device = "cpu" if device == "auto" else device
    held = None
    holdout, skipped = _holdout_plan(study, holdout) if evaluate else (False, None)
    if skipped:
        held = {"skipped": skipped}
    if say_memory:  # the basis then takes the path printed here (``plan``: compare checked and printed it)
        plan = check_fit_memory(study, [kind], dim, config, evaluate, holdout, eval_samples, device)[kind]
    if holdout:
        from ..reducers.holdout import HeldOutScorer, fit_held_out

        scorer = scorer or HeldOutScorer(study, eval_samples=eval_samples, device=eval_device)
        t0 = time.perf_counter()
        rh = fit_held_out(study, kind, dim, progress=progress, **config)
        held = {"protocol": scorer.protocol, "fit_seconds": time.perf_counter() - t0, **scorer.score_reducer(rh),
                "two_neighbour": scorer.score_two_neighbour(rh.basis.scale)}
        del rh
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        r = fit_reducer(study, kind, dim, save=save, progress=progress, plan=plan, **config)
        fit_s = time.perf_counter() - t0
    info = {"reducer": r.name, "fit_seconds": fit_s, "peak_rss_mb": mem.peak / 2**20,
            "rss_increase_mb": (mem.peak - mem.start) / 2**20, "n_checkpoints": study.n_checkpoints,
            "n_params": study.n_params, **getattr(r, "fit_info", {}), "config": r.config}
    info.pop("history_mse_std", None)
    if evaluate:
        info.update(evaluate_reducer(r, study, eval_samples=eval_samples, device=eval_device))
    if held is not None:
        info["held_out"] = held
    if save:
        study.update_report(f"fit-{r.name}", info)
    return r, info


def _holdout_plan(study, holdout) -> tuple[bool, str | None]:
    """(hold out?, why it is skipped): a study with no run long enough is fitted without the held-out part
    (a first short study must fit), unless ``holdout`` is True (--holdout), which refuses it."""
    if holdout is False:
        return False, None
    from ..reducers.holdout import nothing_to_hold_out
    from ..storage.safe_write import note

    why = nothing_to_hold_out(study)
    if why is None:
        return True, None
    if holdout:
        raise GlobScopeError(f"--holdout: {study.h5_path}: nothing to hold out: {why}; train longer (--epochs), "
                             "checkpoint more often (--every), or drop --holdout")
    note(f"{study.h5_path}: held-out fidelity skipped: {why}")
    return False, why


def check_fit_memory(study, kinds, dim, config, evaluate, holdout, eval_samples, device, what="fit") -> dict:
    """Refuse a fit (or compare's fits) that would not fit in memory, and print what it will need: the basis
    passes, the kind on the coordinates, the metrics and the held-out scorer (reducers/budget.py). Returns the
    basis plan of each kind: the path printed is the path the fits take."""
    import math

    from ..networks.models import is_mlp
    from ..reducers.budget import basis_plan, estimate_fit
    from ..reducers.holdout import holdout_split
    from ..resources import held_now, largest, libraries, memory_line, require
    from .memory_plan import activation_bytes, data_bytes, data_libraries, retained_bytes

    P, N = study.n_params, study.n_checkpoints
    ev = None
    if evaluate:
        shape = (study.model_spec.get("kwargs") or {}).get("input_shape") or [1]
        n_eval = eval_samples or 2000
        ev = {"model": P * 4 * (1 if is_mlp(study.model_spec) else 2), "data": data_bytes(study.dataset_spec)[1],
              "eval": retained_bytes(study.dataset_spec, n_eval * 4 * math.prod(shape)),
              "activations": 3 * min(2048, n_eval) * activation_bytes(study.model_spec)[0]}
    floor = any(e.name.endswith("running_var") for e in study.layout.entries)
    rows_out = len(holdout_split(study)[1]) if evaluate and holdout else 0
    held = held_now()
    rank = config.get("max_rank")
    stage = dict(block_rows=config.get("block_rows"), evaluate=ev, holdout_rows=rows_out,
                 data_libraries=data_libraries(study.dataset_spec), held=held)
    plans = {k: basis_plan(P, N, rank, config.get("basis"), k, floor, **stage) for k in kinds}
    parts = largest(*[estimate_fit(P, N, max_rank=rank, kind=k, floor=floor, streamed=plans[k].streamed,
                                   panel_bytes=plans[k].panel_bytes, **stage) for k in kinds])
    if what == "compare":  # its plot
        parts.update(libraries("matplotlib"))
    if str(device).startswith("cuda"):
        parts["CUDA libraries (host)"] = 1 << 30  # cuBLAS/cuDNN: ~1 GB of host memory once loaded
    names = ", ".join(f"{k}-{dim}d" for k in kinds)
    require(parts, f"{what} {names} on {study.h5_path} ({N} checkpoints x {P:,} parameters)",
            hint="keep fewer basis directions (--max-rank K)" + (", or --no-holdout" if rows_out else ""))
    for plan in dict.fromkeys(plans.values()):  # which path the basis takes, and why, before the estimate
        k = f"{rank} directions (--max-rank)" if rank else "every direction of the checkpoints' span"
        print(f"basis: {k}, {'streamed from the checkpoints' if plan.streamed else 'in memory'}: {plan.why}",
              file=sys.stderr, flush=True)
    print(memory_line(parts), file=sys.stderr, flush=True)
    return plans


def _check_ae_size(study, dim, config) -> None:
    """An autoencoder too large for memory (--width, --depth) is refused before the basis is built, not after."""
    from ..reducers.ae import DEFAULTS, auto_width, network_bytes
    from ..reducers.budget import basis_rank
    from ..resources import BASE_BYTES, require

    depth, width = int(config.get("depth") or DEFAULTS["depth"]), config.get("width") or DEFAULTS["width"]
    w = auto_width(study.n_checkpoints, depth) if width == "auto" else int(width)
    k = max(dim, basis_rank(study.n_checkpoints, config.get("max_rank")))
    name = f"--width {w}" if width != "auto" else f"width {w} (auto)"
    require({"base": BASE_BYTES, f"autoencoder ({name}, --depth {depth}, {k} inputs)": network_bytes(k, dim, w, depth)},
            f"fit ae-{dim}d on {study.h5_path}", hint="use a smaller --width or --depth")


def _row(info) -> dict:
    rec, fs, st = info["reconstruction"], info["function"], info["structure"]
    row = {"reducer": info["reducer"], "mse_raw": rec["mse_raw"], "mse_std": rec["mse_std"],
           "loss_gap_mean": fs["loss_gap_mean"], "loss_gap_median": fs.get("loss_gap_median"),
           "loss_gap_max": fs["loss_gap_max"], "within_1pct": fs["within_1pct"],
           "trustworthiness": st["trustworthiness"], "continuity": st["continuity"],
           "distance_spearman": st["distance_spearman"], "finals_apart": st["finals_apart"],
           "fit_seconds": info["fit_seconds"], "peak_rss_mb": info["peak_rss_mb"]}
    ho = info.get("held_out")
    row.update({f"ho_{k}": (ho or {}).get(k) for k in HELD_KEYS})
    if ho and ho.get("skipped"):
        row["ho_skipped"] = ho["skipped"]
    return row


HELD_KEYS = ("mse_raw", "mse_std", "loss_gap_mean", "loss_gap_median", "loss_gap_max")


@holding(lambda a: (a["study_dir"], f"compare-{a['dim']}d"))  # compare-Xd.png and its report section
def compare_study(study_dir, dim=2, kinds=KINDS, progress=True, eval_samples=2000, device="auto", max_rank=None,
                  holdout=None, **ae_config) -> list:
    """Fit every reducer, print the table, save report.json["compare-<dim>d"] and STUDY/compare-<dim>d.png.

    The fits stay in memory: STUDY/reducers/ and the report's fit-* sections are not touched (they
    describe the saved reducers, which ``globscope fit`` makes). With ``holdout`` the last row is the
    two-neighbour reference (held-out columns only).
    """
    from ..storage.safe_write import check_writable
    from ..storage.study import Study

    _check_dim(dim)
    study = Study.open(study_dir)
    check_writable(study.dir, what="compare")  # a read-only study is refused before every reducer is fitted
    if "ae" in kinds:
        _check_ae_size(study, dim, dict(ae_config, max_rank=max_rank))
    scorer = None
    holdout, skipped = _holdout_plan(study, holdout)
    plans = check_fit_memory(study, kinds, dim, {**ae_config, "max_rank": max_rank}, True, holdout, eval_samples,
                             device, what="compare")
    if holdout:
        from ..reducers.holdout import HeldOutScorer

        scorer = HeldOutScorer(study, eval_samples=eval_samples, device="cpu" if device == "auto" else device)
    rows, ref = [], None
    for kind in kinds:
        extra = {"max_rank": max_rank} if max_rank else {}
        # [1]: the reducer is not kept alive into the next fit (two bases in memory at once)
        info = fit_study(study_dir, kind, dim, progress=progress, eval_samples=eval_samples, device=device,
                         holdout=holdout, save=False, scorer=scorer, say_memory=False, plan=plans[kind], **extra,
                         **(ae_config if kind == "ae" else {}))[1]
        if skipped:
            info["held_out"] = {"skipped": skipped}
        rows.append(_row(info))
        if holdout:
            ref = info["held_out"]["two_neighbour"]
    if ref is not None:
        rows.append({"reducer": "two-neighbour", **{k: None for k in rows[0] if k != "reducer"},
                     **{f"ho_{k}": ref[k] for k in HELD_KEYS}, "held_out_protocol": scorer.protocol})
    study.update_report(f"compare-{dim}d", rows)
    png = compare_png(study.dir, dim)
    plot_compare(rows, png, title=f"{os.path.basename(study.dir)}: reducers, {dim}D latent")
    return rows


def _fmt(v, spec):
    return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)


def format_table(rows) -> str:
    """Fitted-checkpoint columns, then held-out columns (ho: fit on 3/4 of each run, score the rest)."""
    head = f"{'reducer':<13} {'MSE raw':>9} {'MSE std':>9} {'gap mean':>8} {'gap max':>8} " \
           f"{'ho raw':>9} {'ho std':>9} {'ho mean':>8} {'ho med':>8} {'ho max':>8} {'trust':>6} " \
           f"{'contin':>6} {'apart':>5} {'fit s':>7} {'peak MB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        g = lambda k, spec: _fmt(r.get(k), spec)  # noqa: E731
        lines.append(f"{r['reducer']:<13} {g('mse_raw', '9.2e')} {g('mse_std', '9.2e')} {g('loss_gap_mean', '8.2e')} "
                     f"{g('loss_gap_max', '8.2e')} {g('ho_mse_raw', '9.2e')} {g('ho_mse_std', '9.2e')} "
                     f"{g('ho_loss_gap_mean', '8.2e')} {g('ho_loss_gap_median', '8.2e')} {g('ho_loss_gap_max', '8.2e')} "
                     f"{g('trustworthiness', '6.3f')} {g('continuity', '6.3f')} {g('finals_apart', '5.2f')} "
                     f"{g('fit_seconds', '7.1f')} {g('peak_rss_mb', '8.0f')}")
    skipped = next((r["ho_skipped"] for r in rows if r.get("ho_skipped")), None)
    if skipped:
        lines.append(f"held-out: skipped: {skipped}")
    if any(r.get("ho_mse_raw") is not None for r in rows):
        lines.append("ho: held-out checkpoints (every 4th of each run, never its first two nor its last), reducer "
                     "fitted on the rest; two-neighbour: mean of the held-out checkpoint's two fitted neighbours")
    return "\n".join(lines)


def plot_compare(rows, path, title=""):
    """Bars per reducer: fitted (solid) and held-out (hatched) side by side; the two-neighbour reference
    as a dashed line. Values are plotted as they are: a zero on a log axis has no bar and is labelled "0"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..storage.safe_write import atomic_write_bytes

    ref = next((r for r in rows if r["reducer"] == "two-neighbour"), None)
    rows = [r for r in rows if r["reducer"] != "two-neighbour"]
    names = [r["reducer"] for r in rows]
    panels = [("mse_raw", "reconstruction MSE (raw)", True), ("mse_std", "reconstruction MSE (standardized)", True),
              ("loss_gap_mean", "mean relative loss gap", True), ("loss_gap_median", "median relative loss gap", True),
              ("trustworthiness", "trustworthiness", False), ("fit_seconds", "fit time (s)", False)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    colors = ["#d62728" if n.startswith("ae") else "#1f77b4" for n in names]
    x = np.arange(len(names))
    for ax, (key, label, log) in zip(axes.flat, panels):
        series = [(key, "fitted", 0.0, None)]
        if log and any(r.get(f"ho_{key}") is not None for r in rows):
            series = [(key, "fitted", -0.2, None), (f"ho_{key}", "held-out", 0.2, "//")]
        width = 0.8 / len(series)
        for k, lab, dx, hatch in series:
            vals = [r.get(k) for r in rows]
            shown = [np.nan if v is None or (log and v <= 0) else v for v in vals]
            ax.bar(x + dx, shown, width=width, color=colors, hatch=hatch, edgecolor="k" if hatch else None,
                   label=lab, alpha=0.6 if hatch else 1.0)
            for i, v in enumerate(vals):
                if v is None:
                    continue
                txt = "0" if v == 0 else (f"{v:.2g}" if log else f"{v:.3g}")
                ypos = v if not (log and v <= 0) else None
                if ypos is None:  # zero on a log axis: say so at the axis' bottom, no bar
                    ax.annotate(txt, (x[i] + dx, 0.0), xycoords=("data", "axes fraction"), ha="center",
                                va="bottom", fontsize=8, color="#555")
                else:
                    ax.annotate(txt, (x[i] + dx, ypos), ha="center", va="bottom", fontsize=7)
        if log:
            ax.set_yscale("log")
            if ref is not None and ref.get(f"ho_{key}") is not None and ref[f"ho_{key}"] > 0:
                ax.axhline(ref[f"ho_{key}"], color="k", ls="--", lw=1, label="two-neighbour (held-out)")
        ax.set_xticks(x, names)
        ax.set_title(label, fontsize=10)
        if len(series) > 1 or (log and ref is not None):
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
