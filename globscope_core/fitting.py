"""Fitting reducers on a study and comparing them (what `globscope fit` and `compare` run).

Python API:
  fit_study(study_dir, kind="ae", dim=2, evaluate=True, **config) -> (reducer, metrics dict)
  compare_study(study_dir, dim=2, kinds=("ae", "pca", "kpca", "umap")) -> list of table rows
"""
from __future__ import annotations

import os
import threading
import time

from .errors import GlobScopeError

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


def fit_study(study_dir, kind="ae", dim=2, evaluate=True, progress=True, eval_samples=2000, device="auto",
              **config):
    """Fit, save STUDY/reducers/<kind>-<dim>d.pt and add its numbers to report.json ("fit-<name>")."""
    from .reducers import fit_reducer
    from .reducers.metrics import evaluate_reducer
    from .store import Study

    from .evaluation import resolve_device

    _check_dim(dim)
    resolve_device(device)  # --device cuda without a GPU: a clear error before any work
    study = Study.open(study_dir)
    if kind == "ae":
        config.setdefault("device", device)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        r = fit_reducer(study, kind, dim, progress=progress, **config)
        fit_s = time.perf_counter() - t0
    info = {"reducer": r.name, "fit_seconds": fit_s, "peak_rss_mb": mem.peak / 2**20,
            "rss_increase_mb": (mem.peak - mem.start) / 2**20, "n_checkpoints": study.n_checkpoints,
            "n_params": study.n_params, **getattr(r, "fit_info", {}), "config": r.config}
    info.pop("history_mse_std", None)
    if evaluate:
        info.update(evaluate_reducer(r, study, eval_samples=eval_samples,
                                     device="cpu" if device == "auto" else device))
    study.update_report(f"fit-{r.name}", info)
    return r, info


def compare_study(study_dir, dim=2, kinds=KINDS, progress=True, eval_samples=2000, device="auto", max_rank=None,
                  **ae_config) -> list:
    """Fit every reducer, print the table, save report.json["compare-<dim>d"] and STUDY/compare-<dim>d.png."""
    from .store import Study

    _check_dim(dim)
    rows = []
    for kind in kinds:
        extra = {"max_rank": max_rank} if max_rank else {}
        _, info = fit_study(study_dir, kind, dim, progress=progress, eval_samples=eval_samples, device=device,
                            **extra, **(ae_config if kind == "ae" else {}))
        rec, fs, st = info["reconstruction"], info["function"], info["structure"]
        rows.append({"reducer": info["reducer"], "mse_raw": rec["mse_raw"], "mse_std": rec["mse_std"],
                     "loss_gap_mean": fs["loss_gap_mean"], "loss_gap_max": fs["loss_gap_max"],
                     "within_1pct": fs["within_1pct"], "trustworthiness": st["trustworthiness"],
                     "continuity": st["continuity"], "distance_spearman": st["distance_spearman"],
                     "finals_apart": st["finals_apart"], "fit_seconds": info["fit_seconds"],
                     "peak_rss_mb": info["peak_rss_mb"]})
    study = Study.open(study_dir)
    study.update_report(f"compare-{dim}d", rows)
    png = os.path.join(study.dir, f"compare-{dim}d.png")
    plot_compare(rows, png, title=f"{os.path.basename(study.dir)}: reducers, {dim}D latent")
    return rows


def format_table(rows) -> str:
    head = f"{'reducer':<8} {'MSE raw':>10} {'MSE std':>10} {'loss gap':>9} {'max gap':>9} {'trust':>6} " \
           f"{'contin':>6} {'spearman':>8} {'apart':>5} {'fit s':>7} {'peak MB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        apart = "-" if r["finals_apart"] is None else f"{r['finals_apart']:.2f}"
        lines.append(f"{r['reducer']:<8} {r['mse_raw']:>10.3e} {r['mse_std']:>10.3e} {r['loss_gap_mean']:>9.2e} "
                     f"{r['loss_gap_max']:>9.2e} {r['trustworthiness']:>6.3f} {r['continuity']:>6.3f} "
                     f"{r['distance_spearman']:>8.3f} {apart:>5} {r['fit_seconds']:>7.1f} {r['peak_rss_mb']:>8.0f}")
    return "\n".join(lines)


def plot_compare(rows, path, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .store import atomic_write_bytes

    names = [r["reducer"] for r in rows]
    panels = [("mse_raw", "reconstruction MSE (raw)", True), ("mse_std", "reconstruction MSE (standardized)", True),
              ("loss_gap_mean", "mean relative loss gap", True), ("trustworthiness", "trustworthiness", False),
              ("fit_seconds", "fit time (s)", False), ("peak_rss_mb", "peak memory (MB)", False)]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    colors = ["#d62728" if n.startswith("ae") else "#1f77b4" for n in names]
    for ax, (key, label, log) in zip(axes.flat, panels):
        vals = [max(r[key], 1e-12) if log else r[key] for r in rows]
        ax.bar(names, vals, color=colors)
        if log:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.2g}" if log else f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
