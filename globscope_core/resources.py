"""What a stage needs before it starts: memory estimates and a clear refusal instead of an OOM kill.

Each ``estimate_*`` returns ``{part: bytes}`` for the big allocations of one stage (the parts are named
in the refusal, so the user sees *what* is large); ``require(parts, what, device)`` compares the sum
with the memory the process may use and raises a one-line GlobScopeError when it does not fit.

Memory the process may hold (host): the smallest of psutil's available memory plus what the process
holds already, the cgroup limit (a container's "memory it was given") and ``GLOBSCOPE_MEMORY_LIMIT``
(e.g. ``4G``, ``512M``: a cap the user sets, also used by the tests). On a GPU, the free memory of
``torch.cuda.mem_get_info`` plus what torch has reserved, for the device parts.

The estimates are upper bounds of the stage's own big arrays plus a fixed base for the Python, torch
and h5py runtime; bench/bench_scale.py prints them next to the measured peaks.
"""
from __future__ import annotations

import os

from .errors import GlobScopeError

BASE_BYTES = 600 << 20  # interpreter + torch + numpy + h5py + vtk, measured ~0.4-0.5 GiB
F32, F64 = 4, 8


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


def require(parts: dict, what: str, device=None, gpu_parts: dict | None = None, hint: str = "") -> dict:
    """Raise a GlobScopeError when ``parts`` (host bytes) or ``gpu_parts`` (device bytes) do not fit.

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
    return out


# --- the stages ------------------------------------------------------------------------------------
def estimate_train(n_params: int, rows_per_run: int, train_samples: int, sample_numel: int, batch_size: int,
                   optimizer: str = "sgd", activations_per_sample: int | None = None) -> dict:
    """Training one run at a time: the data set, the model with gradients and optimizer state, and the
    run's checkpoints, which are kept until the run is committed to the study in one transaction."""
    opt_states = {"sgd": 1, "adam": 2, "adamw": 2}.get(optimizer, 2)
    act = activations_per_sample if activations_per_sample is not None else 64 * sample_numel
    return {"base": BASE_BYTES, "data set": train_samples * sample_numel * F32,
            "model, gradients, optimizer": n_params * F32 * (2 + opt_states),
            "checkpoints of one run": rows_per_run * n_params * F32,
            "activations": batch_size * act * F32}


def estimate_landscape(n_params: int, rank: int, chunk_points: int, n_points: int, eval_bytes: int,
                       activation_budget: int = 256 << 20) -> dict:
    """Decoding a chunk of grid points into full weights and evaluating them together."""
    return {"base": BASE_BYTES,
            "reducer basis [k, P]": rank * n_params * F32 + 2 * n_params * F32,
            "decoded chunk [B, P]": 2 * chunk_points * n_params * F32,
            "activations": activation_budget,
            "evaluation data": eval_bytes,
            "field arrays": n_points * 8 * 8}


def check_device_memory(n_bytes: int, device, what: str) -> None:
    """Refuse a GPU allocation plan larger than the device's free memory."""
    require({}, what, device, gpu_parts={"device arrays": n_bytes})
