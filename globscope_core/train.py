"""Training an ensemble of runs and storing checkpoints along each trajectory.

Each run is committed to the study as one transaction when it finishes, so a killed training
keeps every finished run; ``resume=True`` trains only the runs that are missing.
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as data_mod
from . import models
from .errors import GlobScopeError
from .evaluation import evaluate_model, resolve_device, subset
from .flat import StateLayout
from .store import Study, final_summary  # noqa: F401 - final_summary lived here

OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise GlobScopeError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}")


def run_plan(runs: int, seed: int, optimizers: list[str], lrs: list[float]) -> list[dict]:
    """One dict per run; optimizers and learning rates are cycled over the runs."""
    for o in optimizers:
        make_optimizer(o, [torch.zeros(1, requires_grad=True)], 0.1)  # validates the name
    if runs < 1:
        raise GlobScopeError(f"--runs must be at least 1, not {runs}")
    return [{"seed": seed + i, "optimizer": optimizers[i % len(optimizers)], "lr": float(lrs[i % len(lrs)])}
            for i in range(runs)]


def train_study(out: str, dataset: dict, model_name: str, model_kwargs: dict | None = None, runs: int = 6,
                epochs: int = 40, batch_size: int = 64, optimizers=("sgd",), lrs=(0.05,), every: int | None = None,
                seed: int = 0, eval_samples: int | None = 10000, weight_decay: float = 0.0, device: str = "auto",
                resume: bool = False, label: str = "", progress: bool = True) -> Study:
    """Train ``runs`` models and store their trajectories in ``out/study.h5``.

    ``every``: checkpoint every k optimizer steps (default: once per epoch); step 0 and the final
    step are always stored.
    """
    dev = resolve_device(device)
    ds = data_mod.load_dataset(dataset)
    spec = models.make_spec(model_name, ds.input_shape, ds.num_classes, **(model_kwargs or {}))
    plan = run_plan(runs, seed, list(optimizers), list(lrs))
    probe = models.build_model(spec)
    layout = StateLayout.from_module(probe)

    if os.path.exists(os.path.join(out, "study.h5")):
        if not resume:
            raise GlobScopeError(f"{out}/study.h5: a study already exists here (use another --out, or --resume)")
        study = Study.open(out)
        if study.model_spec != spec or study.layout != layout:
            raise GlobScopeError(f"{out}/study.h5: written for model {study.model_spec}, cannot resume with {spec}")
        if study.dataset_spec != dataset:
            raise GlobScopeError(f"{out}/study.h5: written for dataset {study.dataset_spec}, cannot resume with {dataset}")
    else:
        study = Study.create(out, spec, dataset, layout)

    done = {r.get("index") for r in study.runs if r.get("complete")}
    todo = [i for i in range(len(plan)) if i not in done]
    steps_per_epoch = math.ceil(len(ds.train_x) / batch_size)
    every = every or steps_per_epoch
    if every < 1:
        raise GlobScopeError(f"--every must be at least 1, not {every}")
    ev_train = subset(ds.train_x, ds.train_y, eval_samples, seed=1)
    ev_test = subset(ds.test_x, ds.test_y, eval_samples, seed=2)
    _check_memory(layout.size, epochs * steps_per_epoch // every + 2, ds, batch_size, plan, dev, out)

    bar = tqdm(total=len(todo) * epochs * steps_per_epoch, desc="train", unit="step", disable=not progress)
    for i in todo:
        cfg = dict(plan[i], index=i, label=label, epochs=epochs, batch_size=batch_size, every=every,
                   weight_decay=weight_decay)
        rows = _train_run(spec, ds, cfg, dev, ev_train, ev_test, bar)
        with study.transaction() as w:
            r = w.add_run(**cfg, complete=True)
            for step, vec, m in rows:
                w.append(r, step, vec, **m)
        del rows  # else the next run's checkpoints pile up on this run's: twice the memory
    bar.close()
    return study


def _check_memory(n_params, rows_per_run, ds, batch_size, plan, dev, out) -> None:
    """Say what training needs before starting, instead of being killed for memory (resources.py)."""
    from .resources import estimate_train, require

    opt = "adam" if any(p["optimizer"] != "sgd" for p in plan) else "sgd"
    parts = estimate_train(n_params, rows_per_run, 0, int(ds.train_x[0].numel()), batch_size, opt)
    parts.pop("data set")  # already loaded
    gpu = None
    if dev.type == "cuda":  # model and activations live on the GPU, checkpoints on the host
        gpu = {k: parts.pop(k) for k in ("model, gradients, optimizer", "activations")}
    require(parts, f"train {out}: {n_params:,} parameters x {rows_per_run} checkpoints per run", dev, gpu,
            hint="checkpoint less often (--every) or train fewer steps per run")


def _train_run(spec, ds, cfg, dev, ev_train, ev_test, bar) -> list:
    torch.manual_seed(cfg["seed"])
    model = models.build_model(spec).to(dev)
    layout = StateLayout.from_module(model)
    opt = make_optimizer(cfg["optimizer"], model.parameters(), cfg["lr"], cfg["weight_decay"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    rows = []

    def checkpoint(step):
        tl, ta = evaluate_model(model, *ev_train, device=dev)
        vl, va = evaluate_model(model, *ev_test, device=dev)
        if not (math.isfinite(tl) and math.isfinite(vl)):
            raise GlobScopeError(f"run {cfg['index']} (seed {cfg['seed']}, {cfg['optimizer']}, lr {cfg['lr']}): "
                                 f"loss is not finite at step {step}; try a lower --lr. Earlier runs are kept.")
        rows.append((step, layout.flatten(model.state_dict()).numpy(),
                     dict(train_loss=tl, train_acc=ta, test_loss=vl, test_acc=va)))
        bar.set_postfix(run=cfg["index"], loss=f"{tl:.4f}", acc=f"{va:.3f}")

    step = 0
    checkpoint(0)
    n = len(ds.train_x)
    t0 = time.time()
    for _ in range(cfg["epochs"]):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, cfg["batch_size"]):
            idx = perm[s : s + cfg["batch_size"]]
            xb, yb = ds.train_x[idx].to(dev), ds.train_y[idx].to(dev)
            loss = F.cross_entropy(model(xb), yb)
            if not torch.isfinite(loss):
                raise GlobScopeError(f"run {cfg['index']} (seed {cfg['seed']}, {cfg['optimizer']}, lr {cfg['lr']}): "
                                     f"training loss became {loss.item()} at step {step + 1}; try a lower --lr. "
                                     "Earlier runs are kept.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step % cfg["every"] == 0:
                checkpoint(step)
    if rows[-1][0] != step:
        checkpoint(step)
    cfg["train_seconds"] = round(time.time() - t0, 3)
    return rows



