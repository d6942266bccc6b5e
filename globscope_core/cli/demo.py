"""``globscope demo``: the whole pipeline on scikit-learn's digits, in a few minutes on 2 CPU cores.

train (6 MLPs) -> fit autoencoders (2D, 3D) -> landscapes (65^2, 33^3) -> merge trees and basins -> renders.
Every stage is resumable: rerunning the demo reuses what is already there.
"""
from __future__ import annotations

import os
import time

from .args import at_least, device, new_or_dir, positive_int


def register(sub):
    p = sub.add_parser("demo", help="run the whole pipeline on the built-in digits data")
    p.add_argument("--out", type=new_or_dir, default="demo-study", help="study directory (default: ./demo-study)")
    p.add_argument("--runs", type=positive_int, default=6, help="MLPs trained")
    p.add_argument("--epochs", type=positive_int, default=40, help="epochs per run")
    p.add_argument("--resolution-2d", type=at_least(2), default=65, help="2D landscape: grid points per axis")
    p.add_argument("--resolution-3d", type=at_least(2), default=33, help="3D landscape: grid points per axis")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_demo)


def _stage(name):
    print(f"\n== {name}", flush=True)
    return time.time()


def cmd_demo(args):
    from ..networks import datasets
    from ..reducers import fit_reducer
    from ..stages.landscape import compute_landscape
    from ..stages.render import render_study
    from ..stages.topology import format_basins, study_topology
    from ..stages.train import train_study
    from ..storage.study import final_summary
    from ..storage.study_files import STUDY_H5, reducer_file, renders_dir

    t_all = time.time()
    out = args.out
    t = _stage(f"train {args.runs} MLPs on digits -> {os.path.join(out, STUDY_H5)}")
    study = train_study(out, datasets.make_spec("digits"), "mlp", {}, runs=args.runs, epochs=args.epochs,
                        device=args.device, resume=True)
    for d in final_summary(study):
        print(f"  run {d['run']}: train loss {d['train_loss']:.4f}, test acc {d['test_acc']:.3f}")
    print(f"  {study.n_checkpoints} checkpoints of {study.n_params} parameters ({time.time() - t:.0f} s)")

    for dim, res in ((2, args.resolution_2d), (3, args.resolution_3d)):
        name = f"ae-{dim}d"
        t = _stage(f"fit the autoencoder {name}")
        if os.path.exists(reducer_file(study.dir, name)):
            print(f"  {name} already fitted (delete {reducer_file(study.dir, name)} to refit)")
        else:
            fit_reducer(study, "ae", dim, device=args.device, progress=True)
            fit = study.read_report().get(f"fit-{name}", {})
            if fit:
                print("  " + ", ".join(f"{k} {v:.3g}" for k, v in fit.items() if isinstance(v, (int, float))))
        print(f"  ({time.time() - t:.0f} s)")

        t = _stage(f"landscape {dim}D at resolution {res}")
        compute_landscape(study, name, res, device=args.device, progress=True)
        print(f"  ({time.time() - t:.0f} s)")

        t = _stage(f"merge tree and basins {dim}D")
        section = study_topology(study.dir, dim=dim, verbose=False)
        print(format_basins(section, dim))
        print(f"  ({time.time() - t:.0f} s)")

    t = _stage("renders")
    rendered = render_study(study.dir, renders_dir(study.dir))
    print(f"  {rendered['renderer']}: {len(rendered['images'])} images ({time.time() - t:.0f} s)")

    print(f"\n== done in {time.time() - t_all:.0f} s; wrote:")
    for root, _, files in sorted(os.walk(study.dir)):
        for f in sorted(files):
            if not f.startswith("."):
                p = os.path.join(root, f)
                print(f"  {os.path.relpath(p)}  ({os.path.getsize(p) / 1024:.0f} KiB)")
    print(f"\nLook at: {', '.join(os.path.relpath(p) for p in rendered['images'].values())}")
    print(f"Open in ParaView: globscope paraview {out}")
