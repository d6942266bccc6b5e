"""GlobScope from Python: the pipeline of `globscope demo`, small (digits, 2 runs, 3 epochs).

Run it with the project's environment:  .venv/bin/python docs/api_example.py [STUDY_DIR]
It takes well under a minute on 2 CPU cores. The same example is in the README ("Python API").
"""
import sys
import tempfile

import numpy as np

from globscope_core.networks.datasets import make_spec
from globscope_core.reducers import fit_reducer, load_reducer
from globscope_core.stages.landscape import compute_landscape
from globscope_core.stages.topology import study_topology
from globscope_core.stages.train import train_study
from globscope_core.storage.study import Study
from globscope_core.storage.vtk_files import read_vti

out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="globscope-")

# 1. train: two small MLPs on scikit-learn's digits -> out/study.h5
study = train_study(out, make_spec("digits"), "mlp", {"widths": [32]}, runs=2, epochs=3, progress=False)
print(study.n_checkpoints, "checkpoints of", study.n_params, "parameters in", len(study.runs), "runs")

# 2. fit a 2D autoencoder -> out/reducers/ae-2d.pt (fewer epochs than the default 1500: a quick look)
fit_reducer(study, "ae", 2, epochs=200, device="cpu")
reducer = load_reducer(study, "ae-2d")
z = reducer.transform(study.read_params([0, study.n_checkpoints - 1]))  # latent coordinates of two checkpoints
print("first and last checkpoint in latent space:", np.round(z, 3).tolist())

# 3. the loss on a 17x17 latent grid -> out/landscape-2d.vti, out/trajectories-2d.vtp
summary = compute_landscape(study, "ae-2d", resolution=17, eval_samples=256, device="cpu", progress=False)
print(f"loss {summary['loss_min']:.3f} .. {summary['loss_max']:.3f}, "
      f"trusted fraction {summary['trusted_fraction']:.2f}")

# 4. merge tree and basins of the trusted part -> out/topology-2d/, report.json section "basins-2d"
basins = study_topology(out, dim=2, verbose=False)
for b in basins["runs"]:
    print(f"run {b['run']}: basin minimum loss {b['basin_minimum_loss']:.3f}")

# 5. read the results back
field = read_vti(f"{out}/landscape-2d.vti")
loss = field.grid("loss")              # (nz, ny, nx) = (1, 17, 17)
trusted = field.grid("trusted") > 0.5  # inside the hull of the encoded checkpoints (or one cell from it)
print("lowest trusted grid loss:", float(np.nanmin(loss[trusted])))
print("report sections:", sorted(Study.open(out).read_report()))
print("study directory:", out)
