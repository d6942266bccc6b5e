"""The machine a benchmark ran on, in every result file: a time without its CPU compares with nothing (bf16 is
6x slower than fp32 on a CPU without bf16 units and 2-3x faster on one with AMX).

Every bench script writes its JSON through ``write_json``, which adds ``"machine"``: the CPU's model name and
bf16 units (/proc/cpuinfo, read by ``globscope_core.networks.device.cpu_info``), the core count, and the GPU
when torch sees one. A result that is a list is kept under ``"results"``.
"""
from __future__ import annotations

import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from globscope_core.networks.device import cpu_info  # noqa: E402
from globscope_core.storage.safe_write import atomic_write_bytes  # noqa: E402


def machine() -> dict:
    cpu = cpu_info()
    out = {"cpu": cpu["name"] or platform.processor() or platform.machine(), "cpu_bf16_units": cpu["bf16"],
           "cpu_count": os.cpu_count(), "python": platform.python_version()}
    torch = sys.modules.get("torch")  # only when the benchmark uses it: bench_topology runs without torch
    if torch is not None:
        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    return out


def stamped(doc):
    """``doc`` with ``"machine"`` added (a list becomes ``{"machine": ..., "results": doc}``)."""
    if isinstance(doc, dict):
        return {**doc, "machine": machine()}
    return {"machine": machine(), "results": doc}


def write_json(path: str, doc, indent: int = 1, default=None) -> None:
    """The benchmark's result, with the machine it ran on, written atomically."""
    atomic_write_bytes(path, json.dumps(stamped(doc), indent=indent, default=default).encode())
