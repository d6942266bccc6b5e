"""Subcommands of the foundation: train, import, info (torch is imported only by the commands that use it)."""
from __future__ import annotations

from .args import (
    csv_of,
    device,
    existing_file,
    new_or_dir,
    nonnegative_float,
    nonnegative_int,
    one_of,
    positive_float,
    positive_int,
    study_dir,
)


def add_dataset_args(p, required=True):
    p.add_argument("--dataset", required=required, help="digits, mnist-5k (built in), mnist, cifar10, cifar100 (local files), or module:callable")
    p.add_argument("--data-dir", help="directory with the data files (MNIST IDX, CIFAR python batches)")
    p.add_argument("--data-seed", type=nonnegative_int, default=0, help="seed of the digits train/test split")


def add_model_args(p, required=True):
    p.add_argument("--model", required=required, help="registered model name or module:callable")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="constructor argument, JSON value (e.g. widths=[512,512]); repeatable")


def register(sub):
    p = sub.add_parser("train", help="train several runs and store their trajectories")
    add_dataset_args(p)
    add_model_args(p)
    p.add_argument("--out", required=True, type=new_or_dir, help="study directory")
    p.add_argument("--runs", type=positive_int, default=6, help="runs in the ensemble")
    # defaults None: a --resume takes the stored plan's value for what is not given (train.DEFAULTS otherwise)
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs per run (default: 40)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="minibatch size (default: 64)")
    p.add_argument("--optimizer", type=csv_of(one_of("sgd", "adam", "adamw")), default=None,
                   help="comma list, cycled over runs (sgd, adam, adamw) (default: sgd)")
    p.add_argument("--lr", type=csv_of(positive_float), default=None, help="comma list, cycled over runs "
                   "(default: 0.05)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=None, help="weight decay (default: 0)")
    p.add_argument("--every", type=positive_int, help="checkpoint every k steps (default: every epoch)")
    p.add_argument("--seed", type=nonnegative_int, default=None, help="seed of run 0; run i uses seed+i (default: 0)")
    p.add_argument("--eval-samples", type=positive_int, default=None,
                   help="samples for train/test loss at checkpoints (default: 10000)")
    p.add_argument("--label", default="", help="free label stored with each run")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--resume", action="store_true", help="continue the study's stored plan: train only its missing "
                   "runs (options not given are the plan's; others must agree with it)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("import", help="add existing checkpoints (state_dict or safetensors) as one run")
    p.add_argument("study", type=new_or_dir, help="study directory (created when it does not exist)")
    p.add_argument("files", nargs="+", type=existing_file("checkpoint file"),
                   help="checkpoint files in trajectory order")
    add_dataset_args(p, required=False)
    add_model_args(p, required=False)
    p.add_argument("--steps", type=csv_of(nonnegative_int), help="comma list of steps, one per file (default 0,1,2,...)")
    p.add_argument("--label", default="imported", help="label stored with the run")
    p.add_argument("--eval-samples", type=positive_int, default=10000, help="samples for train/test loss")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("info", help="print what a study holds")
    p.add_argument("study", type=study_dir, help="study directory")
    p.set_defaults(func=cmd_info)


def _dataset_spec(args):
    from ..networks import datasets  # imports torch: only for the commands that need it

    return datasets.make_spec(args.dataset, args.data_dir, args.data_seed)


def cmd_train(args):
    from ..networks.models import parse_kwargs
    from ..stages.train import final_summary, train_study

    study = train_study(args.out, _dataset_spec(args), args.model, parse_kwargs(args.model_arg), runs=args.runs,
                        epochs=args.epochs, batch_size=args.batch_size, optimizers=args.optimizer, lrs=args.lr,
                        every=args.every, seed=args.seed, eval_samples=args.eval_samples,
                        weight_decay=args.weight_decay, device=args.device, resume=args.resume, label=args.label)
    print(f"{study.h5_path}: {len(study.runs)} runs, {study.n_checkpoints} checkpoints, {study.n_params} parameters")
    for d in final_summary(study):
        print(f"  run {d['run']}: step {d['step']}, train loss {d['train_loss']:.4f}, test acc {d['test_acc']:.3f}")


def cmd_import(args):
    from ..networks.models import parse_kwargs
    from ..stages.import_ import import_checkpoints

    dataset = _dataset_spec(args) if args.dataset else None
    study = import_checkpoints(args.study, args.files, args.model, parse_kwargs(args.model_arg), dataset,
                               steps=args.steps, label=args.label, eval_samples=args.eval_samples, device=args.device)
    print(f"{study.h5_path}: run {len(study.runs) - 1} added with {len(args.files)} checkpoints")


def cmd_info(args):
    from ..storage.study import Study, final_summary  # not ..train: `info` starts without importing torch

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
