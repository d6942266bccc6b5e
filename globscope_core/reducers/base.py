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
import re

import numpy as np
import torch

from ..errors import GlobScopeError
from ..storage.study import Study
from ..storage.study_files import reducer_file
from .budget import basis_plan, work_rows

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
        Z = np.asarray(Z, dtype=np.float32)
        if Z.ndim == 1:
            Z = Z[None]
        if Z.ndim != 2 or Z.shape[1] != self.dim:
            raise GlobScopeError(f"{self.name}: latent points have shape {Z.shape}, expected (n, {self.dim})")
        if not np.isfinite(Z).all():
            raise GlobScopeError(f"{self.name}: latent points contain NaN or Inf")
        with torch.no_grad():
            return self.inverse_transform_torch(torch.from_numpy(Z)).cpu().numpy()

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
        payload["checksum"] = _checksum(payload)  # torch's zip reader does not check its CRCs
        from ..storage.safe_write import save_torch

        save_torch(payload, path)  # verified, atomic; a full disk is one line and the old file stays

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
        if "checksum" in payload and payload["checksum"] != _checksum(payload):
            raise GlobScopeError(f"{path}: damaged reducer file (checksum mismatch); refit it with 'globscope fit'")
        _check_name(path, payload)
        try:
            r = cls(dim=int(payload["dim"]), **json.loads(payload["config"]))
            r.study_id = payload.get("study_id") or None
            r.load_state(payload["state"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            # e.g. a file written by an older GlobScope whose layout this version no longer reads
            raise GlobScopeError(f"{path}: incomplete or outdated reducer file ({type(exc).__name__}: {exc}); "
                                 "refit it with 'globscope fit'") from None
        return r


def _check_name(path: str, payload: dict) -> None:
    """A reducer file named ``<kind>-<dim>d.pt`` must hold that kind and latent dimension: the stages name their
    outputs by the reducer (a 3D one under a 2D name would replace landscape-3d.vti), users pick it by file name."""
    m = re.fullmatch(r"(.+)-(\d+)d\.pt", os.path.basename(path))
    try:
        dim = int(payload["dim"])
    except (KeyError, TypeError, ValueError):
        return  # an incomplete file: said when it is read
    emb = payload.get("state", {}).get("embedding") if isinstance(payload.get("state"), dict) else None
    if torch.is_tensor(emb) and emb.ndim == 2 and emb.shape[1] != dim:
        raise GlobScopeError(f"{path}: damaged reducer file (its embedding is {emb.shape[1]}-dimensional, the file "
                             f"says {dim}); refit it with 'globscope fit'")
    named_kind = m and (m.group(1) in REDUCER_KINDS and m.group(1) != payload.get("kind"))  # 'mine-2d.pt' may be any
    if m and (named_kind or int(m.group(2)) != dim):
        raise GlobScopeError(f"{path}: holds a {dim}-dimensional {payload.get('kind')} reducer "
                             f"({payload.get('kind')}-{dim}d), not what its name says; rename it to "
                             f"{payload.get('kind')}-{dim}d.pt or fit {m.group(1)}-{m.group(2)}d again")


def _checksum(payload: dict) -> str:
    """BLAKE2 of everything a reducer file holds but the checksum itself (files older than it have none)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)

    def add(key, v):
        h.update(str(key).encode())
        if isinstance(v, dict):
            for k in sorted(v):
                add(k, v[k])
        elif torch.is_tensor(v):
            h.update(str(v.dtype).encode() + str(tuple(v.shape)).encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy: V is GBs
        else:
            h.update(repr(v).encode())

    add("payload", {k: v for k, v in payload.items() if k != "checksum"})
    return h.hexdigest()


class SpanReducer(Reducer):
    """A reducer on the coordinates of a streamed linear basis of the checkpoints (basis.SpanBasis).

    Subclasses implement ``_fit_coords(C)``, ``_encode(C) -> Z`` (numpy float64) and
    ``_decode_torch(z) -> C`` on the basis coordinates, plus ``_state``/``_load_state`` for their
    own tensors. Fitted attributes shared by all: ``basis``, ``embedding_`` (latent coordinates of
    the fitted checkpoints, in row order) and ``fit_info`` (timings, sizes).
    """

    min_checkpoints = 3

    def fit(self, X, progress: bool = False, plan=None):
        """``plan``: how the basis is built and held (budget.BasisPlan), as the caller decided and printed it;
        None: decided here."""
        import time

        from ..networks.device import resolve_device
        from .basis import SpanBasis

        t0 = time.perf_counter()
        self.basis = SpanBasis()
        block_rows, max_rank, floor = self.config.get("block_rows"), self.config.get("max_rank"), _variance_mask(X)
        n = X.n_checkpoints if hasattr(X, "n_checkpoints") else len(X)
        plan = plan or basis_plan(_n_params(X), n, max_rank, self.config.get("basis"), self.kind, floor is not None)
        C = self.basis.fit(X, min_checkpoints=self.min_checkpoints, block_rows=block_rows, progress=progress,
                           max_rank=max_rank, device=resolve_device(self.config.get("device", "cpu")),
                           floor_mask=floor, streamed=plan.streamed, panel_bytes=plan.panel_bytes)
        t1 = time.perf_counter()
        self._fit_coords(C, progress=progress)
        self.embedding_ = np.asarray(self._encode(C), dtype=np.float64)
        # the variance a truncated basis (--max-rank) leaves out is the floor of every reconstruction error
        self.fit_info = {"basis_rank": self.basis.rank, "basis_explained": float(self.basis.explained.sum()),
                         "basis_mode": plan.mode, "basis_why": plan.why, "basis_seconds": t1 - t0,
                         "reducer_seconds": time.perf_counter() - t1, **getattr(self, "fit_info", {})}
        self.coords_ = C  # kept in memory for metrics; not saved
        return self

    def fitted_latent(self, study):
        """The latent points of ``study``'s rows when the basis is streamed from exactly these rows: the fit's own
        (its coordinates C = U L^1/2, which encoding reproduces to float32 rounding), instead of reading the study
        once more per block to encode it. None otherwise (the basis held in memory encodes at little cost)."""
        b = self.basis
        if b.streamed and b.source is not None and getattr(b.source, "h5_path", None) == getattr(study, "h5_path", 0) \
                and len(self.embedding_) == study.n_checkpoints:
            return self.embedding_
        return None

    def transform(self, X) -> np.ndarray:
        if hasattr(X, "iter_params"):  # a Study: stream it
            known = self.fitted_latent(X)
            if known is not None:
                return np.array(known, dtype=np.float64)
            return np.concatenate([self._encode(self.basis.to_coords(B))
                                   for _, B in X.iter_params(work_rows(X.n_params))], 0)
        return np.asarray(self._encode(self.basis.to_coords(X)), dtype=np.float64)

    def inverse_transform_torch(self, z: torch.Tensor) -> torch.Tensor:
        return self.basis.from_coords_torch(self._decode_torch(z))

    def decode_coords(self, Z) -> np.ndarray:
        """Latent points -> basis coordinates (float64), for metrics in standardized units."""
        with torch.no_grad():
            return self._decode_torch(torch.as_tensor(np.asarray(Z, dtype=np.float32))).double().cpu().numpy()

    def state(self) -> dict:
        return {**self.basis.state(), "embedding": torch.as_tensor(self.embedding_), **self._state()}

    def load_state(self, state: dict) -> None:
        from .basis import SpanBasis

        self.basis = SpanBasis.from_state(state)
        self.embedding_ = state["embedding"].numpy()
        self._load_state(state)

    # --- to implement ------------------------------------------------------------------------
    def _fit_coords(self, C: np.ndarray, progress: bool = False) -> None:
        raise NotImplementedError

    def _encode(self, C: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _decode_torch(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _state(self) -> dict:
        return {}

    def _load_state(self, state: dict) -> None:
        pass


def _variance_mask(X):
    """[P] bool, True at BatchNorm running variances (their decoded values get a floor), or None."""
    layout = getattr(X, "layout", None)
    if layout is None:
        return None
    mask = np.zeros(layout.size, bool)
    for e in layout.entries:
        if e.name.endswith("running_var"):
            mask[e.offset : e.offset + e.numel] = True
    return mask if mask.any() else None


def _n_params(X) -> int:
    return int(X.n_params) if hasattr(X, "n_params") else int(np.shape(X)[1])


def study_id(study: Study) -> str:
    """An identity of the study's checkpoint set: the reducer must not be used on another study."""
    return f"{study.layout.size}:{study.n_checkpoints}:{float(np.nansum(study.metrics['train_loss'])):.9g}"


def load_reducer(study: Study, name: str) -> Reducer:
    """Load ``STUDY/reducers/<name>.pt`` and check that it was fitted on this study."""
    path = name if name.endswith(".pt") else reducer_file(study.dir, name)
    r = Reducer.load(path)
    if r.study_id and r.study_id != study_id(study):
        raise GlobScopeError(f"{path}: fitted on a different study (or this study changed since); refit it")
    basis = getattr(r, "basis", None)
    if basis is not None and basis.streamed:  # decodes from the checkpoints it was fitted on
        source = study
        if basis.W.shape[1] != study.n_checkpoints:  # connect's refit: the ensemble and the stored paths
            from ..storage.study import RowUnion, paths_store

            paths = paths_store(study, create=False)
            source = RowUnion(study, paths) if paths is not None else study
        basis.attach(source)
    return r
