"""`globscope train`: train an ensemble and store its trajectories (torch is imported only when it runs)."""
from __future__ import annotations

from .args import (
    add_dataset_args,
    add_model_args,
    csv_of,
    dataset_spec,
    device,
    new_or_dir,
    nonnegative_float,
    one_of,
    positive_float,
    positive_int,
    seed,
)


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
    p.add_argument("--seed", type=seed, default=None, help="seed of run 0; run i uses seed+i (default: 0)")
    p.add_argument("--eval-samples", type=positive_int, default=None,
                   help="samples for train/test loss at checkpoints (default: 10000)")
    p.add_argument("--label", default="", help="free label stored with each run")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--resume", action="store_true", help="continue the study's stored plan: train only its missing "
                   "runs (options not given are the plan's; others must agree with it)")
    p.set_defaults(func=cmd_train)



def cmd_train(args):
    from ..networks.models import parse_kwargs
    from ..stages.train import train_study
    from ..storage.study import final_summary

    study = train_study(args.out, dataset_spec(args), args.model, parse_kwargs(args.model_arg), runs=args.runs,
                        epochs=args.epochs, batch_size=args.batch_size, optimizers=args.optimizer, lrs=args.lr,
                        every=args.every, seed=args.seed, eval_samples=args.eval_samples,
                        weight_decay=args.weight_decay, device=args.device, resume=args.resume, label=args.label)
    print(f"{study.h5_path}: {len(study.runs)} runs, {study.n_checkpoints} checkpoints, {study.n_params} parameters")
    for d in final_summary(study):
        print(f"  run {d['run']}: step {d['step']}, train loss {d['train_loss']:.4f}, test acc {d['test_acc']:.3f}")
