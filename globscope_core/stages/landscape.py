"""The loss over a regular latent grid (``STUDY/landscape-{2d,3d}.vti``) and the runs drawn in latent
space (``STUDY/trajectories-{2d,3d}.vtp``).

Grid: bounds are the box around the encoded checkpoints, widened on each side by ``margin`` times
its extent (or given explicitly); ``resolution`` points per axis; points in VTK order (x fastest).
Each grid point is decoded by the reducer into a full parameter vector and evaluated, many models per
forward pass (evaluation/many_models.py), on a fixed evaluation subset of the study's train or test split.

Point arrays: ``loss`` (mean cross-entropy, active scalar; NaN where the decoded model gives a
non-finite loss), ``log_loss`` (log10 of it: losses of decoded models span decades, so views and merge
trees use it; the tree of a monotone transform is the same), ``accuracy``, ``trust`` (Euclidean distance, in latent units, from the grid point to
the nearest encoded checkpoint: large values mark where the decoder extrapolates), ``extrapolation``
(distance outside the convex hull of the encoded checkpoints, as a fraction of their extent; 0 inside) and
``trusted`` (1 inside the hull or within one grid cell of it (at most 5% of the extent), else 0: the decoder was fitted on nothing
there; by default (``beyond_hull="clamp"``) such a point is evaluated at the hull boundary on the ray from the
checkpoints' centroid, so the decoder is never asked for models it was not fitted near). Views fade or cut the untrusted part and the merge tree leaves it out by default; the report says
how bad the decoded models get there (``extrapolated``) and counts isolated spikes (``spikes``).

Default bounds: the box of the hull (= of the encoded checkpoints) widened by ``margin`` = 5% of its extent
on each side, so most of the grid is trusted and the rim shows where extrapolation starts.

Resumable: the grid is cut into chunks of ``chunk_points`` points, each written to
``STUDY/.landscape-{2d,3d}.partial/chunk-NNNNNN.npz`` (temporary name + rename) as soon as it is done,
next to ``config.json``. A rerun with the same settings computes only the missing chunks, and a rerun
with other settings is refused (``fresh=True`` discards the partial results). Chunk composition is
fixed by the config, so a resumed field is identical to an uninterrupted one (bitwise, at the same
torch thread count; another thread count may change the GEMMs' last bit, ~4e-7 relative).

BatchNorm (``bn``): ``recompute`` (the default) re-estimates every decoded model's running statistics on a fixed
training subset of ``bn_samples`` (networks/batchnorm.py; REPAIR's reset) before evaluating it: a decoded point is
a mix of checkpoints, and mixed statistics collapse the activations' variance (on a ResNet-20 study the decoded
statistics put the loss at the runs' own final points 6-24x too high: bench/results/batchnorm.md). It costs a
train-mode forward over that subset per grid point (report: ``batchnorm``, its seconds). ``decoded`` evaluates
the decoded statistics as they are (faster; what earlier versions did). The setting is part of the partial
store's config: a rerun without ``bn`` resumes in the unfinished landscape's setting (``decoded`` for one started
by an earlier version), a rerun with another one is refused. A model without BatchNorm ignores it (same numbers).

Distributed: under ``torchrun`` (RANK / WORLD_SIZE in the environment) every process takes every
WORLD_SIZE-th missing chunk (gloo on CPU, NCCL on GPU), writes its chunks, and rank 0 gathers them and
writes the one field.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import time

import numpy as np
import torch

from ..errors import GlobScopeError
from ..evaluation.many_models import BatchedEvaluator, bn_data, check_precision, eval_data
from ..networks.batchnorm import BN_SAMPLES, BN_SEED, BN_SETTINGS, bn_modules, layout_has_bn
from ..networks.device import resolve_device
from ..reducers import load_reducer
from ..reducers.base import study_id
from ..reducers.latent_grid import HullClamp, find_spikes, grid_bounds, grid_points, trusted_points
from ..storage import study_files
from ..storage.locks import output_lock
from ..storage.safe_write import check_utf8_path
from ..storage.study import Study
from .landscape_chunks import Dist, PartialStore

PARTIAL_VERSION = 1
BN_DEFAULT = "recompute"  # for BatchNorm networks; see the module docstring and bench/results/batchnorm.md
MAX_GRID_POINTS = 2**31 - 1  # far above any grid whose field fits in memory (~180 GB of field arrays at 2^31 points)


# --- small helpers ------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_checkpoints(study: Study, reducer) -> np.ndarray:
    """Latent coordinates [N, dim] of every checkpoint (streamed in row blocks)."""
    known = getattr(reducer, "fitted_latent", lambda _: None)(study)
    if known is not None:  # a basis streamed from this study: encoding a block reads the whole study (N passes)
        return np.array(known, dtype=np.float64)
    rows = max(1, (64 << 20) // (4 * study.n_params))  # small blocks: standardizing one copies it twice
    return np.concatenate([np.asarray(reducer.transform(block), dtype=np.float64)
                           for _, block in study.iter_params(rows)])


def _resource_check(study: Study, n_points: int, dim: int, resolution: int) -> dict:
    """Refuse, before any work, a grid that would not fit in memory or on disk; say what it needs."""
    from ..resources import format_bytes, host_memory

    # field arrays (loss, acc, trust + float64 work copies, VTK copies while writing); the decoded chunk and its
    # evaluation are counted by _memory_check, part by part, once the evaluation data is loaded (3 copies of the
    # chunk here refused a 17x17 grid of a 1.2e8-parameter model that fits)
    need_mem = n_points * (3 * 4 * 3 + 8 * (dim + 3))
    # partial chunks (loss + accuracy, float64) + the .vti (3 float32 arrays, base64 worst case)
    need_disk = n_points * (16 + 3 * 4 * 4 // 3 + 1)
    avail_mem, source = host_memory()
    free_disk = shutil.disk_usage(study.dir).free
    what = f"resolution {resolution} in {dim}D is {n_points:,} grid points"
    if need_mem > avail_mem:
        raise GlobScopeError(f"{study.dir}: {what}; it needs about {format_bytes(need_mem)} of memory, "
                             f"{format_bytes(avail_mem)} is available ({source}): lower --resolution")
    if need_disk > free_disk:
        raise GlobScopeError(f"{study.dir}: {what}; it needs about {format_bytes(need_disk)} of disk, "
                             f"{format_bytes(free_disk)} is free: lower --resolution or free space")
    return {"memory_bytes": int(need_mem), "disk_bytes": int(need_disk)}


def _memory_check(study, reducer, chunk_points, n_points, x, device, resolution, dim, bn_x=None) -> dict:
    """Refuse, before evaluating, a landscape whose decoding and evaluation would not fit, and say what it
    will need (resources.py): the study, reducer and evaluation data are loaded by now (``held now``)."""
    from ..evaluation.many_models import ACTIVATION_BUDGET
    from ..networks.models import is_mlp
    from ..resources import estimate_landscape, require
    from .memory_plan import activation_bytes

    mlp = is_mlp(study.model_spec)  # the MLP path: small tiles and a transposed copy of the data
    per_model = not mlp and device.type == "cpu"  # works on its own copy of the model (and a channels-last x)
    largest_out = activation_bytes(study.model_spec)[0]
    act = 8 << 20 if mlp else min(ACTIVATION_BUDGET, 3 * len(x) * largest_out) if largest_out else ACTIVATION_BUDGET
    bn = {}
    if bn_x is not None:  # --bn recompute: its subset, its model copy and the chunk's copy with new statistics
        act = max(act, 3 * 512 * largest_out)  # a train-mode forward of 512 samples, at another time than evaluation
        bn = {"BatchNorm subset": bn_x.numel() * 4,
              "BatchNorm reset (model copy, chunk copy)": (1 + (1 if per_model else chunk_points)) * study.n_params * 4}
    parts = estimate_landscape(study.n_params, chunk_points, n_points, x.numel() * 4, act,
                               model_copies=2 if per_model else 1)
    basis = getattr(reducer, "basis", None)
    if basis is not None and basis.streamed:  # every chunk decoded from the checkpoints: a row block read at a time
        from ..reducers.budget import basis_held

        parts.update({k: v for k, v in basis_held(study.n_params, basis.W.shape[1], streamed=True).items()
                      if k.startswith("streamed")})  # the rest of the basis is loaded: held now
    gpu = None
    if device.type != "cuda":
        parts.update(bn)
    else:  # decoding and evaluation happen on the GPU, the field on the host
        gpu = {k: parts.pop(k) for k in ("decoded chunk [B, P]", "activations")}
        gpu.update(bn)
        if basis is not None and not basis.streamed:
            gpu["reducer basis [k, P]"] = basis.rank * study.n_params * 4  # copied there
        parts["CUDA libraries (host)"] = 1 << 30  # cuBLAS/cuDNN: ~1 GB of host memory once loaded
    return require(parts, f"landscape {study.dir} at resolution {resolution} in {dim}D", device, gpu,
                   hint="lower --chunk-points, or refit the reducer with fewer basis directions (--max-rank)", say=True)


# --- the stage ------------------------------------------------------------------------------------
def compute_landscape(study, reducer_name: str, resolution: int | None = None, split: str = "test",
                      eval_samples: int | None = 1024, margin: float = 0.05, bounds=None, device="auto",
                      progress: bool = True, chunk_points: int | None = None, fresh: bool = False,
                      max_chunks: int | None = None, eval_seed: int = 0, trajectories: bool = True,
                      beyond_hull: str = "clamp", precision: str = "fp32", compile: bool = False,
                      bn: str | None = None, bn_samples: int | None = None) -> dict:
    """Evaluate the loss on a latent grid and write ``STUDY/landscape-{dim}d.vti`` (+ trajectories .vtp).

    ``resolution`` points per axis (default 65 in 2D, 33 in 3D); ``bounds`` [lo_x, hi_x, lo_y, hi_y(, lo_z,
    hi_z)] overrides the margin rule; ``eval_samples`` None = the whole split. ``max_chunks`` stops this
    call after that many new chunks (the rest is computed by a later call: a controlled interruption).
    ``beyond_hull``: "clamp" (default) evaluates a grid point outside the hull of the encoded checkpoints at
    the hull boundary (HullClamp); "extrapolate" decodes it where it is. ``precision`` (fp32, tf32, bf16)
    and ``compile``: how the decoded models are evaluated (evaluation.many_models.BatchedEvaluator); a landscape resumes
    only in the precision it was started in. ``bn``: "recompute" (BatchNorm statistics re-estimated for every
    decoded model on ``bn_samples`` train samples, default BN_SAMPLES) or "decoded"; None: the setting of the
    unfinished landscape being resumed, else BN_DEFAULT.
    Returns a summary dict (also stored in report.json under ``landscape-{dim}d``), with ``complete``
    False when stopped early.
    """
    from tqdm import tqdm

    study = study if isinstance(study, Study) else Study.open(study)
    check_utf8_path(study.dir, "landscape")  # VTK writes the results: refused now, not after the work
    check_precision(precision, resolve_device(device))  # --device cuda without a GPU: a clear error before any work
    with _reducer_lock(study, reducer_name):  # a fit of this reducer that is running: its result, not the old file
        reducer = load_reducer(study, reducer_name)
    dim = int(reducer.dim)
    tag = f"{dim}d"
    resolution = int(resolution or (65 if dim == 2 else 33))
    if resolution < 2:
        raise GlobScopeError(f"--resolution must be at least 2, not {resolution}")
    if not margin >= 0:
        raise GlobScopeError(f"--margin must be a non-negative number, not {margin}")
    if split not in ("train", "test"):
        raise GlobScopeError(f"--split must be 'train' or 'test', not '{split}'")
    if eval_samples is not None and eval_samples <= 0:
        raise GlobScopeError(f"--eval-samples must be positive, not {eval_samples}")
    if beyond_hull not in ("clamp", "extrapolate"):
        raise GlobScopeError(f"--beyond-hull must be 'clamp' or 'extrapolate', not '{beyond_hull}'")
    if bn is not None and bn not in BN_SETTINGS:
        raise GlobScopeError(f"--bn must be one of {', '.join(BN_SETTINGS)}, not '{bn}'")
    if bn_samples is not None and bn_samples <= 0:
        raise GlobScopeError(f"--bn-samples must be positive, not {bn_samples}")

    dist = Dist(resolve_device(device))
    held = contextlib.ExitStack()  # rank 0's lock of this landscape's files, until they are written
    try:
        t_start = time.time()
        Z = encode_checkpoints(study, reducer)
        if not np.all(np.isfinite(Z)):
            raise GlobScopeError(f"{study_files.reducer_file(study.dir, reducer_name)}: encodes some checkpoints to NaN/Inf")
        if bounds is not None:
            b = np.asarray(bounds, dtype=np.float64).reshape(-1)
            if b.size != 2 * dim or not np.all(b[1::2] > b[0::2]):
                raise GlobScopeError(f"--bounds needs {2 * dim} numbers lo,hi per axis with lo < hi, got {list(b)}")
            lo, hi = b[0::2], b[1::2]
        else:
            lo, hi = grid_bounds(Z, margin)
        dims = (resolution, resolution, resolution if dim == 3 else 1)
        spacing_d = (hi - lo) / (resolution - 1)
        origin = tuple(lo.tolist()) + ((0.0,) if dim == 2 else ())
        spacing = tuple(spacing_d.tolist()) + ((1.0,) if dim == 2 else ())
        n_points = math.prod(dims)  # Python ints: np.prod wraps around silently at 2^63
        if n_points > MAX_GRID_POINTS:
            raise GlobScopeError(f"--resolution {resolution} in {dim}D is {n_points:,} grid points, more than a "
                                 f"landscape may have ({MAX_GRID_POINTS:,}): lower it")
        if chunk_points is not None and int(chunk_points) < 1:
            raise GlobScopeError(f"--chunk-points must be a positive integer, not {chunk_points}")
        store = PartialStore(study_files.landscape_partial_dir(study.dir, dim))
        unfinished = store.unfinished_config()  # a plain rerun resumes in its settings (chunks, --bn)
        if chunk_points is None:
            chunk_points = (unfinished or {}).get("chunk_points")
        if chunk_points is None and getattr(getattr(reducer, "basis", None), "streamed", False):
            from ..reducers.budget import decode_rows

            # each chunk is a pass over the study: as many points as a quarter of the memory holds (8 of a
            # 1.24e8-parameter model under a 16 GB limit), as rank 0 counts them (every torchrun process cuts alike)
            chunk_points = dist.broadcast(min(256, decode_rows(study.n_params, 256, share=4)))
        if chunk_points is None:
            # one chunk = one batch of decoded models: about 256 MiB of parameters, at most 256 models
            chunk_points = int(max(1, min(256, (256 << 20) // (4 * study.n_params))))
        chunk_points = int(chunk_points)
        needs = _resource_check(study, n_points, dim, resolution)
        n_chunks = -(-n_points // chunk_points)
        sizes = [min(chunk_points, n_points - k * chunk_points) for k in range(n_chunks)]

        x, y = eval_data(study, split, eval_samples, seed=eval_seed)
        has_bn = layout_has_bn(study.layout)
        bn, bn_samples = _bn_setting(bn, bn_samples, unfinished)
        bn_x = bn_data(study, bn_samples, BN_SEED) if has_bn and bn == "recompute" else None
        needs.update(_memory_check(study, reducer, chunk_points, n_points, x, dist.device, resolution, dim, bn_x))
        rpath = reducer_name if reducer_name.endswith(".pt") else study_files.reducer_file(study.dir, reducer_name)
        config = {"version": PARTIAL_VERSION, "study_id": study_id(study), "reducer": reducer.name,
                  "reducer_sha256": _sha256(rpath), "resolution": resolution, "dims": list(dims),
                  "origin": list(origin), "spacing": list(spacing), "split": split, "eval_samples": int(len(x)),
                  "eval_seed": int(eval_seed), "chunk_points": chunk_points, "beyond_hull": beyond_hull}
        if precision != "fp32":  # absent for fp32: partial landscapes of earlier versions still resume
            config["precision"] = precision
        if bn_x is not None:  # absent otherwise (decoded, or no BatchNorm: the numbers are those of earlier versions)
            config.update(bn="recompute", bn_samples=int(len(bn_x)), bn_seed=BN_SEED)
        if dist.rank == 0:  # chunks (2 float64 per point) and the .vti (4 float32 per point), before any work
            from ..storage.safe_write import check_writable

            check_writable(study.dir, n_points * (16 + 16) + (1 << 20), f"landscape-{tag}")

        # rank 0 opens (or checks) the partial store and tells everyone what is left to do
        status = None
        if dist.rank == 0:
            try:
                # one landscape per dimension at a time: a second one would compute the same chunks twice, and
                # its --fresh would delete the first one's; a topology reading this dimension is waited for
                held.enter_context(output_lock(study, f"landscape-{tag}", refuse_same=True,
                                               hint=", or stop it and rerun your command"))
                store.open(config, fresh)
                status = {"done": store.done(n_chunks, sizes)}
            except GlobScopeError as exc:
                status = {"error": str(exc)}
        status = dist.broadcast(status)
        if "error" in status:
            raise GlobScopeError(status["error"])
        done = set(status["done"])
        missing = [k for k in range(n_chunks) if k not in done]
        mine = missing[dist.rank :: dist.world]
        if max_chunks is not None:
            mine = mine[: max(0, int(max_chunks))]

        ev = BatchedEvaluator(study.model_spec, x, y, device=dist.device, layout=study.layout,
                              precision=precision, compile=compile, bn_x=bn_x)
        clamp = HullClamp(Z) if beyond_hull == "clamp" else (lambda p: p)
        results, t_eval = {}, time.time()
        bar = tqdm(total=n_points, initial=sum(sizes[k] for k in done), desc=f"landscape-{tag}", unit="pt",
                   disable=not progress or dist.rank != 0, smoothing=0.1)
        for k in mine:
            idx = np.arange(k * chunk_points, k * chunk_points + sizes[k])
            z = torch.as_tensor(clamp(grid_points(idx, dims, origin, spacing, dim)), dtype=torch.float32,
                                device=dist.device)
            with torch.no_grad():
                params = reducer.inverse_transform_torch(z)
            loss, acc = ev.evaluate(params)
            try:
                store.write_chunk(k, loss, acc)
            except (OSError, GlobScopeError) as exc:  # the write path says why in one line (safe_write)
                why = f"{store.chunk_path(k)}: cannot write ({exc.strerror or exc})" if isinstance(exc, OSError) \
                    else str(exc)
                raise GlobScopeError(f"{why}; the {len(done) + len(results)} finished chunks are kept in "
                                     f"{store.dir}: free space and rerun the same command to resume") from None
            results[k] = (loss, acc)
            del params  # before the next chunk is decoded: one decoded chunk in memory, not two
            bar.update(sizes[k] * dist.world)
        bar.close()
        t_eval = time.time() - t_eval
        computed = sum(sizes[k] for k in results)
        bn_seconds = ev.bn_reset.seconds if ev.bn_reset is not None else 0.0  # the grid's, before the trajectories

        gathered = dist.gather((results, computed, t_eval, bn_seconds))
        summary = None
        if dist.rank == 0:
            for res, *_ in gathered:
                results.update(res)
            summary = _finish(study, reducer, reducer_name, Z, store, results, n_chunks, sizes, config, dims,
                              origin, spacing, ev, x, needs, gathered, t_start, trajectories, dist.world,
                              _bn_info(bn, ev, config))
        summary = dist.broadcast(summary)
        return summary
    finally:
        held.close()
        dist.close()


def _bn_setting(bn, bn_samples, unfinished: dict | None) -> tuple[str, int]:
    """``--bn`` and ``--bn-samples`` as given, else as the unfinished landscape being resumed has them (so a plain
    rerun resumes it; one without ``bn`` in its config was decoded), else BN_DEFAULT and BN_SAMPLES. A setting that
    differs from the unfinished one is refused by the store (PartialStore.open) in one line."""
    old = unfinished or {}
    if bn is None:
        bn = old.get("bn", "decoded") if unfinished is not None else BN_DEFAULT
    if bn_samples is None:
        bn_samples = int(old.get("bn_samples", BN_SAMPLES)) if old.get("bn") == bn else BN_SAMPLES
    return bn, bn_samples


def _bn_info(bn: str, ev: BatchedEvaluator, config: dict) -> dict:
    """The report's ``batchnorm``: the setting used (``none`` for a model without BatchNorm) and, for
    ``recompute``, on what the statistics were recomputed (the seconds are added by _finish)."""
    layers = ev.bn_reset.layers if ev.bn_reset is not None else len(bn_modules(ev.model))
    if not layers:
        out = {"setting": "none", "layers": 0}
        if bn == "recompute":
            out["note"] = "--bn recompute: the model has no BatchNorm layers, nothing was recomputed"
        return out
    if "bn" not in config:
        return {"setting": "decoded", "layers": layers}
    return {"setting": "recompute", "layers": layers, "samples": config["bn_samples"], "seed": config["bn_seed"],
            "split": "train"}


def _reducer_lock(study, reducer_name: str):
    """The lock of a saved reducer (``fit-NAME``, taken by fit while it fits and saves it); none for a .pt path."""
    if reducer_name.endswith(".pt"):
        return contextlib.nullcontext()
    return output_lock(study, f"fit-{reducer_name}", what=f"landscape with {reducer_name}", reading=True)


def _finish(study, reducer, reducer_name, Z, store, results, n_chunks, sizes, config, dims, origin, spacing, ev,
            x, needs, gathered, t_start, trajectories, world, bn_info) -> dict:
    from scipy.spatial import cKDTree

    from ..storage.vtk_files import ImageField, write_vti

    dim = int(reducer.dim)
    tag = f"{dim}d"
    n_points = int(np.prod(dims))
    computed = sum(g[1] for g in gathered)
    eval_seconds = max(g[2] for g in gathered)
    if bn_info["setting"] == "recompute":  # the cost, stated: seconds of this call's grid points spent recomputing
        bn_info["seconds"] = round(max(g[3] for g in gathered), 3)
        bn_info["fraction_of_evaluation"] = round(bn_info["seconds"] / eval_seconds, 3) if eval_seconds > 0 else None
    loss = np.full(n_points, np.nan, np.float64)
    acc = np.full(n_points, np.nan, np.float64)
    missing = []
    cp = config["chunk_points"]
    for k in range(n_chunks):
        got = results.get(k) or store.read_chunk(k, sizes[k])
        if got is None:
            missing.append(k)
            continue
        loss[k * cp : k * cp + sizes[k]], acc[k * cp : k * cp + sizes[k]] = got
    info = {"resolution": config["resolution"], "dims": list(dims), "reducer": reducer.name,
            "beyond_hull": config.get("beyond_hull", "extrapolate"),
            "split": config["split"], "eval_samples": config["eval_samples"], "chunks": n_chunks,
            "chunks_done": n_chunks - len(missing), "points_computed_now": int(computed),
            "eval_seconds": round(eval_seconds, 3),
            "points_per_second": round(computed / eval_seconds, 2) if eval_seconds > 0 and computed else None,
            "processes": world, "device": str(ev.device), "fast_path": ev.fast, "needs": needs,
            "evaluation": {"path": ev.path, "precision": ev.precision, "compile": ev.compile,
                           "compile_seconds": None if ev.compile_seconds is None else round(ev.compile_seconds, 1)},
            "batchnorm": bn_info, "partial": store.dir}
    if missing:
        info["complete"] = False
        return info

    bad = ~np.isfinite(loss)
    loss[bad] = np.nan  # the evaluator already maps Inf to NaN; keep the rule in one place for old chunks
    pts = np.concatenate([grid_points(np.arange(s, min(s + 65536, n_points)), dims, origin, spacing, dim)
                          for s in range(0, n_points, 65536)])
    trust, _ = cKDTree(Z).query(pts)
    trusted, extrapolation = trusted_points(Z, pts, spacing)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_loss = np.log10(loss)
    lo = np.asarray(origin[:dim])
    hi = lo + np.asarray(spacing[:dim]) * (config["resolution"] - 1)
    name = os.path.basename(study.dir.rstrip("/"))
    vti = study_files.landscape_vti(study.dir, dim)
    field = ImageField(dims, origin, spacing,
                       {"loss": loss.astype(np.float32), "log_loss": log_loss.astype(np.float32),
                        "accuracy": acc.astype(np.float32), "trust": trust.astype(np.float32),
                        "extrapolation": extrapolation.astype(np.float32),
                        "trusted": trusted.astype(np.float32)},
                       {"study": name, "study_id": config["study_id"], "reducer": reducer.name,
                        "split": config["split"], "eval_samples": np.int64(config["eval_samples"]),
                        "resolution": np.int64(config["resolution"]), "nan_count": np.int64(bad.sum()),
                        "beyond_hull": config.get("beyond_hull", "extrapolate"),
                        "precision": config.get("precision", "fp32"), "batchnorm": bn_info["setting"],
                        **({"bn_samples": np.int64(config["bn_samples"])} if "bn" in config else {})},
                       active_scalars="loss")
    write_vti(vti, field)
    info.update(complete=True, bounds=np.stack([lo, hi], 1).reshape(-1).round(9).tolist(), nan_count=int(bad.sum()),
                loss_min=float(np.nanmin(loss)) if (~bad).any() else None,
                loss_max=float(np.nanmax(loss)) if (~bad).any() else None, vti=vti,
                trusted_fraction=float(trusted.mean()),
                extrapolated=_extrapolated_report(study, config["split"], loss, trusted),
                spikes=_spike_report(log_loss, dims, trusted))
    if trajectories:
        info["trajectories"] = write_trajectories(study, reducer, Z, ev, config["split"], chunk_points=cp)
    info["seconds"] = round(time.time() - t_start, 3)
    study.update_report(f"landscape-{tag}", info)
    store.remove()
    return info


def _extrapolated_report(study, split, loss, trusted) -> dict:
    """How bad the decoded models get outside the trusted part, against the worst stored checkpoint."""
    worst = float(np.nanmax(study.metrics[f"{split}_loss"]))
    out = {"points": int((~trusted).sum()), "worst_checkpoint_loss": worst,
           "loss_max_trusted": float(np.nanmax(loss[trusted])) if np.isfinite(loss[trusted]).any() else None}
    far = loss[~trusted]
    if len(far):
        bad = ~(far <= 2 * worst)  # NaN counts as bad
        out.update(loss_max=float(np.nanmax(far)) if np.isfinite(far).any() else None,
                   above_2x_worst_checkpoint=int(bad.sum()), above_2x_fraction=float(bad.mean()))
    return out


def _spike_report(log_loss, dims, trusted) -> dict:
    ids = find_spikes(log_loss, dims)
    return {"decades": 0.5, "all": int(len(ids)), "trusted": int(trusted[ids].sum()), "ids": ids[:20].tolist()}


TRAJECTORY_BATCH_BYTES = 64 << 20  # weights decoded per batch for the trajectories (in-memory basis)


def write_trajectories(study: Study, reducer, Z: np.ndarray, ev: BatchedEvaluator, split: str,
                       chunk_points: int = 1) -> str:
    """``STUDY/trajectories-{dim}d.vtp``: a polyline per run, its final checkpoint as a vertex.

    Point arrays: run, step, loss (the stored checkpoint's loss on ``split``), loss_eval (the original
    checkpoint on the landscape's evaluation subset), loss_decoded and accuracy_decoded (its latent
    point decoded and evaluated on that subset: loss_decoded - loss_eval is the reducer's error in loss).
    """
    from ..storage.vtk_files import write_vtp

    dim = int(reducer.dim)
    rows_per_run = [(r, study.run_rows(r, label=None)) for r in range(len(study.runs))]
    rows_per_run = [(r, rows) for r, rows in rows_per_run if len(rows)]
    order = np.concatenate([rows for _, rows in rows_per_run]) if rows_per_run else np.zeros(0, np.int64)
    pts = np.zeros((len(order), 3))
    pts[:, :dim] = Z[order]
    loss_dec, acc_dec, loss_eval = [], [], []
    tb = int(max(1, min(128, TRAJECTORY_BATCH_BYTES // (4 * study.n_params))))  # rows per batch
    # each decode with a streamed basis is a pass over the study: the landscape's chunk per pass, which
    # its memory estimate counts (at 1.2e8 parameters: 4 passes for 40 checkpoints, not 40)
    td = max(tb, int(chunk_points)) if getattr(getattr(reducer, "basis", None), "streamed", False) else tb
    for s in range(0, len(order), td):
        z = torch.as_tensor(Z[order[s : s + td]], dtype=torch.float32, device=ev.device)
        with torch.no_grad():
            a, b = ev.evaluate(reducer.inverse_transform_torch(z))
        loss_dec.append(a)
        acc_dec.append(b)
    for s in range(0, len(order), tb):  # the stored checkpoints: read directly, ~64 MiB at a time
        loss_eval.append(ev.evaluate(torch.from_numpy(study.read_params(order[s : s + tb])))[0])
    lines, verts, cell_run, start = [], [], [], 0
    for r, rows in rows_per_run:
        lines.append(list(range(start, start + len(rows))))
        verts.append([start + len(rows) - 1])
        start += len(rows)
    cell_run = [r for r, _ in rows_per_run] * 2  # verts first, then lines (VTK's cell order)
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0))  # noqa: E731
    path = study_files.trajectories_vtp(study.dir, dim)
    write_vtp(path, pts, lines=lines, verts=verts,
              point_arrays={"run": study.run[order].astype(np.int32), "step": study.step[order].astype(np.int64),
                            "loss": study.metrics[f"{split}_loss"][order].astype(np.float64),
                            "loss_eval": cat(loss_eval), "loss_decoded": cat(loss_dec),
                            "log_loss_decoded": np.log10(cat(loss_dec)).astype(np.float32),  # height in log views
                            "accuracy_decoded": cat(acc_dec)},
              cell_arrays={"run": np.asarray(cell_run, np.int32)},
              field_data={"study": os.path.basename(study.dir.rstrip("/")), "reducer": reducer.name, "split": split})
    return path
