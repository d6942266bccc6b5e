"""The landscape's last step alone on a finished study: decode every checkpoint's latent point, evaluate it and
its stored original on the landscape's evaluation subset, write ``trajectories-2d.vtp`` (bench_lm.py; measured
after the trajectories' fix without recomputing the 289 grid points).

    /usr/bin/time -v .venv/bin/python bench/lm_trajectories.py STUDY [--eval-samples 2] [--chunk-points 12]
"""
from __future__ import annotations

import argparse
import time

from globscope_core.evaluation.many_models import BatchedEvaluator, eval_data
from globscope_core.reducers import load_reducer
from globscope_core.stages.landscape import encode_checkpoints, write_trajectories
from globscope_core.storage.study import Study

ap = argparse.ArgumentParser()
ap.add_argument("study")
ap.add_argument("--reducer", default="ae-2d")
ap.add_argument("--eval-samples", type=int, default=2)
ap.add_argument("--chunk-points", type=int, default=12)
a = ap.parse_args()
t = time.time()
study = Study.open(a.study)
reducer = load_reducer(study, a.reducer)
x, y = eval_data(study, "test", a.eval_samples, seed=0)
ev = BatchedEvaluator(study.model_spec, x, y, device="cpu", layout=study.layout)
path = write_trajectories(study, reducer, encode_checkpoints(study, reducer), ev, "test", chunk_points=a.chunk_points)
print(f"{path} in {time.time() - t:.1f} s")
