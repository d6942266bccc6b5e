"""`globscope info`: what a study holds (starts without importing torch)."""
from __future__ import annotations

from .args import study_dir


def register(sub):
    p = sub.add_parser("info", help="print what a study holds")
    p.add_argument("study", type=study_dir, help="study directory")
    p.set_defaults(func=cmd_info)


def cmd_info(args):
    from ..storage.study import Study, final_summary  # `info` starts without importing torch

    s = Study.open(args.study)
    print(f"study      {s.dir}")
    print(f"model      {s.model_spec['name']} {s.model_spec.get('kwargs', {})}")
    print(f"dataset    {s.dataset_spec}")
    print(f"parameters {s.n_params} (floating state, {len(s.layout.entries)} tensors)")
    labels = {lab: int((s.labels == lab).sum()) for lab in sorted(set(s.labels))}
    print(f"checkpoints {s.n_checkpoints} {labels}")
    print(f"runs       {len(s.runs)}")
    for d in final_summary(s):
        print(f"  run {d['run']:3d} seed {d['seed']} {d['optimizer']} lr {d['lr']}: last step {d['step']}, "
              f"train loss {d['train_loss']:.4f} acc {d['train_acc']:.3f}, test loss {d['test_loss']:.4f} "
              f"acc {d['test_acc']:.3f}")
    from ..storage.study import paths_store

    paths = paths_store(s)
    if paths is not None:
        print(f"paths      {len(paths.runs)} connect paths, {paths.n_checkpoints} points in {paths.h5_path} "
              "(not part of the ensemble)")
    report = s.read_report()
    if report:
        print(f"report.json sections: {', '.join(sorted(report))}")
