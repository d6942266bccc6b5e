"""Training an ensemble of runs and storing checkpoints along each trajectory.

Each run is committed to the study as one transaction when it finishes, so a killed training
keeps every finished run; ``resume=True`` trains only the runs of the stored plan that are missing.
"""
from __future__ import annotations

import json
import math
import os
import time

import torch
from tqdm.auto import tqdm

from ..errors import GlobScopeError
from ..evaluation.one_model import evaluate_model, subset
from ..networks import datasets, models
from ..networks.device import resolve_device
from ..networks.losses import cross_entropy
from ..networks.optimizers import divergence_hint, make_optimizer
from ..storage.locks import dir_lock
from ..storage.safe_write import check_writable
from ..storage.state_layout import StateLayout
from ..storage.study import Study
from ..storage.study_files import study_h5


def run_plan(runs: int, seed: int, optimizers: list[str], lrs: list[float]) -> list[dict]:
    """One dict per run; optimizers and learning rates are cycled over the runs."""
    for o in optimizers:
        make_optimizer(o, [torch.zeros(1, requires_grad=True)], 0.1)  # validates the name
    if runs < 1:
        raise GlobScopeError(f"--runs must be at least 1, not {runs}")
    return [{"seed": seed + i, "optimizer": optimizers[i % len(optimizers)], "lr": float(lrs[i % len(lrs)])}
            for i in range(runs)]


DEFAULTS = dict(epochs=40, batch_size=64, optimizers=["sgd"], lrs=[0.05], every=None, seed=0, eval_samples=10000,
                weight_decay=0.0)
PLAN_KEYS = tuple(DEFAULTS)  # what a resume must share with the stored plan (the number of runs may grow)


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def resolve_plan(study: Study | None, given: dict, resume: bool) -> dict:
    """The settings of this call: the stored plan's where not given on --resume; refused where they differ."""
    stored = None
    if study is not None and resume:
        stored = study.plan or _plan_of_runs(study)
    settings = {}
    for k, default in DEFAULTS.items():
        v = given.get(k)
        settings[k] = v if v is not None else (stored.get(k, default) if stored else default)
    for k in ("optimizers", "lrs"):
        settings[k] = list(settings[k])
    settings["lrs"] = [float(v) for v in settings["lrs"]]
    settings["weight_decay"] = float(settings["weight_decay"])
    if stored:
        diff = [f"{k} (study: {stored[k]}, given: {settings[k]})" for k in PLAN_KEYS
                if k in stored and not _same(stored[k], settings[k])]
        if diff:
            raise GlobScopeError(f"{study.h5_path}: --resume continues the stored training plan; these settings "
                                 f"differ: {'; '.join(diff)}. Drop them, or train into another --out")
    return settings


def _plan_of_runs(study: Study) -> dict | None:
    """A plan for studies written before plans were stored: what their trained runs agree on."""
    trained = [r for r in study.runs if _trained(r)]
    if not trained:
        return None
    r = trained[0]
    plan = {"seed": r["seed"] - r["index"], "epochs": r.get("epochs"), "batch_size": r.get("batch_size"),
            "weight_decay": r.get("weight_decay")}
    return {k: v for k, v in plan.items() if v is not None}


def _trained(run: dict) -> bool:
    """A run trained from the plan (not imported, not a stored connect path)."""
    return bool(run.get("complete")) and run.get("seed") is not None and isinstance(run.get("index"), int) \
        and not run.get("imported") and run.get("label") not in ("curve", "line")


