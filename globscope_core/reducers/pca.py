"""PCA baseline (exact, in memory). A placeholder to be made streaming by the reducer issue."""
from __future__ import annotations

import numpy as np
import torch

from .base import Reducer, register_reducer


@register_reducer("pca")
class PCAReducer(Reducer):
    def fit(self, X):
        X = np.asarray(X.read_params() if hasattr(X, "read_params") else X, dtype=np.float64)
        self.mean_ = X.mean(0)
        _, _, vt = np.linalg.svd(X - self.mean_, full_matrices=False)
        self.components_ = vt[: self.dim]
        return self

    def transform(self, X):
        return (np.asarray(X, dtype=np.float64) - self.mean_) @ self.components_.T

    def inverse_transform_torch(self, z):
        c = torch.as_tensor(self.components_, dtype=torch.float32, device=z.device)
        m = torch.as_tensor(self.mean_, dtype=torch.float32, device=z.device)
        return z.to(torch.float32) @ c + m

    def state(self):
        return {"mean": torch.as_tensor(self.mean_), "components": torch.as_tensor(self.components_)}

    def load_state(self, state):
        self.mean_ = state["mean"].numpy()
        self.components_ = state["components"].numpy()
