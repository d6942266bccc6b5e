"""Subcommands of the foundation: train, import, info (torch is imported only by the commands that use it)."""
from __future__ import annotations

from ..errors import GlobScopeError


def _csv(kind):
    def parse(text):
        try:
            return [kind(v) for v in text.split(",") if v]
        except ValueError:
            raise GlobScopeError(f"cannot parse '{text}' as a comma-separated list") from None

    return parse


def add_dataset_args(p, required=True):
    p.add_argument("--dataset", required=required, help="digits, mnist-5k (built in), mnist, cifar10, cifar100 (local files), or module:callable")
    p.add_argument("--data-dir", help="directory with the data files (MNIST IDX, CIFAR python batches)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the digits train/test split")


def add_model_args(p, required=True):
    p.add_argument("--model", required=required, help="registered model name or module:callable")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="constructor argument, JSON value (e.g. widths=[512,512]); repeatable")


def register(sub):
    p = sub.add_parser("train", help="train several runs and store their trajectories")
    add_dataset_args(p)
    add_model_args(p)
    p.add_argument("--out", required=True, help="study directory")
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", type=_csv(str), default=["sgd"], help="comma list, cycled over runs (sgd, adam, adamw)")
    p.add_argument("--lr", type=_csv(float), default=[0.05], help="comma list, cycled over runs")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--every", type=int, help="checkpoint every k steps (default: every epoch)")
    p.add_argument("--seed", type=int, default=0, help="seed of run 0; run i uses seed+i")
    p.add_argument("--eval-samples", type=int, default=10000, help="samples for train/test loss at checkpoints")
    p.add_argument("--label", default="", help="free label stored with each run")
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue a study: train only the missing runs")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("import", help="add existing checkpoints (state_dict or safetensors) as one run")
    p.add_argument("study")
    p.add_argument("files", nargs="+", help="checkpoint files in trajectory order")
    add_dataset_args(p, required=False)
    add_model_args(p, required=False)
    p.add_argument("--steps", type=_csv(int), help="comma list of steps, one per file (default 0,1,2,...)")
    p.add_argument("--label", default="imported")
    p.add_argument("--eval-samples", type=int, default=10000)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("info", help="print what a study holds")
    p.add_argument("study")
    p.set_defaults(func=cmd_info)


def _dataset_spec(args):
    from .. import data as data_mod  # imports torch: only for the commands that need it

    return data_mod.make_spec(args.dataset, args.data_dir, args.data_seed)


def cmd_train(args):
    from ..models import parse_kwargs
    from ..train import final_summary, train_study

    study = train_study(args.out, _dataset_spec(args), args.model, parse_kwargs(args.model_arg), runs=args.runs,
                        epochs=args.epochs, batch_size=args.batch_size, optimizers=args.optimizer, lrs=args.lr,
                        every=args.every, seed=args.seed, eval_samples=args.eval_samples,
                        weight_decay=args.weight_decay, device=args.device, resume=args.resume, label=args.label)
    print(f"{study.h5_path}: {len(study.runs)} runs, {study.n_checkpoints} checkpoints, {study.n_params} parameters")
    for d in final_summary(study):
        print(f"  run {d['run']}: step {d['step']}, train loss {d['train_loss']:.4f}, test acc {d['test_acc']:.3f}")


def cmd_import(args):
    from ..importer import import_checkpoints
    from ..models import parse_kwargs

    dataset = _dataset_spec(args) if args.dataset else None
    study = import_checkpoints(args.study, args.files, args.model, parse_kwargs(args.model_arg), dataset,
                               steps=args.steps, label=args.label, eval_samples=args.eval_samples, device=args.device)
    print(f"{study.h5_path}: run {len(study.runs) - 1} added with {len(args.files)} checkpoints")


def cmd_info(args):
    from ..store import Study, final_summary  # not ..train: `info` starts without importing torch

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
    report = s.read_report()
    if report:
        print(f"report.json sections: {', '.join(sorted(report))}")
