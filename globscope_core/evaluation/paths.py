"""Losses along paths in weight space: rows of a study evaluated together, straight lines, barriers."""
from __future__ import annotations

import numpy as np
import torch

from .many_models import evaluate_flat


def evaluate_rows(study, rows, x, y, device) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy of each flat row [m, P] of ``study``'s model on (x, y), many models per forward pass."""
    return evaluate_flat(study, torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)), x, y, device=device)


def interpolation_curve(study, a: np.ndarray, b: np.ndarray, alphas: np.ndarray, x, y, device="cpu") -> np.ndarray:
    """Loss along (1 - alpha) a + alpha b (the whole flat state; BatchNorm running statistics are
    interpolated too, which is not what a recomputed BN would give: REPAIR-style resets are not done)."""
    path = (1.0 - alphas[:, None]) * a[None].astype(np.float64) + alphas[:, None] * b[None].astype(np.float64)
    return evaluate_rows(study, path.astype(np.float32), x, y, device)[0].astype(np.float64)


def barrier(values, t) -> tuple[float, float]:
    """Entezari et al.: (max_t v(t) - ((1-t) v(0) + t v(1)), the t where it is reached)."""
    v, t = np.asarray(values, dtype=np.float64), np.asarray(t, dtype=np.float64)
    rise = v - ((1 - t) * v[0] + t * v[-1])
    k = int(np.argmax(rise))
    return float(rise[k]), float(t[k])
