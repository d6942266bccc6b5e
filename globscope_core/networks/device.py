"""Where tensors live: ``--device auto|cpu|cuda|cuda:N|mps`` as a torch.device, refused clearly when absent;
and what the CPU can do (its name, whether it has bfloat16 units) for the precision options and the benchmarks.
torch is imported by the functions that need it: the CPU's description needs none (bench_topology)."""
from __future__ import annotations

from ..errors import GlobScopeError


def available_devices() -> list[str]:
    """The devices this torch build can use on this machine, e.g. ``["cpu"]`` or ``["cpu", "cuda:0", "cuda:1"]``."""
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve_device(name: str | None):
    """A torch.device: ``auto`` picks CUDA when present; a device this build or machine lacks is a clear error
    (before any work)."""
    import torch

    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = ", ".join(available_devices())
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GlobScopeError(f"--device {name}: no CUDA GPU is available on this machine (available: {have})")
    if name == "mps" and "mps" not in have:  # torch accepts the name, then fails at the first tensor moved there
        raise GlobScopeError(f"--device mps: this torch build cannot use Apple's GPU (MPS) here (available: {have})")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise GlobScopeError(f"--device {name}: not a device (use cpu, cuda, cuda:N, mps or auto)") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise GlobScopeError(f"--device {name}: no such GPU (available: {have})")
    return dev


# --- the CPU --------------------------------------------------------------------------------------
def _cpuinfo(path: str = "/proc/cpuinfo") -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:  # not Linux
        return ""


def cpu_info(text: str | None = None) -> dict:
    """``{"name": model name or None, "bf16": True/False, or None when unknown}`` from /proc/cpuinfo (``text``).

    bf16 units: x86's AVX512-BF16 or AMX-BF16 flags, Arm's ``bf16`` feature. Without them torch emulates
    bfloat16 in software, several times slower than fp32 (ResNet-20 on an AMD EPYC without either: 6x)."""
    import platform

    text = _cpuinfo() if text is None else text
    name, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and name is None and value.strip():
            name = " ".join(value.split())
        elif key in ("flags", "features") and flags is None:
            flags = set(value.split())
    if name is None and not text:
        name = platform.processor() or None
    bf16 = None if flags is None else bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return {"name": name, "bf16": bf16}


def bf16_cpu_warning(text: str | None = None) -> str | None:
    """A one-line warning when bfloat16 is asked for on a CPU without bf16 units (None: it has them, or unknown)."""
    info = cpu_info(text)
    if info["bf16"] is not False:
        return None
    return (f"--precision bf16: this CPU ({info['name'] or 'unknown model'}) has no bfloat16 units (neither "
            "AVX512-BF16 nor AMX), so torch emulates bf16 and it runs several times slower than fp32; "
            "fp32 is faster here")
