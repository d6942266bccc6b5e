"""Flattening a model's whole floating state into one vector, and back.

The layout covers parameters *and* floating buffers (BatchNorm running statistics), because a
decoded model must evaluate exactly like the original. Non-floating buffers (such as
BatchNorm's ``num_batches_tracked``) are not coordinates of the landscape; they keep the
values of a freshly built model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import GlobScopeError

if TYPE_CHECKING:  # annotations only
    import torch

# torch is imported by the methods that need it: the study's layout is read (storage.study.Study) by
# subcommands that need no torch (`globscope info`), and the torch import costs seconds


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    offset: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class StateLayout:
    """Names, shapes, dtypes and offsets of the floating entries of a state_dict."""

    def __init__(self, entries: list[Entry]):
        self.entries = list(entries)
        self.size = sum(e.numel for e in self.entries)

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: dict) -> "StateLayout":
        import torch

        entries, offset = [], 0
        for name, t in state.items():
            if not torch.is_tensor(t) or not t.is_floating_point():
                continue
            e = Entry(name, tuple(t.shape), str(t.dtype).replace("torch.", ""), offset)
            entries.append(e)
            offset += e.numel
        return cls(entries)

    @classmethod
    def from_module(cls, model: torch.nn.Module) -> "StateLayout":
        """Every floating tensor of the state once: a tied weight (a language model's output layer that is its
        token embedding) is one set of coordinates, under its first name; loading it sets both."""
        state, seen = {}, set()
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) not in seen:
                seen.add(id(t))
                state[name] = t.detach()
        return cls.from_state_dict(state)

    def to_json(self) -> str:
        return json.dumps([[e.name, list(e.shape), e.dtype, e.offset] for e in self.entries])

    @classmethod
    def from_json(cls, text: str) -> "StateLayout":
        return cls([Entry(n, tuple(s), d, o) for n, s, d, o in json.loads(text)])

    def __eq__(self, other) -> bool:
        return isinstance(other, StateLayout) and [(e.name, e.shape) for e in self.entries] == [
            (e.name, e.shape) for e in other.entries
        ]

    def __len__(self) -> int:
        return self.size

    # flatten / unflatten --------------------------------------------------------------------
    def check(self, state: dict, source: str = "state") -> None:
        """Raise a GlobScopeError naming every entry that is missing or has the wrong shape."""
        problems = []
        for e in self.entries:
            if e.name not in state:
                problems.append(f"missing '{e.name}'")
            elif tuple(state[e.name].shape) != e.shape:
                problems.append(f"'{e.name}' has shape {tuple(state[e.name].shape)}, model expects {e.shape}")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise GlobScopeError(f"{source}: does not match the model: {'; '.join(problems[:3])}{more}")

    def flatten(self, state: dict, source: str = "state") -> torch.Tensor:
        """One float32 vector [P] from a state_dict (any floating dtype is cast to float32)."""
        import torch

        self.check(state, source)
        return torch.cat([state[e.name].detach().reshape(-1).to(torch.float32).cpu() for e in self.entries])

    def unflatten(self, vec, dtype_cast: bool = True) -> dict:
        """A state_dict (views into ``vec`` where possible) from a vector [P]."""
        import torch

        vec = torch.as_tensor(vec)
        if vec.ndim != 1 or vec.shape[0] != self.size:
            raise GlobScopeError(f"flat vector has shape {tuple(vec.shape)}, layout expects ({self.size},)")
        out = {}
        for e in self.entries:
            t = vec[e.offset : e.offset + e.numel].view(e.shape)
            out[e.name] = t.to(getattr(torch, e.dtype)) if dtype_cast else t
        return out

    def unflatten_batch(self, mat) -> dict:
        """Batched views {name: tensor [B, *shape]} of a matrix [B, P], for torch.func / vmap."""
        import torch

        mat = torch.as_tensor(mat)
        if mat.ndim != 2 or mat.shape[1] != self.size:
            raise GlobScopeError(f"flat batch has shape {tuple(mat.shape)}, layout expects (B, {self.size})")
        return {e.name: mat[:, e.offset : e.offset + e.numel].reshape((mat.shape[0],) + e.shape) for e in self.entries}

    def load_into(self, model: torch.nn.Module, vec) -> torch.nn.Module:
        """Copy a flat vector into ``model`` in place (non-floating buffers are left as they are)."""
        state = self.unflatten(vec)
        model.load_state_dict(state, strict=False)
        return model
