"""The reducer contract shared by every stage (fit, landscape, connect, align).

A reducer follows scikit-learn's estimator API on flattened checkpoints:
  fit(X) -> self            X: float32 [N, P] array, or a Study (streamed in row blocks)
  transform(X) -> Z         [k, P] -> [k, dim]  (float64 numpy)
  inverse_transform(Z) -> X [k, dim] -> [k, P]  (float32 numpy)
  inverse_transform_torch(z) -> x   torch [k, dim] -> torch [k, P], on z's device (landscape uses it)

Saved as ``STUDY/reducers/<kind>-<dim>d.pt``: a dict of tensors and a JSON config, written with
torch.save and read back with ``torch.load(weights_only=True)`` (no pickled code).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..errors import GlobScopeError
from ..store import Study

REDUCER_KINDS: dict[str, type] = {}


def register_reducer(kind: str):
    def deco(cls):
        cls.kind = kind
        REDUCER_KINDS[kind] = cls
        return cls

    return deco


class Reducer:
    kind = "base"

    def __init__(self, dim: int = 2, **config):
        if dim not in (2, 3):
            raise GlobScopeError(f"latent dimension must be 2 or 3, not {dim}")
        self.dim = dim
        self.config = dict(config)
        self.study_id: str | None = None  # set by fit_reducer: which study the reducer belongs to

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.dim}d"

    # --- to implement ------------------------------------------------------------------------
    def fit(self, X):
        raise NotImplementedError

    def transform(self, X) -> np.ndarray:
        raise NotImplementedError

    def inverse_transform(self, Z) -> np.ndarray:
        return self.inverse_transform_torch(torch.as_tensor(np.asarray(Z, dtype=np.float32))).cpu().numpy()

    def inverse_transform_torch(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> dict:
        """Tensors needed to transform and decode (saved with the config)."""
        raise NotImplementedError

    def load_state(self, state: dict) -> None:
        raise NotImplementedError

    # --- persistence -------------------------------------------------------------------------
    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        payload = {"kind": self.kind, "dim": self.dim, "config": json.dumps(self.config),
                   "study_id": self.study_id or "", "state": self.state()}
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @staticmethod
    def load(path: str) -> "Reducer":
        if not os.path.exists(path):
            raise GlobScopeError(f"{path}: no such reducer (fit it with 'globscope fit')")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            cls = REDUCER_KINDS[payload["kind"]]
        except KeyError as exc:
            raise GlobScopeError(f"{path}: unknown reducer kind {exc}") from None
        except Exception as exc:
            raise GlobScopeError(f"{path}: not a GlobScope reducer file ({type(exc).__name__})") from None
        r = cls(dim=int(payload["dim"]), **json.loads(payload["config"]))
        r.study_id = payload.get("study_id") or None
        r.load_state(payload["state"])
        return r


def study_id(study: Study) -> str:
    """An identity of the study's checkpoint set: the reducer must not be used on another study."""
    return f"{study.layout.size}:{study.n_checkpoints}:{float(np.nansum(study.metrics['train_loss'])):.9g}"


def reducer_path(study_dir: str, name: str) -> str:
    return os.path.join(study_dir, "reducers", f"{name}.pt")


def load_reducer(study: Study, name: str) -> Reducer:
    """Load ``STUDY/reducers/<name>.pt`` and check that it was fitted on this study."""
    path = name if name.endswith(".pt") else reducer_path(study.dir, name)
    r = Reducer.load(path)
    if r.study_id and r.study_id != study_id(study):
        raise GlobScopeError(f"{path}: fitted on a different study (or this study changed since); refit it")
    return r
