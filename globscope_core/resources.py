"""What a stage needs before it starts: memory estimates and a clear refusal instead of an OOM kill.

Each ``estimate_*`` returns ``{part: bytes}`` for the big allocations of one stage (the parts are named
in the refusal, so the user sees *what* is large); ``require(parts, what, device)`` compares the sum
with the memory the process may use and raises a one-line GlobScopeError when it does not fit.

Memory the process may hold (host): the smallest of psutil's available memory plus what the process
holds already, the cgroup limit (a container's "memory it was given") and ``GLOBSCOPE_MEMORY_LIMIT``
(e.g. ``4G``, ``512M``: a cap the user sets, also used by the tests). On a GPU, the free memory of
``torch.cuda.mem_get_info`` plus what torch has reserved, for the device parts.

An estimate is the process's resident memory when the stage starts (the interpreter, torch and what the stage
has loaded: measured, ``held_now``), the libraries and runtime the stage loads later, and the large arrays of
its largest phase (phases such as the Gram pass and the basis pass come one after the other: ``largest``).
It is meant as the stage's peak resident memory (``ru_maxrss``) within 25%: bench/bench_memory.py runs every
stage of six studies from 2e3 to 1.7e7 parameters and compares; tests/test_faults_memory.py checks two small
ones. Long stages print it when they start (``require(..., say=True)``): one line ``memory: about ...``.
"""
from __future__ import annotations

import os
import sys

from .errors import GlobScopeError

# the interpreter with torch, numpy and h5py imported (measured 0.26-0.34 GiB): the floor of quick checks made
# before a stage knows more; the stages' estimates measure what the process holds instead (held_now)
BASE_BYTES = 320 << 20
F32, F64 = 4, 8
HELD = "held now"  # the part of every estimate that is this process's resident memory when it is made


