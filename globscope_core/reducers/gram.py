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


def rows_for(n_bytes: int, n_params: int, at_most: int, itemsize: int = 4) -> int:
    return int(max(1, min(at_most, n_bytes // max(1, itemsize * n_params))))


def gram64(A64: np.ndarray, B: np.ndarray, buf: np.ndarray | None = None) -> np.ndarray:
    """A64 @ B.T in float64 for float64 rows A64 and float32 rows B, converting B into ``buf`` (reused
    across calls: a fresh float64 array per block costs more in page faults than the product)."""
    if buf is None or buf.shape[0] < len(B) or buf.shape[1] != B.shape[1]:
        buf = np.empty(B.shape, np.float64)
    Bd = buf[: len(B)]
    Bd[...] = B
    return A64 @ Bd.T


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
    panel_rows = rows_for(panel_bytes, P, N, itemsize=8)
    block_rows = rows_for(block_bytes, P, N)
    G = np.zeros((N, N))
    buf = np.empty((min(block_rows, N), P))
    panel = np.empty((panel_rows, P))  # reused: fresh pages for every panel cost more than the copy
    starts = list(range(0, N, panel_rows))
    bar = tqdm(total=sum(N - s for s in starts), desc=desc, unit="row", disable=not progress)
    for s0 in starts:
        rows_i = np.arange(s0, min(N, s0 + panel_rows))
        Si = panel[: len(rows_i)]
        for idx, B in src.iter_params(block_rows, rows_i):
            Si[idx - s0] = transform(B)
        end = s0 + len(rows_i)
        # the panel with itself, then every later row streamed past it
        G[np.ix_(rows_i, rows_i)] = Si @ Si.T
        bar.update(len(rows_i))
        for idx, B in src.iter_params(block_rows, np.arange(end, N)):
            g = gram64(Si, transform(B), buf)
            G[np.ix_(rows_i, idx)] = g
            G[np.ix_(idx, rows_i)] = g.T
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
        for idx, B in src.iter_params(block_rows, rows):
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
