"""UMAP baseline (umap-learn), saved as plain arrays.

umap-learn's estimator cannot be saved without pickle, so the saved reducer keeps the training
embedding, the training inputs (span-basis coordinates) and UMAP's curve parameters (a, b), and
re-implements on them the first step of umap-learn's own ``transform`` / ``inverse_transform``:
  inverse_transform(z): the ``min(n_features, n_samples)`` nearest training embeddings, weighted by
    UMAP's membership 1 / (1 + a d^(2b)) normalised to sum 1, average their inputs (umap-learn
    starts from exactly this point and then refines it with SGD on the fuzzy graph; the refinement
    needs the fitted graph and is left out);
  transform(x): a training checkpoint maps to its own embedding; another point to the average
    embedding of its ``n_neighbors`` nearest training inputs, weighted by 1 / (1 + d^2 / d_1^2).
At fit time the reconstruction of umap-learn's full inverse_transform is measured too
(``fit_info["umap_learn_inverse_mse_std"]``) so the two can be compared.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import SpanReducer, register_reducer


@register_reducer("umap")
class UMAPReducer(SpanReducer):
    min_checkpoints = 5

    def _fit_coords(self, C, progress=False):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import umap

            N = len(C)
            self.n_neighbors_ = int(min(self.config.get("n_neighbors", 15), N - 1))
            um = umap.UMAP(n_components=self.dim, n_neighbors=self.n_neighbors_,
                           min_dist=float(self.config.get("min_dist", 0.1)),
                           random_state=int(self.config.get("seed", 0)), init="random" if N <= self.dim + 2 else "spectral",
                           verbose=False)
            self.fit_embedding_ = um.fit_transform(C).astype(np.float64)
            self.a_, self.b_ = float(um._a), float(um._b)
            self.X_fit_ = np.asarray(C, dtype=np.float64)
            self.fit_info = {}
            if self.config.get("check_inverse", True):
                rec = um.inverse_transform(self.fit_embedding_.astype(np.float32))
                P = self.basis.n_params
                self.fit_info["umap_learn_inverse_mse_std"] = float(((rec - C) ** 2).sum(1).mean() / P)

    def _encode(self, C):
        C = np.asarray(C, dtype=np.float64)
        X = self.X_fit_
        d2 = np.maximum((C * C).sum(1)[:, None] + (X * X).sum(1)[None] - 2 * C @ X.T, 0.0)
        k = min(self.n_neighbors_, d2.shape[1])
        idx = np.argsort(d2, 1)[:, :k]
        dk = np.take_along_axis(d2, idx, 1)
        scale = np.median(self._fit_nn2()) + 1e-300
        exact = dk[:, 0] <= 1e-4 * scale  # a training checkpoint (up to float32 rounding)
        w = 1.0 / (1.0 + dk / scale)
        w /= w.sum(1, keepdims=True)
        Z = (w[:, :, None] * self.fit_embedding_[idx]).sum(1)
        Z[exact] = self.fit_embedding_[idx[exact, 0]]
        return Z

    def _fit_nn2(self):
        # squared distance of each training input to its nearest other one: the scale of "near"
        if not hasattr(self, "_nn2"):
            G = self.X_fit_
            d2 = (G * G).sum(1)[:, None] + (G * G).sum(1)[None] - 2 * G @ G.T
            np.fill_diagonal(d2, np.inf)
            self._nn2 = np.maximum(d2.min(1), 0)
        return self._nn2

    def _decode_torch(self, z):
        dev = z.device
        E = torch.as_tensor(self.fit_embedding_, dtype=torch.float64, device=dev)
        X = torch.as_tensor(self.X_fit_, dtype=torch.float64, device=dev)
        m = min(X.shape[1], X.shape[0])
        d = torch.cdist(z.to(torch.float64), E)
        dk, idx = torch.topk(d, m, dim=1, largest=False)
        w = 1.0 / (1.0 + self.a_ * dk ** (2 * self.b_))
        w = w / w.sum(1, keepdim=True)
        W = torch.zeros((len(z), len(X)), dtype=torch.float64, device=dev).scatter_(1, idx, w)
        return (W @ X).to(torch.float32)

    def _state(self):
        return {"umap_embedding": torch.as_tensor(self.fit_embedding_), "umap_X_fit": torch.as_tensor(self.X_fit_),
                "umap_scalars": torch.tensor([self.a_, self.b_, float(self.n_neighbors_)], dtype=torch.float64)}

    def _load_state(self, s):
        self.fit_embedding_, self.X_fit_ = s["umap_embedding"].numpy(), s["umap_X_fit"].numpy()
        a, b, k = s["umap_scalars"].tolist()
        self.a_, self.b_, self.n_neighbors_ = a, b, int(k)
