"""Where tensors live: ``--device auto|cpu|cuda|cuda:N`` as a torch.device, refused clearly when absent."""
from __future__ import annotations

import torch

from ..errors import GlobScopeError


def resolve_device(name: str | None) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a clear error."""
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GlobScopeError("--device cuda: no CUDA GPU is available on this machine (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise GlobScopeError(f"--device {name}: not a device (use cpu, cuda, cuda:N or auto)") from None
