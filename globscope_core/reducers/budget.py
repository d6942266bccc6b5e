"""How much of the checkpoints' span a reducer keeps, and what fitting it needs in memory (see resources.py)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..resources import F32, F64, format_bytes, held_now, host_memory, largest, libraries, parse_size
from .gram import BLOCK_BYTES, PANEL_BYTES, rows_for, tile_rows, tiled_rows

# rows of the checkpoint matrix that the metrics and the held-out scoring handle at a time: their float64
# differences take ~8x the block, so a block of whole rows must stay small (256 rows of a 1.7e7-parameter
# MLP were 4.4 GB)
WORK_BLOCK_BYTES = 32 << 20


def work_rows(n_params: int) -> int:
    return int(max(1, WORK_BLOCK_BYTES // (F32 * max(1, n_params))))


def decode_rows(n_params: int, n_rows: int, share: int = 4) -> int:
    """Checkpoints (or grid points) decoded per pass over the study when the basis is streamed: every pass reads
    every row (20 GB for 40 checkpoints of a 1.24e8-parameter model, 22 s at this machine's 0.9 GB/s), so as many
    as 1/``share`` of the memory there holds."""
    return rows_for(host_memory()[0] // share, n_params, n_rows)


def held_out_group(n_params: int, n_held: int) -> int:
    """Held-out rows encoded and decoded per pass over the study when the basis is streamed: the rows and their
    decoded copies together take what one group of decoded checkpoints takes in the metrics (``decode_rows``)."""
    return max(1, decode_rows(n_params, 2 * n_held) // 2)


def basis_rank(n_checkpoints: int, max_rank: int | None) -> int:
    return min(n_checkpoints, max_rank) if max_rank else n_checkpoints


@dataclass(frozen=True)
class BasisPlan:
    mode: str  # "memory" or "streamed"
    why: str
    panel_bytes: int  # the Gram pass's panel (gram.py), fitted to the memory there

    @property
    def streamed(self) -> bool:
        return self.mode == "streamed"


def basis_plan(n_params: int, n_checkpoints: int, max_rank: int | None = None, mode: str | None = "auto",
               kind: str = "ae", floor: bool = False, **stage) -> BasisPlan:
    """How a span basis of every direction (or ``max_rank``) of the checkpoints is built and held.

    The basis V [k, P] is held in memory when it is at most ``GLOBSCOPE_BASIS_BYTES`` (2 GiB by default) and the
    fit with it fits in memory (resources.host_memory); otherwise it is streamed from the checkpoints (basis.py):
    exact all the same, every decode and encode a pass over the study instead of a product with V. The Gram
    panel is PANEL_BYTES (at least 8 rows of a large model) where that fits, else what the memory leaves it:
    a smaller panel reads the study more often, it does not change G. ``stage``: what the stage holds around the
    fit (``estimate_fit``'s evaluate, holdout_rows, data_libraries, held, block_rows), counted in both choices: a
    plan sized without the held-out scorer (949 MiB at 1.2e8 parameters) chose a panel the stage then refused."""
    N, P = n_checkpoints, n_params
    need = basis_rank(N, max_rank) * P * F32
    have, source = host_memory()

    def total(streamed: bool, panel: int | None = None) -> int:
        return int(sum(estimate_fit(P, N, max_rank=max_rank, kind=kind, floor=floor, streamed=streamed,
                                    panel_bytes=panel, **stage).values()))

    mode = mode or "auto"
    budget = parse_size(os.environ.get("GLOBSCOPE_BASIS_BYTES", "2G"))
    if mode != "auto":
        why = f"--basis {mode}"
    elif need > budget:
        mode = "streamed"
        why = f"V [k, P] would be {format_bytes(need)}, more than GLOBSCOPE_BASIS_BYTES ({format_bytes(budget)})"
    elif total(False) > have:
        mode = "streamed"
        why = (f"a fit holding V [k, P] ({format_bytes(need)}) would need {format_bytes(total(False))}, more than the "
               f"{format_bytes(have)} there ({source})")
    else:
        mode, why = "memory", f"V [k, P] is {format_bytes(need)}"
    row = P * F64
    usual = tiled_rows(max(PANEL_BYTES, 8 * row), P, N, F64)  # rows, whole tiles (gram.py)
    # the largest panel (whole tiles) under which the fit still fits: only the Gram phase grows with it, so the
    # room is what that phase leaves, not what the fit's largest phase leaves (the first pass's float64 sums:
    # under 12G at 1.2e8 parameters that left 2 rows of 40 where 8 fit: 400 rows read instead of 124)
    t = tile_rows(P)
    lo, hi = 1, max(1, -(-usual // t))  # tiles; a panel of one tile is the least the pass can do
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(mode == "streamed", min(mid * t, N) * row) <= have:
            lo = mid
        else:
            hi = mid - 1
    panel = min(lo * t, usual) * row
    usual *= row
    if panel < usual:
        why += f"; Gram panel {format_bytes(panel)} to fit in {format_bytes(have)} ({source})"
    return BasisPlan(mode, why, panel)


# what each kind loads and builds on the [N, k] coordinates beyond the basis: libraries (resources.LIBRARY_BYTES),
# torch's autograd for the autoencoder, and [N, N] work arrays in bytes per N^2
KIND_LIBRARIES = {"ae": (), "pca": (), "kpca": ("scipy", "sklearn"), "umap": ("scipy", "sklearn", "umap")}
KIND_RUNTIME = {"ae": 40 << 20}
KIND_PAIR_BYTES = {"ae": 48, "pca": 0, "kpca": 48, "umap": 24}


def basis_phases(n_params: int, n_rows: int, block_rows: int | None = None, max_rank: int | None = None,
                 floor: bool = False, streamed: bool = False, panel_bytes: int | None = None) -> list[dict]:
    """The phases of ``SpanBasis.fit`` on ``n_rows`` rows, one after the other (bytes of their large arrays).

    Pass 1 keeps float64 sums and squares and a shift of P (and the floor's minima), then the mean and a float64
    copy of the positive spreads for their median; the Gram pass holds a float64 panel of rows (PANEL_BYTES), a
    float64 stream block and a block read and standardized (numpy reuses the temporary) with HDF5's chunk buffer
    (a row: the study's chunks are rows); the basis pass holds V [k, P], a row block standardized and a column slice
    of the product (streamed: no basis pass). Pages that are never written (a stream buffer when one panel holds
    every row) cost nothing and are not counted."""
    N, P = n_rows, n_params
    k = basis_rank(N, max_rank)
    vec = P * F32 * (3 if floor else 2)  # mean, scale (and the floor of BatchNorm variances)
    bb = min(N, block_rows or rows_for(64 << 20, P, N))
    Bb = bb * P * F32
    pr, br = tiled_rows(panel_bytes or PANEL_BYTES, P, N, 8), tiled_rows(BLOCK_BYTES, P, N)
    stream = min(br, N - pr) if N > pr else 0
    cols = max(1, (64 << 20) // (4 * k))
    phases = [
        # measured at 1.2e8 parameters: 7.00 float32 vectors traced, 3.71 GiB resident with the row block
        {"mean and spread pass: float64 vectors [P]": (8 if floor else 7) * P * F32, "row block": Bb},
        {"mean, scale [P]": vec, "Gram panel (float64)": min(pr, N) * P * F64,
         # a float64 stream block, the rows read (one buffer) and standardized, and HDF5's chunk buffer (a row)
         "Gram stream block": stream * P * F64 + (min(br, N) * 2 + 1) * P * F32, "Gram matrix [N, N]": 4 * N * N * F64},
    ]
    if not streamed:
        phases.append({"mean, scale [P]": vec, "basis V [k, P]": k * P * F32, "row block standardized": 3 * Bb,
                       "column slice": min(64 << 20, k * P * F32) + (bb * cols * F32 if cols < P else 0)})
    return phases


def basis_held(n_params: int, n_rows: int, max_rank: int | None = None, floor: bool = False,
               streamed: bool = False) -> dict:
    """What a fitted basis keeps: mean, scale (and floor) [P] and V [k, P]; streamed, W [k, N] and the row block
    being read with its standardized copy while it decodes or encodes."""
    k, P = basis_rank(n_rows, max_rank), n_params
    held = {"mean, scale [P]": P * F32 * (3 if floor else 2)}
    if streamed:
        block = min(n_rows, rows_for(64 << 20, P, n_rows)) * P * F32
        held.update({"basis coefficients W [k, N]": k * n_rows * F32,
                     "streamed row block and its standardized copy": 2 * block})
    else:
        held["basis V [k, P]"] = k * P * F32
    return held


def estimate_fit(n_params: int, n_checkpoints: int, block_rows: int | None = None, max_rank: int | None = None,
                 kind: str = "ae", floor: bool = False, evaluate: dict | None = None, holdout_rows: int = 0,
                 data_libraries: tuple = (), held: dict | None = None, streamed: bool = False,
                 panel_bytes: int | None = None) -> dict:
    """The peak of fitting a span reducer (reducers/__init__.py ``fit_reducer``; with ``evaluate`` and
    ``holdout_rows`` what ``globscope fit`` does around it, stages/fit.py).

    ``evaluate``: ``{"model": bytes of one model, "data": bytes of the data set while it loads, "eval": bytes of
    the evaluation subset, "activations": bytes of one evaluation forward}`` when the fitted reducer is scored
    (reconstruction, decoded losses, structure) and, with ``holdout_rows`` > 0, first fitted on that many rows
    and scored on the rest; ``data_libraries``: what loading the data set imports (the scorer does it first).
    ``held``: the part already resident (resources.held_now(), the default). ``streamed``: the basis is streamed
    from the checkpoints (``basis_plan``), V is never held; ``panel_bytes``: the Gram panel (``basis_plan``).
    Returns ``{part: bytes}`` of the largest phase, ``held now`` and the libraries included."""

    N, P = n_checkpoints, n_params
    work = min(N, work_rows(P)) * P * F32  # metrics and held-out blocks: float64 differences ~6-10x

    def fitting(n):  # the basis passes, then the kind on the coordinates (V, mean and scale kept)
        kn = basis_rank(n, max_rank)
        fitted = basis_held(P, n, max_rank, floor, streamed)
        coords = {f"{kind} on the coordinates [N, k], [N, N]": KIND_PAIR_BYTES.get(kind, 0) * n * n + 3 * n * kn * F64}
        return basis_phases(P, n, block_rows, max_rank, floor, streamed, panel_bytes) + [{**fitted, **coords}], fitted

    phases, fitted = fitting(N)
    ev = evaluate or {}
    scored = bool(evaluate and holdout_rows)
    scorer = {"held-out scorer: model and data": ev.get("model", 0) + ev.get("eval", 0)} if scored else {}
    if evaluate and streamed:  # the metrics decode a group of checkpoints per pass over the study
        fitted = {**fitted, "checkpoints decoded per pass": decode_rows(P, N) * P * F32}
    if evaluate:  # one decoding for reconstruction and the decoded losses (metrics.py): its own model and data
        # the data set loaded again; with the scorer's copy held, only the part that loading adds on top
        reload = max(0, ev.get("data", 0) - (ev.get("eval", 0) if scored else 0))
        model = {"model for the decoded losses": ev.get("model", 0)}
        phases.append({**fitted, **libraries(*data_libraries), **model, "data set while it loads": reload})
        phases.append({**fitted, **libraries(*data_libraries), **model, "evaluation subset": ev.get("eval", 0),
                       "metrics blocks (float64)": 6 * work,  # numpy reuses the temporaries of d**2
                       "evaluation activations": ev.get("activations", 0)})
    if scored:  # the held-out scorer (a model, its data) lives through the whole stage
        held_phases, held_fit = fitting(max(1, N - holdout_rows))
        held_fit = {f"held-out {k}": v for k, v in held_fit.items()}
        held_blocks = 10 * min(holdout_rows, work_rows(P)) * P * F32  # the held-out rows' blocks, scored
        if streamed:  # a group of held-out rows and their decoded copies per pass over the study (holdout.py)
            held_fit["held-out rows and decoded copies per pass"] = 2 * held_out_group(P, holdout_rows) * P * F32
        held_phases.append({**held_fit, "held-out blocks (float64)": held_blocks})
        phases = [{**scorer, **p} for p in phases + held_phases]
    if evaluate:  # last, the structure metrics: scikit-learn and scipy on [N, N] distances
        phases.append({**scorer, **fitted, **libraries("scipy", "sklearn", *KIND_LIBRARIES.get(kind, ())),
                       "structure metrics [N, N]": 4 * N * N * F64})
    # the kind's libraries and torch's autograd come with the first fit, after the scorer has loaded its data
    late = {**libraries(*KIND_LIBRARIES.get(kind, ()), *(data_libraries if scored else ())),
            **({"autograd runtime": KIND_RUNTIME[kind]} if kind in KIND_RUNTIME else {})}
    phases = [{**late, **p} for p in phases]
    if scored:
        phases.append({"data set while it loads": ev.get("data", 0), "held-out scorer: model": ev.get("model", 0),
                       "evaluation activations": ev.get("activations", 0)})
    return {**(held if held is not None else held_now()), **largest(*phases)}