def format_bytes(n: float) -> str:
    """Bytes in a message (every size GlobScope reports): ``"1.50 GiB"`` from 1 GiB up, ``"200 MiB"`` from
    10 MiB up, else ``"4.0 MiB"`` (a small need or a nearly full disk keeps a digit)."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**20:.1f} MiB"


def parse_size(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"1.5GiB"``, ``"1000000"`` -> bytes."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise GlobScopeError(f"GLOBSCOPE_MEMORY_LIMIT='{text}': not a size (use e.g. 4G or 512M)") from None


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < (1 << 60):
            return int(raw)
    return None


def _available_and_own() -> tuple[int, int]:
    """(available RAM, this process's resident set) in bytes: psutil's, or, in a Python without psutil
    (ParaView's, for the merge tree), the free pages, or half the RAM when more (page cache counts as free)."""
    try:
        import psutil
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")
        return max(os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page // 2), 0
    return int(psutil.virtual_memory().available), int(psutil.Process().memory_info().rss)


def host_memory() -> tuple[int, str]:
    """(bytes this process may hold in all, where that number comes from): the one rule of every memory check.

    What it holds already counts as its own: the available RAM plus this process's resident set, so a
    check made after the study or reducer is loaded compares the stage's whole need with it."""
    avail, own = _available_and_own()
    candidates = [(avail + own, "available RAM")]
    cg = _cgroup_limit()
    if cg is not None:
        candidates.append((cg, "cgroup memory limit"))
    env = os.environ.get("GLOBSCOPE_MEMORY_LIMIT")
    if env:
        candidates.append((parse_size(env), "GLOBSCOPE_MEMORY_LIMIT"))
    return min(candidates)


def gpu_memory(device) -> tuple[int, str]:
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return int(free) + int(torch.cuda.memory_reserved(device)), f"free memory on {device}"


def process_memory() -> tuple[int, int]:
    """(resident set now, peak resident set so far) of this process, in bytes (0, 0 where unknown)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            now = int(psutil.Process().memory_info().rss)
        except ImportError:
            now = peak
    return now, peak


def held_now() -> dict:
    """``{HELD: bytes}``: what this process holds already (at least the interpreter with torch, in case the
    platform does not say), the first part of every stage's estimate."""
    return {HELD: max(process_memory()[0], 250 << 20)}


def largest(*phases: dict) -> dict:
    """The phase ({part: bytes}) with the largest sum: phases that come one after the other (the Gram pass,
    the basis pass, the evaluation) do not add up."""
    return dict(max(phases, key=lambda p: sum(p.values())))


def memory_line(parts: dict, gpu_parts: dict | None = None) -> str:
    """``memory: about 3.10 GiB expected (held now 300 MiB, basis V [k, P] 1.20 GiB, ...)``: every part, largest
    first (parts under 1 MiB are left out of the list, not out of the sum)."""
    need = int(sum(parts.values()))
    _, peak = process_memory()
    shown = [f"{k} {format_bytes(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 1 << 20]
    line = f"memory: about {format_bytes(max(need, peak))} expected ({', '.join(shown)}"
    if peak > need:  # e.g. a data set loaded (and let go) before the stage's own arrays
        line += f"; {format_bytes(peak)} reached already"
    line += ")"
    if gpu_parts:
        line += f", GPU about {format_bytes(sum(gpu_parts.values()))}"
    return line


def require(parts: dict, what: str, device=None, gpu_parts: dict | None = None, hint: str = "",
            say: bool = False) -> dict:
    """Raise a GlobScopeError when ``parts`` (host bytes) or ``gpu_parts`` (device bytes) do not fit.

    ``say``: print the estimate (``memory_line``) on stderr once it fits: the first line of a long stage.
    Returns ``{"host_bytes", "host_limit", "gpu_bytes", "gpu_limit"}`` for the report.
    """
    out = {}
    for label, ps, limit in (("host", parts, host_memory), ("gpu", gpu_parts, None)):
        if not ps:
            continue
        if label == "gpu":
            if device is None or getattr(device, "type", str(device)) != "cuda":
                continue
            limit = lambda: gpu_memory(device)  # noqa: E731
        need = int(sum(ps.values()))
        have, source = limit()
        out[f"{label}_bytes"], out[f"{label}_limit"] = need, have
        if need > have:
            big = sorted(ps.items(), key=lambda kv: -kv[1])[:3]
            detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in big)
            where = "GPU memory" if label == "gpu" else "memory"
            raise GlobScopeError(f"{what}: needs about {format_bytes(need)} of {where} ({detail}), but only {format_bytes(have)} "
                                 f"is there ({source}){'; ' + hint if hint else ''}")
    if say:
        gpu = gpu_parts if device is not None and getattr(device, "type", str(device)) == "cuda" else None
        print(memory_line(parts, gpu), file=sys.stderr, flush=True)
    return out


# --- the stages ------------------------------------------------------------------------------------
# resident memory that importing a library adds, measured after torch and h5py (each after the ones before it
# in this order: scikit-learn's share is without scipy's; VTK's: the modules storage/vtk_files.py loads); umap's
# includes numba, pynndescent and the code numba compiles when it first runs
LIBRARY_BYTES = {"scipy": 40 << 20, "sklearn": 80 << 20, "matplotlib": 30 << 20, "vtkmodules": 45 << 20,
                 "umap": 230 << 20}


def libraries(*names: str) -> dict:
    """``{"libraries (a, b)": bytes}`` of the libraries among ``names`` that this process has not imported yet."""
    todo = [n for n in dict.fromkeys(names) if n not in sys.modules]
    return {f"libraries ({', '.join(todo)})": sum(LIBRARY_BYTES[n] for n in todo)} if todo else {}


# what torch's autograd engine, optimizers and thread pools add once a model trains (TRAIN_RUNTIME), and an
# evaluation's allocations besides its arrays (EVAL_RUNTIME): measured resident memory, after less before
TRAIN_RUNTIME = 40 << 20
EVAL_RUNTIME = 40 << 20
# a training step's activations over what autograd saves for the backward pass (gradients, workspaces): measured
# 1.5-1.65 on ResNet-56 and the ViT
TRAIN_ACTIVATIONS = 1.6


def estimate_train(n_params: int, rows_per_run: int, batch_size: int, optimizer: str = "sgd",
                   activations: tuple[int, int] = (0, 0), eval_samples: int = 0, held: dict | None = None) -> dict:
    """Training one run at a time (the data set is loaded: ``held now``): the run's checkpoints, which are kept
    until the run is committed to the study in one transaction, with the model, its gradients and optimizer
    state while it trains, or the rows read back while it commits. Activations: the larger of a training step's
    (what autograd keeps for the backward pass of ``batch_size`` samples, with the gradients and workspaces:
    TRAIN_ACTIVATIONS) and an evaluation's (about 4 of the largest outputs of 2048 samples,
    measured on the CIFAR CNN). ``activations``: one sample's (largest module output, tensors autograd keeps).
    ``optimizer``: the one with the most state among the runs (sgd: momentum; adam, adamw: two moments)."""
    opt_states = {"sgd": 1, "adam": 2, "adamw": 2}.get(optimizer, 2)
    largest_out, saved = activations
    act = max(int(TRAIN_ACTIVATIONS * batch_size * saved), 4 * min(2048, eval_samples) * largest_out)
    training = {"model, gradients, optimizer": n_params * F32 * (2 + opt_states), "activations": act}
    # the commit reads each row back into one buffer through HDF5's checksum filter (its chunk buffer: another row)
    commit = {"commit: a row read back, HDF5's chunk buffer": 2 * n_params * F32}
    return {**(held if held is not None else held_now()), "autograd and optimizer runtime": TRAIN_RUNTIME,
            "checkpoints of one run": rows_per_run * n_params * F32, **largest(training, commit)}


def estimate_landscape(n_params: int, chunk_points: int, n_points: int, eval_bytes: int,
                       activation_bytes: int = 256 << 20, model_copies: int = 1, held: dict | None = None) -> dict:
    """Decoding a chunk of grid points into full weights and evaluating them together (the reducer, its
    checkpoints' codes and the evaluation data are loaded: ``held now``): the decoded chunk [B, P], the
    evaluator's model (``model_copies``: 2 on the per-model path, which works on its own copy) and one forward's
    activations, then the field's arrays (float64 work copies, the float32 arrays written, VTK's copies)."""
    return {**(held if held is not None else held_now()), **libraries("scipy", "vtkmodules"),
            "evaluation runtime": EVAL_RUNTIME, "decoded chunk [B, P]": chunk_points * n_params * F32,
            "evaluation model": model_copies * n_params * F32,
            "activations": activation_bytes,
            "evaluation data": eval_bytes,
            "field arrays": n_points * 8 * 12}


def estimate_connect(n_params: int, points: int, bends: int, plane_resolution: int, reducer_bytes: int,
                     data: tuple[int, int] = (0, 0), batch_size: int = 64, activations: tuple[int, int] = (0, 0),
                     data_libraries: tuple = (), batchnorm: bool = False, held: dict | None = None) -> dict:
    """A curve between two final models (stages/connect.py): the reducers of the views (``reducer_bytes``, their
    files' size), the data set (``data``: what it keeps, its peak while loading) and the model stay; then, one
    after the other, the curve's training (its bends with gradients and momentum, the end points, a step's
    activations), the curve and line points with their evaluated copies (the line is made in float64), the
    plane of the curve (its float64 basis, the paths decoded in float64, chunks of 128 models) and the latent
    views (each loads its evaluation data again while the training data is held: what loading adds on top of
    it), and the commit to paths.h5.
    ``batchnorm``: the model's BatchNorm statistics are recomputed at every point (forward passes of 512 samples)."""
    P, m = n_params, points
    kept, load = data
    rows = {"curve and line points, evaluated copies": 4 * m * P * F32}
    phases = [{"data set while it loads": load},
              {"data set": kept, "curve training (bends, gradients, momentum, ends)": (3 * bends + 6) * P * F32,
               "training activations": int(TRAIN_ACTIVATIONS * batch_size * activations[1])},
              {"data set": kept, "curve and line points [m, P] while made (float64)": 7 * m * P * F32},
              {"data set": kept, **rows, "BatchNorm statistics (512 samples)": 3 * 512 * activations[0] * batchnorm},
              {"data set": kept, **rows, "evaluation data loaded again": load - kept,
               "commit: rows read back": m * P * F32}]
    if plane_resolution:  # chunks of grid points decoded and evaluated, then both paths decoded in float64
        plane = {"data set": kept, **rows, "plane basis (float64)": 8 * P * F64}
        phases.append({**plane, "evaluation data loaded again": load - kept,
                       "plane chunk of models": 2 * min(128, plane_resolution**2) * P * F32})
        phases.append({**plane, "paths decoded in the plane (float64)": 5 * m * P * F64})
    # the libraries (views, plot) and torch's autograd come after the data set is loaded: not in its phase
    late = {**libraries("scipy", "vtkmodules", "matplotlib", *data_libraries),
            "autograd and optimizer runtime": TRAIN_RUNTIME}
    phases = phases[:1] + [{**late, **p} for p in phases[1:]]
    return {**(held if held is not None else held_now()), "reducers of the views": reducer_bytes,
            "model": 2 * P * F32, **largest(*phases)}


def estimate_align(n_params: int, rows_per_run: int, alphas: int, matching_bytes: int = 0, eval_bytes: int = 0,
                   data: tuple[int, int] = (0, 0), data_libraries: tuple = (), held: dict | None = None,
                   refine_bytes: int = 0) -> dict:
    """Aligning every run to a reference (stages/align.py): the data set (``data``: what it keeps, its peak while
    loading) and the models stay; per run its rows read and permuted (two copies), then either the matching
    (``matching_bytes``: its cost matrices, and ``refine_bytes`` of a refinement on the loss) or the straight line
    between two final models at ``alphas`` weights, made in float64 and evaluated."""
    P = n_params
    kept, load = data
    run = {"data set and its evaluation subset": kept + eval_bytes,
           "one run's rows, read and permuted": 2 * rows_per_run * P * F32}
    late = {**libraries("scipy", "matplotlib", *data_libraries), "evaluation runtime": EVAL_RUNTIME}
    phases = [{"data set while it loads": load},  # first: the libraries and evaluations come after it
              {**late, **run, "matching (cost matrices)": matching_bytes,
               **({"refinement on the loss (autograd of a chunk, states, samples)": refine_bytes}
                  if refine_bytes else {})},
              {**late, **run, "line between two models [alphas, P] (float64)": 2 * alphas * P * F64 + 2 * P * F64}]
    return {**(held if held is not None else held_now()), "models": 4 * P * F32, **largest(*phases)}


def check_device_memory(n_bytes: int, device, what: str) -> None:
    """Refuse a GPU allocation plan larger than the device's free memory."""
    require({}, what, device, gpu_parts={"device arrays": n_bytes})