def train_study(out: str, dataset: dict, model_name: str, model_kwargs: dict | None = None, runs: int = 6,
                epochs: int | None = None, batch_size: int | None = None, optimizers=None, lrs=None,
                every: int | None = None, seed: int | None = None, eval_samples: int | None = None,
                weight_decay: float | None = None, device: str = "auto", resume: bool = False, label: str = "",
                progress: bool = True) -> Study:
    """Train ``runs`` models and store their trajectories in ``out/study.h5``.

    ``every``: checkpoint every k optimizer steps (default: once per epoch); step 0 and the final
    step are always stored. The plan (seeds, optimizers, learning rates, epochs, ...) is stored in
    the study: ``resume=True`` continues it (settings left as None are the plan's; others must
    agree with it), training the plan's runs that are missing; imported runs never take a seed.
    One ``train`` at a time per study: the whole plan is under a lock (``STUDY/.train.lock``).
    """
    dev = resolve_device(device)
    ds = datasets.load_dataset(dataset)
    models.check_inputs(model_name, ds)
    spec = models.make_spec(model_name, ds.input_shape, ds.num_classes, **(model_kwargs or {}))
    probe = models.build_model(spec)
    layout = StateLayout.from_module(probe)
    check_writable(out, what="train")
    with dir_lock(os.path.abspath(out), ".train.lock", wait=False, what="another 'globscope train'"):
        return _train_locked(out, dataset, ds, spec, layout, runs, dict(
            epochs=epochs, batch_size=batch_size, optimizers=None if optimizers is None else list(optimizers),
            lrs=None if lrs is None else list(lrs), every=every, seed=seed, eval_samples=eval_samples,
            weight_decay=weight_decay), dev, resume, label, progress)


def _train_locked(out, dataset, ds, spec, layout, runs, given, dev, resume, label, progress) -> Study:
    study = None
    if os.path.exists(study_h5(out)):
        study = Study.open(out)
        if not study.runs and not study.n_checkpoints:
            os.remove(study.h5_path)  # an empty study left by a failed first run (older versions): start over
            study = None
        elif not resume:
            raise GlobScopeError(f"{study_h5(out)}: a study already exists here (use another --out, or --resume)")
        elif study.model_spec != spec or study.layout != layout:
            raise GlobScopeError(f"{study_h5(out)}: written for model {study.model_spec}, cannot resume with {spec}")
        elif study.dataset_spec != dataset:
            raise GlobScopeError(f"{study_h5(out)}: written for dataset {study.dataset_spec}, cannot resume with {dataset}")
    cfg = resolve_plan(study, given, resume)
    steps_per_epoch = math.ceil(len(ds.train_x) / cfg["batch_size"])
    cfg["every"] = cfg["every"] or steps_per_epoch
    if cfg["every"] < 1:
        raise GlobScopeError(f"--every must be at least 1, not {cfg['every']}")
    total = max(runs, (study.plan or {}).get("runs", 0) if study is not None else 0)
    plan = run_plan(total, cfg["seed"], cfg["optimizers"], cfg["lrs"])
    done = {}
    for r in (study.runs if study is not None else []):
        if _trained(r) and r["index"] < total:
            done[r["index"]] = r
    for i, r in done.items():  # runs trained before must be this plan's runs
        diff = [k for k in ("seed", "optimizer", "lr") if not _same(r.get(k), plan[i][k])]
        if diff:
            raise GlobScopeError(f"{study.h5_path}: run with plan index {i} was trained with other settings "
                                 f"({', '.join(f'{k} {r.get(k)} vs {plan[i][k]}' for k in diff)}); "
                                 "train into another --out")
    todo = [i for i in range(runs) if i not in done]
    stored_plan = dict(cfg, runs=total)
    ev_train = subset(ds.train_x, ds.train_y, cfg["eval_samples"], seed=1)
    ev_test = subset(ds.test_x, ds.test_y, cfg["eval_samples"], seed=2)
    rows_per_run = cfg["epochs"] * steps_per_epoch // cfg["every"] + 2
    _check_memory(layout.size, rows_per_run, ds, cfg["batch_size"], plan, dev, out, spec,
                  max(len(ev_train[0]), len(ev_test[0])))
    # the new rows, plus a copy of the study while each run is committed
    check_writable(out, (len(todo) * rows_per_run * layout.size * 4) * 2 + (1 << 20), f"{len(todo)} runs")
    if study is not None and not _same(study.plan, stored_plan):
        study.set_plan(stored_plan)

    bar = tqdm(total=len(todo) * cfg["epochs"] * steps_per_epoch, desc="train", unit="step", disable=not progress)
    with bar:  # closed on errors too, so that the error starts a line of its own
        study = _train_runs(out, dataset, spec, layout, ds, plan, cfg, todo, label, stored_plan, study, dev,
                            ev_train, ev_test, bar)
    if study is None:
        study = Study.open(out)
    return study


