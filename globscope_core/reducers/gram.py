"""Streaming products over the checkpoint matrix, for studies that do not fit in memory.

The study stores whole rows per HDF5 chunk, so every pass reads rows. The Gram matrix G = S S^T of
N rows needs every pair of rows: a *panel* of rows is held (in float64: small eigenvalues matter)
while the rows after it stream past in blocks, so the study is read about N / panel_rows
times and every product is a fat matrix product, not a row at a time. Panels and stream blocks are
sized in bytes, not rows, which keeps the memory flat whatever the model size (a 5e6-parameter row
is 19 MB). On a GPU the panel lives in GPU memory and can be much larger, so the study is read a few
times instead of N / panel_rows (the host then holds only the stream block).
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

PANEL_BYTES = 1 << 30  # rows held (float64) while the others stream past
BLOCK_BYTES = 128 << 20  # rows streamed at a time (float32, plus a float64 copy); 512 MiB: +2 GB peak, -14% time
GPU_PANEL_FRACTION = 0.5  # of the GPU's free memory, for the panel on a GPU (capped at the whole matrix)
# G is computed in tiles of rows at fixed row boundaries, each by the same product of the same rows, so it is the
# same to the last bit whatever the panel and block sizes (the memory there): the fitted coordinates, and an
# autoencoder trained on them (whose training amplifies a 1e-13 change of G to 1% of its latent points), do not
# depend on the memory a fit had. A tile is at most TILE rows and TILE_BYTES (float64): one row of a large model.
TILE, TILE_BYTES = 16, 256 << 20


def tile_rows(n_params: int) -> int:
    return int(max(1, min(TILE, TILE_BYTES // (8 * max(1, n_params)))))


def rows_for(n_bytes: int, n_params: int, at_most: int, itemsize: int = 4) -> int:
    return int(max(1, min(at_most, n_bytes // max(1, itemsize * n_params))))


def tiled_rows(n_bytes: int, n_params: int, at_most: int, itemsize: int = 4) -> int:
    """``rows_for`` rounded down to whole tiles (at least one tile, or every row when there are fewer)."""
    rows, t = rows_for(n_bytes, n_params, at_most, itemsize), tile_rows(n_params)
    return rows if rows >= at_most else max(t, rows - rows % t)


def _self_product(a: np.ndarray, cols: int = 1 << 16) -> np.ndarray:
    """a @ a.T for a diagonal tile, in column slices with a copy of each: numpy computes ``a @ a.T`` of one array
    with syrk (another order of the sums than the gemm of an off-diagonal tile), and a copy of the whole tile would
    be up to TILE_BYTES more (a whole row of a large model)."""
    g = np.zeros((len(a), len(a)))
    for c in range(0, a.shape[1], cols):
        g += a[:, c : c + cols] @ a[:, c : c + cols].copy().T
    return 0.5 * (g + g.T)  # exactly symmetric


def _tiles(A64: np.ndarray, first_a: int, B64: np.ndarray, first_b: int, G: np.ndarray) -> None:
    """G[a, b] for the rows of A64 (rows first_a...) against those of B64 (first_b...), tile pair by tile pair:
    the upper tile of each pair is always the left operand, so every entry comes from the same product."""
    t = tile_rows(A64.shape[1])
    for ta in range(0, len(A64), t):
        a = A64[ta : ta + t]
        ga = first_a + ta
        for tb in range(0, len(B64), t):
            gb = first_b + tb
            if gb < ga:  # the mirror of a pair computed (or to be computed) the other way round
                continue
            b = B64[tb : tb + t]
            g = _self_product(a) if gb == ga else a @ b.T
            G[ga : ga + len(a), gb : gb + len(g.T)] = g
            G[gb : gb + len(g.T), ga : ga + len(a)] = g.T


def gram_matrix(src, transform, panel_bytes: int | None = None, block_bytes: int = BLOCK_BYTES,
                progress: bool = False, desc: str = "Gram", device=None) -> np.ndarray:
    """G[i, j] = <transform(x_i), transform(x_j)> in float64 for all rows of ``src`` (a Study or
    anything with ``iter_params(block_rows, rows)``, ``n_checkpoints``, ``n_params``).

    ``device``: a CUDA torch.device runs the products on that GPU (see ``_gram_cuda``). ``panel_bytes``
    None: PANEL_BYTES on the host, GPU_PANEL_FRACTION of the free memory on a GPU."""
    if device is not None and getattr(device, "type", None) == "cuda":
        return _gram_cuda(src, transform, device, panel_bytes, block_bytes, progress, desc)
    N, P = src.n_checkpoints, src.n_params
    panel_bytes = panel_bytes or PANEL_BYTES
    panel_rows = tiled_rows(panel_bytes, P, N, itemsize=8)  # whole tiles: the tiles start at fixed rows
    block_rows = tiled_rows(block_bytes, P, N)
    G = np.zeros((N, N))
    buf = np.empty((min(block_rows, N), P))
    panel = np.empty((panel_rows, P))  # reused: fresh pages for every panel cost more than the copy
    starts = list(range(0, N, panel_rows))
    bar = tqdm(total=sum(N - s for s in starts), desc=desc, unit="row", disable=not progress)
    for s0 in starts:
        rows_i = np.arange(s0, min(N, s0 + panel_rows))
        Si = panel[: len(rows_i)]
        for idx, B in src.iter_params(block_rows, rows_i, reuse=True):
            Si[idx - s0] = transform(B)
        end = s0 + len(rows_i)
        # the panel with itself, then every later row streamed past it (rows arrive in order: idx is a range)
        _tiles(Si, s0, Si, s0, G)
        bar.update(len(rows_i))
        for idx, B in src.iter_params(block_rows, np.arange(end, N), reuse=True):
            Bd = buf[: len(B)]
            Bd[...] = transform(B)
            _tiles(Si, s0, Bd, int(idx[0]), G)
            bar.update(len(idx))
    bar.close()
    return G


def _gram_cuda(src, transform, device, panel_bytes, block_bytes, progress, desc) -> np.ndarray:
    """The Gram pass with the panel and G in GPU memory (float64): as many panel rows as half the free
    GPU memory holds, so a 4.7e6-parameter study of 505 rows is read ~2 times instead of ~18."""
    import torch

    N, P = src.n_checkpoints, src.n_params
    block_rows = rows_for(block_bytes, P, N)
    if panel_bytes is None:
        free, _ = torch.cuda.mem_get_info(device)
        panel_bytes = int(GPU_PANEL_FRACTION * free) - 2 * block_rows * P * 8
    panel_rows = rows_for(panel_bytes, P, N, itemsize=8)
    G = torch.zeros((N, N), dtype=torch.float64, device=device)
    panel = torch.empty((panel_rows, P), dtype=torch.float64, device=device)

    def blocks(rows):
        for idx, B in src.iter_params(block_rows, rows, reuse=True):
            yield idx, torch.from_numpy(np.ascontiguousarray(transform(B))).to(device, torch.float64)

    starts = list(range(0, N, panel_rows))
    bar = tqdm(total=sum(N - s for s in starts), desc=desc, unit="row", disable=not progress)
    for s0 in starts:
        end = min(N, s0 + panel_rows)
        Si = panel[: end - s0]
        for idx, B in blocks(np.arange(s0, end)):
            Si[idx - s0] = B
        G[s0:end, s0:end] = Si @ Si.T
        bar.update(end - s0)
        for idx, B in blocks(np.arange(end, N)):
            g = Si @ B.T  # later rows are contiguous: idx is a range
            G[s0:end, idx[0] : idx[-1] + 1] = g
            G[idx[0] : idx[-1] + 1, s0:end] = g.T
            bar.update(len(idx))
    bar.close()
    return G.cpu().numpy()
