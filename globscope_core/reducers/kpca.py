"""Kernel PCA baseline: scikit-learn's KernelPCA (RBF kernel) with its learned inverse
(``fit_inverse_transform=True``: kernel ridge regression from the latent points back to the inputs).

It runs on the span-basis coordinates, divided by the root median pairwise distance so that the
kernel width ``gamma`` (default 1) means the same on any study. The fitted estimator is not saved:
its arrays are (training inputs, centring statistics, scaled eigenvectors, latent training points,
dual coefficients), and transform / inverse_transform are the same formulas as scikit-learn's,
re-implemented here on those arrays (torch for decoding, so landscapes can decode on the GPU).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.distance import pdist

from ..errors import GlobScopeError
from .base import SpanReducer, register_reducer


def _rbf(A, B, gamma):
    d2 = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * A @ B.T
    return np.exp(-gamma * np.maximum(d2, 0.0))


@register_reducer("kpca")
class KernelPCAReducer(SpanReducer):
    min_checkpoints = 4

    def _fit_coords(self, C, progress=False):
        from sklearn.decomposition import KernelPCA

        gamma = float(self.config.get("gamma", 1.0))
        alpha = float(self.config.get("alpha", 1.0))  # scikit-learn's default
        self.unit_ = float(np.sqrt(np.median(pdist(C, "sqeuclidean"))))
        if not self.unit_ > 0:
            raise GlobScopeError("kpca: the checkpoints are (almost) all identical; nothing to reduce")
        Xn = C / self.unit_
        kp = KernelPCA(n_components=self.dim, kernel="rbf", gamma=gamma, fit_inverse_transform=True,
                       alpha=alpha, eigen_solver="dense", random_state=int(self.config.get("seed", 0)))
        kp.fit(Xn)
        nz = kp.eigenvalues_ > 0
        scaled = np.zeros_like(kp.eigenvectors_)
        scaled[:, nz] = kp.eigenvectors_[:, nz] / np.sqrt(kp.eigenvalues_[nz])
        self.gamma_ = gamma
        self.X_fit_ = Xn
        self.k_rows_ = kp._centerer.K_fit_rows_
        self.k_all_ = float(kp._centerer.K_fit_all_)
        self.alphas_ = scaled
        self.Z_fit_ = kp.X_transformed_fit_
        self.dual_ = kp.dual_coef_

    def _encode(self, C):
        K = _rbf(np.asarray(C, dtype=np.float64) / self.unit_, self.X_fit_, self.gamma_)
        K = K - self.k_rows_[None, :] - K.mean(1, keepdims=True) + self.k_all_  # KernelCenterer
        Z = np.zeros((len(K), self.dim))
        Z[:, : self.alphas_.shape[1]] = K @ self.alphas_
        return Z

    def _decode_torch(self, z):
        dev = z.device
        Zf = torch.as_tensor(self.Z_fit_, dtype=torch.float64, device=dev)
        dual = torch.as_tensor(self.dual_, dtype=torch.float64, device=dev)
        z = z.to(torch.float64)[:, : Zf.shape[1]]
        K = torch.exp(-self.gamma_ * torch.cdist(z, Zf).square())
        return (K @ dual * self.unit_).to(torch.float32)

    def _state(self):
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
        return {"kpca_X_fit": t(self.X_fit_), "kpca_k_rows": t(self.k_rows_), "kpca_alphas": t(self.alphas_),
                "kpca_Z_fit": t(self.Z_fit_), "kpca_dual": t(self.dual_),
                "kpca_scalars": t([self.gamma_, self.k_all_, self.unit_])}

    def _load_state(self, s):
        self.X_fit_, self.k_rows_ = s["kpca_X_fit"].numpy(), s["kpca_k_rows"].numpy()
        self.alphas_, self.Z_fit_, self.dual_ = s["kpca_alphas"].numpy(), s["kpca_Z_fit"].numpy(), s["kpca_dual"].numpy()
        self.gamma_, self.k_all_, self.unit_ = (float(v) for v in s["kpca_scalars"].numpy())
