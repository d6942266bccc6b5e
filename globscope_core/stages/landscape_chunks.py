"""An unfinished landscape's chunks (``STUDY/.landscape-Xd.partial/``) and their sharing out under ``torchrun``.

``PartialStore``: config.json (every setting that decides the numbers) + one .npz per finished chunk; a rerun with
the same settings resumes, one with other settings is refused in one line. ``Dist``: torch.distributed when started
by torchrun, a no-op single process otherwise.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import torch

from ..errors import GlobScopeError
from ..storage import study_files
from ..storage.safe_write import atomic_write_bytes


# --- the resumable chunk store ------------------------------------------------------------------
class PartialStore:
    """``STUDY/.landscape-Xd.partial/``: config.json + one .npz per finished chunk."""

    def __init__(self, directory: str):
        self.dir = directory
        self.config_path = os.path.join(directory, study_files.PARTIAL_CONFIG)

    def chunk_path(self, k: int) -> str:
        return os.path.join(self.dir, study_files.chunk_name(k))

    def unfinished_config(self) -> dict | None:
        """The config of an unfinished landscape with finished chunks here (None when there is none)."""
        if not glob.glob(os.path.join(self.dir, study_files.CHUNK_PATTERN)):
            return None
        try:
            with open(self.config_path) as fh:
                old = json.load(fh)
        except (OSError, json.JSONDecodeError):
            return None
        return old if isinstance(old, dict) else None

    def open(self, config: dict, fresh: bool) -> None:
        if fresh and os.path.isdir(self.dir):
            shutil.rmtree(self.dir)
        if os.path.exists(self.config_path):
            try:
                with open(self.config_path) as fh:
                    old = json.load(fh)
            except (OSError, json.JSONDecodeError):
                old = None
            if old == config:
                return
            # other settings: refused only when chunks were computed (a failed or refused start protects nothing)
            if glob.glob(os.path.join(self.dir, study_files.CHUNK_PATTERN)):
                diff = sorted(k for k in set(config) | set(old or {}) if (old or {}).get(k) != config.get(k))
                raise GlobScopeError(f"{self.dir}: an unfinished landscape with other settings is here "
                                     f"(differs in: {', '.join(diff)}); rerun with the same settings to resume, "
                                     "or pass --fresh to discard it")
        os.makedirs(self.dir, exist_ok=True)
        for stale in glob.glob(os.path.join(self.dir, study_files.CHUNK_ANY)):
            os.remove(stale)  # chunks without a config belong to no known run
        atomic_write_bytes(self.config_path, json.dumps(config, indent=1).encode())

    def write_chunk(self, k: int, loss: np.ndarray, acc: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        np.savez(buf, loss=np.asarray(loss, np.float64), accuracy=np.asarray(acc, np.float64))
        atomic_write_bytes(self.chunk_path(k), buf.getvalue())

    def read_chunk(self, k: int, size: int):
        """(loss, accuracy) of chunk ``k``, or None when missing or damaged (it is then recomputed)."""
        path = self.chunk_path(k)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                loss, acc = z["loss"], z["accuracy"]
        except Exception:
            return None
        if loss.shape != (size,) or acc.shape != (size,):
            return None
        return loss, acc

    def done(self, n_chunks: int, sizes) -> list[int]:
        return [k for k in range(n_chunks) if self.read_chunk(k, sizes[k]) is not None]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# --- distributed ----------------------------------------------------------------------------------
class Dist:
    """torch.distributed when started by torchrun; a no-op single process otherwise."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1
        self.device = device
        self.owned = False
        if self.active:
            import torch.distributed as dist

            if device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self.owned = True

    def broadcast(self, obj):
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def close(self):
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
