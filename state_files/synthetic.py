"""A synthetic study in the landscape/trajectory layout, for building state files and testing renders.

Run with our venv's Python (it writes through globscope_core.vtkio): a few Gaussian wells as ``loss`` on
2D and 3D grids, and runs descending into them as trajectories. ``seed`` moves the wells, so two
synthetic studies render differently. Topology files are added by the caller (globscope_core.topology_io)
when that module is there.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from globscope_core.vtkio import ImageField, write_vti, write_vtp  # noqa: E402


def _wells(rng, dim, k=4):
    centres = rng.uniform(-0.6, 0.6, size=(k, dim))
    depths = rng.uniform(0.8, 2.0, size=k)
    widths = rng.uniform(0.15, 0.35, size=k)
    return centres, depths, widths


def _loss(x, wells):
    c, d, w = wells
    r2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    return 2.5 + 0.6 * (x ** 2).sum(-1) - (d * np.exp(-r2 / (2 * w ** 2))).sum(-1)


def write_synthetic_study(out: str, seed: int = 0, res2: int = 65, res3: int = 25, runs: int = 4,
                          topology: bool = True) -> str:
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    for dim, res in ((2, res2), (3, res3)):
        wells = _wells(rng, dim)
        dims = (res, res, res if dim == 3 else 1)
        spacing = (2.0 / (res - 1),) * dim + ((1.0,) if dim == 2 else ())
        f = ImageField(dims, (-1.0, -1.0, -1.0 if dim == 3 else 0.0), spacing, active_scalars="loss",
                       field_data={"study": out, "reducer": f"synthetic-{dim}d", "split": "test", "eval_samples": 0})
        pts = f.point_coordinates()[:, :dim]
        loss = _loss(pts, wells)
        f.point_arrays = {"loss": loss.astype(np.float32), "accuracy": np.exp(-loss).astype(np.float32),
                          "trust": np.ones(len(loss), np.float32)}
        write_vti(os.path.join(out, f"landscape-{dim}d.vti"), f)
        # runs: gradient descent on the field from random starts
        points, lines, verts, run_a, step_a, loss_a = [], [], [], [], [], []
        for r in range(runs):
            x = rng.uniform(-0.9, 0.9, size=dim)
            line = []
            for s in range(30):
                g = np.zeros(dim)
                for i in range(dim):
                    e = np.zeros(dim); e[i] = 1e-3
                    g[i] = (_loss((x + e)[None], wells)[0] - _loss((x - e)[None], wells)[0]) / 2e-3
                line.append(len(points))
                points.append(np.r_[x, np.zeros(3 - dim)])
                run_a.append(r); step_a.append(s * 10); loss_a.append(_loss(x[None], wells)[0])
                x = np.clip(x - 0.02 * g, -1, 1)
            lines.append(line)
            verts.append([line[-1]])
        write_vtp(os.path.join(out, f"trajectories-{dim}d.vtp"), np.array(points), lines=lines, verts=verts,
                  point_arrays={"run": np.array(run_a, np.int32), "step": np.array(step_a, np.int32),
                                "loss": np.array(loss_a, np.float32), "loss_decoded": np.array(loss_a, np.float32)})
    open(os.path.join(out, "study.h5"), "ab").close()  # the reader opens STUDY/study.h5
    if topology:
        from globscope_core.topology_io import study_topology

        for dim in (2, 3):
            study_topology(out, dim, verbose=False)
    return out


if __name__ == "__main__":
    write_synthetic_study(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
