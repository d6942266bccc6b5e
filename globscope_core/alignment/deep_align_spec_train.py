"""Training the spec-driven DEEP-ALIGN net (deep_align_spec.py) on a study's own checkpoints.

The same two losses as for MLPs (deep_align_train.py): supervised on synthetic pairs (a checkpoint and a permuted,
perturbed near-copy of its run) and interpolation on pairs of independent runs. The interpolated, softly permuted
network is evaluated with ``torch.func.functional_call`` on the study's own model; BatchNorm runs in train mode,
on the batch's statistics: the interpolated running statistics describe neither end (variance collapse, REPAIR),
and batch statistics are what the align stage's ``_bn_recomputed`` barriers use. Resumable, like the MLP path.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..networks.models import study_model
from .deep_align import load_aligner_file, sinkhorn
from .deep_align_spec import (
    arch_config,
    build_net,
    check_aligner_fits,
    group_sizes,
    onehot,
    permute_batch,
    spec_tensors,
    states_from_flat,
)
from .deep_align_train import (
    DEFAULTS,
    data_batch,
    late_pairs,
    loaded_net,
    new_or_resumed,
    one_cpu_thread,
    saved_or_trained,
    supervised_loss,
    train_steps,
)

# CNN steps cost more than an MLP's (a forward of the network per interpolation point): fewer, smaller by default
SPEC_DEFAULTS = {**DEFAULTS, "steps": 200, "hidden": 32, "data_batch": 64, "max_rows": 128, "run_pairs": 2,
                 "lmc_weight": 1.0}


class _ListNet:
    """supervised_loss wants ``similarities`` as a list in a fixed order: the groups' order."""

    def __init__(self, net, targets: dict):
        self.net, self.order = net, list(targets)

    def similarities(self, a, b) -> list:
        s = self.net.similarities(a, b)
        return [s[g] for g in self.order]


def interpolation_loss(net, model, spec_axes, params: set, a: dict, b: dict, x, y, alphas) -> torch.Tensor:
    """Mean cross-entropy of the models on the straight line between A and the softly aligned B (train mode)."""
    soft = {g: sinkhorn(s).exp() for g, s in net.similarities(a, b).items()}
    b = permute_batch(spec_axes, soft, b)
    losses = []
    for k in range(next(iter(a.values())).shape[0]):
        for al in alphas:
            mid = {n: (1 - al) * a[n][k] + al * b[n][k] for n in params}
            losses.append(F.cross_entropy(torch.func.functional_call(model, mid, (x,)), y))
    return torch.stack(losses).mean()


class SpecPairSampler:
    """Synthetic and run pairs of full states {name: [n, ...]} from the study's checkpoints (at most ``max_rows``)."""

    def __init__(self, study, spec, tensors: list, cfg: dict, device):
        rows = {r: np.sort(study.run_rows(r)) for r in range(len(study.runs))}
        rows = {r: v for r, v in rows.items() if len(v)}
        keep = min(1.0, cfg["max_rows"] / max(1, sum(len(v) for v in rows.values())))
        self.runs = {}
        for r, v in rows.items():  # each run thinned evenly, its ends kept
            n = max(2, int(round(len(v) * keep)))
            self.runs[r] = v[np.unique(np.linspace(0, len(v) - 1, min(n, len(v))).round().astype(int))]
        self.params = torch.from_numpy(study.read_params(np.concatenate(list(self.runs.values())))).to(device)
        self.where, i = {}, 0
        for r, v in self.runs.items():
            self.where[r] = np.arange(i, i + len(v))
            i += len(v)
        self.layout, self.spec, self.cfg, self.device = study.layout, spec, cfg, device
        self.names = [t[0] for t in tensors]
        self.sizes = group_sizes(tensors)

    def states(self, idx, names=None) -> dict:
        return states_from_flat(self.params[torch.as_tensor(np.asarray(idx), device=self.device)], self.layout, names)

    def synthetic(self, rng, n: int):
        """(A, B, targets): B = permuted, perturbed near-copy of A; targets[g][:, a] = B's index of A's unit a."""
        runs, ia, ib = list(self.runs), [], []
        for _ in range(n):
            pos = self.where[runs[rng.integers(len(runs))]]
            j = int(rng.integers(len(pos)))
            k = int(np.clip(j + rng.integers(-self.cfg["near"], self.cfg["near"] + 1), 0, len(pos) - 1))
            ia.append(pos[j])
            ib.append(pos[k])
        perms = {g: torch.as_tensor(np.stack([rng.permutation(m) for _ in range(n)]), device=self.device)
                 for g, m in self.sizes.items()}
        b = permute_batch(self.spec.axes, {g: onehot(p) for g, p in perms.items()}, self.states(ib, self.names))
        gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))
        scale = torch.as_tensor(rng.uniform(0, self.cfg["noise"], size=n), dtype=torch.float32, device=self.device)
        for name in self.names:
            w = b[name]
            rms = w.pow(2).mean(dim=tuple(range(1, w.ndim))).sqrt()
            shape = (-1,) + (1,) * (w.ndim - 1)
            b[name] = w + (scale * rms).reshape(shape) * torch.randn(w.shape, generator=gen).to(self.device)
        return self.states(ia, self.names), b, {g: torch.argsort(p, dim=1) for g, p in perms.items()}

    def run_pairs(self, rng, n: int):
        """(A, B) full states of two different runs at the same point of the late half of training, or None."""
        rows = late_pairs(self.where, rng, n)
        return None if rows is None else (self.states(rows[0]), self.states(rows[1]))