def _train_runs(out, dataset, spec, layout, ds, plan, cfg, todo, label, stored_plan, study, dev, ev_train, ev_test,
                bar):
    for i in todo:
        run_cfg = dict(plan[i], index=i, label=label, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                       every=cfg["every"], weight_decay=cfg["weight_decay"])
        rows = _train_run(spec, ds, run_cfg, dev, ev_train, ev_test, bar)
        if study is None:  # created with its first run: a run that diverges leaves no empty study behind
            study = Study.create(out, spec, dataset, layout, plan=stored_plan)
        with study.transaction(extra_bytes=len(rows) * layout.size * 4) as w:
            r = w.add_run(**run_cfg, complete=True)
            for step, vec, m in rows:
                w.append(r, step, vec, **m)
        # else the next run's checkpoints pile up on this run's (the writer keeps what it wrote): twice the memory
        rows = w = vec = None
    return study


def _check_memory(n_params, rows_per_run, ds, batch_size, plan, dev, out, spec, eval_samples) -> None:
    """Say what training needs before starting, instead of being killed for memory (resources.py); the data
    set is loaded by now (``held now``)."""
    from ..resources import estimate_train, require
    from .memory_plan import activation_bytes

    opt = "adam" if any(p["optimizer"] != "sgd" for p in plan) else "sgd"
    parts = estimate_train(n_params, rows_per_run, batch_size, opt, activation_bytes(spec), eval_samples)
    gpu = None
    if dev.type == "cuda":  # model and activations live on the GPU, checkpoints on the host
        gpu = {k: parts.pop(k) for k in ("model, gradients, optimizer", "activations")}
        parts["CUDA libraries (host)"] = 1 << 30  # cuBLAS/cuDNN: ~1 GB of host memory once loaded
    require(parts, f"train {out}: {n_params:,} parameters x {rows_per_run} checkpoints per run", dev, gpu,
            hint="checkpoint less often (--every) or train fewer steps per run", say=True)


def _train_run(spec, ds, cfg, dev, ev_train, ev_test, bar) -> list:
    torch.manual_seed(cfg["seed"])
    model = models.build_model(spec).to(dev)
    layout = StateLayout.from_module(model)
    opt = make_optimizer(cfg["optimizer"], model.parameters(), cfg["lr"], cfg["weight_decay"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    rows = []
    hint = lambda: divergence_hint(cfg["optimizer"], cfg["lr"], cfg["weight_decay"])  # noqa: E731

    def checkpoint(step):
        tl, ta = evaluate_model(model, *ev_train, device=dev)
        vl, va = evaluate_model(model, *ev_test, device=dev)
        if not (math.isfinite(tl) and math.isfinite(vl)):
            raise GlobScopeError(f"run {cfg['index']} (seed {cfg['seed']}, {cfg['optimizer']}, lr {cfg['lr']}): "
                                 f"loss is not finite at step {step}; {hint()}. Earlier runs are kept.")
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
            loss = cross_entropy(model(xb), yb)
            if not torch.isfinite(loss):
                raise GlobScopeError(f"run {cfg['index']} (seed {cfg['seed']}, {cfg['optimizer']}, lr {cfg['lr']}): "
                                     f"training loss became {loss.item()} at step {step + 1}; {hint()}. "
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



