"""Losses along paths in weight space: rows of a study evaluated together, straight lines, barriers."""
from __future__ import annotations

import numpy as np
import torch

from .many_models import evaluate_flat


def evaluate_rows(study, rows, x, y, device, bn_x=None) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy of each flat row [m, P] of ``study``'s model on (x, y), many models per forward pass
    (``bn_x``: each row's BatchNorm statistics recomputed on these inputs first)."""
    return evaluate_flat(study, torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)), x, y, device=device,
                         bn_x=bn_x)


def interpolation_curve(study, a: np.ndarray, b: np.ndarray, alphas: np.ndarray, x, y, device="cpu",
                        bn_x=None) -> np.ndarray:
    """Loss along (1 - alpha) a + alpha b of the whole flat state. BatchNorm running statistics are interpolated
    too (the models' own statistics), unless ``bn_x`` is given: then every point's statistics are recomputed on
    it (a REPAIR-style reset; Jordan et al. 2023: most of a raw BatchNorm barrier is the variance collapse)."""
    path = (1.0 - alphas[:, None]) * a[None].astype(np.float64) + alphas[:, None] * b[None].astype(np.float64)
    return evaluate_rows(study, path.astype(np.float32), x, y, device, bn_x)[0].astype(np.float64)


def barrier(values, t) -> tuple[float, float]:
    """Entezari et al.: (max_t v(t) - ((1-t) v(0) + t v(1)), the t where it is reached)."""
    v, t = np.asarray(values, dtype=np.float64), np.asarray(t, dtype=np.float64)
    rise = v - ((1 - t) * v[0] + t * v[-1])
    k = int(np.argmax(rise))
    return float(rise[k]), float(t[k])
