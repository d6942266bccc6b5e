"""`globscope import`: add existing checkpoints (state_dict or safetensors) to a study as one run."""
from __future__ import annotations

from .args import (
    add_dataset_args,
    add_model_args,
    checkpoint_path,
    csv_of,
    dataset_spec,
    device,
    new_or_dir,
    nonnegative_int,
    positive_int,
)


def register(sub):
    p = sub.add_parser("import", help="add existing checkpoints (state_dict, safetensors, Hugging Face model "
                                      "directories) as one run")
    p.add_argument("study", type=new_or_dir, help="study directory (created when it does not exist)")
    p.add_argument("files", nargs="+", type=checkpoint_path,
                   help="checkpoint files in trajectory order; a Hugging Face model directory (config.json and "
                        "model.safetensors, sharded too) is one checkpoint, and sets --model when the study is new")
    add_dataset_args(p, required=False)
    add_model_args(p, required=False)
    p.add_argument("--steps", type=csv_of(nonnegative_int), help="comma list of steps, one per file (default 0,1,2,...)")
    p.add_argument("--label", default="imported", help="label stored with the run")
    p.add_argument("--eval-samples", type=positive_int, default=10000, help="samples for train/test loss")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_import)


def cmd_import(args):
    from ..networks.models import parse_kwargs
    from ..stages.import_ import import_checkpoints

    dataset = dataset_spec(args) if args.dataset else None
    study = import_checkpoints(args.study, args.files, args.model, parse_kwargs(args.model_arg), dataset,
                               steps=args.steps, label=args.label, eval_samples=args.eval_samples, device=args.device)
    print(f"{study.h5_path}: run {len(study.runs) - 1} added with {len(args.files)} checkpoints")