def study_arch(study, spec, hidden=None, rounds=None) -> dict:
    return arch_config(study.model_spec["name"], spec_tensors(spec, study.layout),
                       hidden or SPEC_DEFAULTS["hidden"], rounds or SPEC_DEFAULTS["rounds"])


def train_spec_aligner(study, spec, path: str, steps: int | None = None, seed: int = 0, device="cpu",
                       progress: bool = True, resume_from: dict | None = None, **overrides):
    """Train (or continue training) the spec aligner of ``study`` and save it to ``path``. Returns (net, config)."""
    with one_cpu_thread(device):
        return _train(study, spec, path, steps, seed, torch.device(device), progress, resume_from, **overrides)


def _train(study, spec, path, steps, seed, device, progress, resume_from, **overrides):
    from ..evaluation.many_models import eval_data

    cfg = {**SPEC_DEFAULTS, **{k: v for k, v in overrides.items() if k in SPEC_DEFAULTS and v is not None}}
    if steps is not None:
        cfg["steps"] = int(steps)
    if resume_from is not None:
        cfg = {**cfg, **{k: resume_from["config"]["train"][k] for k in SPEC_DEFAULTS if k != "steps"}}
    arch = study_arch(study, spec, cfg["hidden"], cfg["rounds"])
    net, opt, start, seconds = new_or_resumed(build_net, arch, cfg, seed, device, resume_from)
    config = {**arch, "train": cfg, "seed": int(seed), "study": study.dir, "batchnorm": "train-mode batch statistics",
              "trained_on": {"study": study.dir, "model_spec": study.model_spec, "runs": len(study.runs),
                             "run_seeds": [r.get("seed") for r in study.runs]}}
    sampler = SpecPairSampler(study, spec, arch["tensors"], cfg, device)
    model = study_model(study).to(device).train()  # train mode: BatchNorm on the batch's statistics
    params = {n for n, _ in model.named_parameters()}
    x_all, y_all = eval_data(study, "train", None)
    x_all, y_all = x_all.to(device), y_all.to(device)

    def step_loss(rng):
        a, b, targets = sampler.synthetic(rng, cfg["synthetic_pairs"])
        loss = loss_sup = supervised_loss(_ListNet(net, targets), a, b, list(targets.values()))
        loss_lmc = torch.zeros(())
        pairs = sampler.run_pairs(rng, cfg["run_pairs"])
        if pairs is not None and cfg["lmc_weight"] > 0:
            x, y = data_batch(rng, x_all, y_all, cfg["data_batch"])
            loss_lmc = interpolation_loss(net, model, spec.axes, params, *pairs, x, y,
                                          rng.uniform(0.2, 0.8, cfg["alphas"]))
            loss = loss + cfg["lmc_weight"] * loss_lmc
        return loss, loss_sup, loss_lmc

    return train_steps(net, opt, cfg, config, path, seed, start, seconds, step_loss, progress)


def load_trained_spec_aligner(study, spec, path: str, device="cpu"):
    """The aligner of ``path`` as it is (no training), for this study's model: (net, config, step); else one line."""
    blob = load_aligner_file(path)
    check_aligner_fits(path, blob["config"], study_arch(study, spec, blob["config"].get("hidden"),
                                                        blob["config"].get("rounds")))
    return loaded_net(build_net, blob, path, device), blob["config"], int(blob["step"])


def ensure_spec_aligner(study, spec, path: str, steps: int | None = None, seed: int = 0, device="cpu",
                        progress: bool = True, **overrides):
    """The saved aligner when it fits this study and has trained ``steps`` steps; resumed or trained otherwise."""
    arch = study_arch(study, spec, overrides.get("hidden"), overrides.get("rounds"))
    return saved_or_trained(path, arch, build_net, functools.partial(train_spec_aligner, study, spec), steps, seed,
                            torch.device(device), progress, **overrides)
