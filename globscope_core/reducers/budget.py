"""How much of the checkpoints' span a reducer keeps, and what fitting it needs in memory (see resources.py)."""
from __future__ import annotations

import os

from ..resources import BASE_BYTES, F32, F64, parse_size
from .gram import BLOCK_BYTES, PANEL_BYTES, rows_for


def basis_rank(n_checkpoints: int, max_rank: int | None) -> int:
    return min(n_checkpoints, max_rank) if max_rank else n_checkpoints


def default_max_rank(n_params: int) -> int:
    """Rows of the span basis kept by default: as many as fit in BASIS_BYTES (``GLOBSCOPE_BASIS_BYTES``).

    Small models keep the exact basis (rank up to 4000 for the paper's MLP); the 4.7e6-parameter CNN keeps
    its leading 113 directions (2 GiB instead of 9.4 GB for 500 checkpoints), the 1e7 ViT 54."""
    budget = parse_size(os.environ.get("GLOBSCOPE_BASIS_BYTES", "2G"))
    return int(max(8, budget // (F32 * max(1, n_params))))


def estimate_fit(n_params: int, n_checkpoints: int, block_rows: int | None = None,
                 max_rank: int | None = None) -> dict:
    """The streamed span basis (basis.py, gram.py) and a reducer on its coordinates.

    The Gram pass (a float64 panel + a float32 stream block) and the basis pass (V + a row block) come one
    after the other: the larger of the two counts."""
    N, P = n_checkpoints, n_params
    k = basis_rank(N, max_rank)
    block = min(N, block_rows or rows_for(64 << 20, P, N))
    gram_pass = {"Gram panel and stream block": rows_for(PANEL_BYTES, P, N, 8) * P * F64
                 + rows_for(BLOCK_BYTES, P, N) * P * (3 * F32 + F64)}  # read, standardized, temp, float64
    basis_pass = {"basis V [k, P]": k * P * F32, "row block": block * P * (F32 + F64), "column slice": 64 << 20}
    larger = basis_pass if sum(basis_pass.values()) >= sum(gram_pass.values()) else gram_pass
    return {"base": BASE_BYTES, "mean, scale, sums [P]": P * (2 * F32 + 3 * F64),
            "Gram and coordinates [N, N]": 4 * N * N * F64, **larger}
