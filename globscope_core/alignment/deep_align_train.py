"""Training the DEEP-ALIGN net on a study's own checkpoints, without labels (Navon et al., ICML 2024, Sec. 5).

Two losses per step:
  * supervised, on synthetic pairs: A is a checkpoint, B a checkpoint of the same run at most ``near``
    checkpoints away, permuted by a known random permutation and perturbed by Gaussian noise (a fraction of each
    matrix's RMS). The target of A's unit a is its position inv(p)[a] in B; the loss is the cross-entropy of the
    soft permutation's rows (log-Sinkhorn) against it.
  * interpolation, on pairs of independent runs (late checkpoints at the same point of training): the
    cross-entropy, on a small batch of the study's training data, of the models (1 - alpha) A + alpha P(B) at a
    few random alphas, with P the soft permutation -- the loss that a good alignment makes low (linear mode
    connectivity).
Each step draws its pairs from a generator seeded by (seed, step), so an interrupted training that resumes from its
last checkpoint (every ``save_every`` steps: net, Adam state, step) continues with the very same batches.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import GlobScopeError
from ..networks.models import mlp_forward
from .deep_align import (
    arch_config,
    build_net,
    check_aligner_fits,
    compatible,
    layer_dims,
    layer_signature,
    load_aligner_file,
    mlp_layers,
    permute_weights,
    save_aligner,
    sinkhorn,
    weights_from_flat,
)

# run_pairs 4 and lmc_weight 2 (were 2 and 1): mean barrier 0.87x weight matching's on the demo (1.02x before, same
# seed) and 0.75x on MNIST-5k (0.83x), for 1.5x the training time
DEFAULTS = {"hidden": 48, "rounds": 2, "steps": 300, "lr": 3e-3, "synthetic_pairs": 4, "run_pairs": 4,
            "noise": 0.1, "near": 3, "lmc_weight": 2.0, "alphas": 2, "data_batch": 128, "max_rows": 256,
            "save_every": 50}


def supervised_loss(net, ws_a, ws_b, targets) -> torch.Tensor:
    """Cross-entropy of the soft assignment's rows (A -> B) and columns (B -> A) against the known permutation."""
    losses = []
    for s, t in zip(net.similarities(ws_a, ws_b), targets):
        # rows and columns: a softmax each way (one Sinkhorn half-step) is as exact a target and 40x cheaper
        rows = torch.gather(torch.log_softmax(s, dim=2), 2, t[..., None])
        cols = torch.gather(torch.log_softmax(s, dim=1), 2, t[..., None])
        losses.append(-(rows.mean() + cols.mean()) / 2)
    return torch.stack(losses).mean()


def interpolation_loss(net, ws_a, ws_b, x, y, alphas) -> torch.Tensor:
    """Mean cross-entropy of the models on the straight line between A and the softly aligned B."""
    soft = [sinkhorn(s).exp() for s in net.similarities(ws_a, ws_b)]
    ws_b = permute_weights(ws_b, soft)
    losses = []
    for a in alphas:
        mid = [((1 - a) * wa + a * wb, (1 - a) * ba + a * bb) for (wa, ba), (wb, bb) in zip(ws_a, ws_b)]
        logits = mlp_forward(mid, x)
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(logits.shape[0])))
    return torch.stack(losses).mean()


class PairSampler:
    """Synthetic and run pairs drawn from the study's checkpoints (held in memory, at most ``max_rows``)."""

    def __init__(self, study, layers, cfg: dict, device):
        rows_by_run = {r: study.run_rows(r) for r in range(len(study.runs))}
        rows_by_run = {r: np.sort(v) for r, v in rows_by_run.items() if len(v)}
        total = sum(len(v) for v in rows_by_run.values())
        keep = min(1.0, cfg["max_rows"] / max(1, total))
        # the late part of each run is kept whole; earlier checkpoints thinned evenly when there are too many
        self.runs = {}
        for r, v in rows_by_run.items():
            n = max(2, int(round(len(v) * keep)))
            self.runs[r] = v[np.unique(np.linspace(0, len(v) - 1, min(n, len(v))).round().astype(int))]
        order = np.concatenate(list(self.runs.values()))
        self.params = torch.from_numpy(study.read_params(order)).to(device)
        self.where, i = {}, 0
        for r, v in self.runs.items():
            self.where[r] = np.arange(i, i + len(v))
            i += len(v)
        self.layout, self.layers, self.cfg, self.device = study.layout, layers, cfg, device
        self.sizes = layer_dims(study.layout, layers)[1:-1]

    def weights(self, idx) -> list:
        return weights_from_flat(self.params[torch.as_tensor(np.asarray(idx), device=self.device)], self.layout,
                                 self.layers)

    def synthetic(self, rng, n: int):
        """(A, B, targets): B = permuted, perturbed near-copy of A; targets[k][:, a] = B's index of A's unit a."""
        runs = list(self.runs)
        ia, ib = [], []
        for _ in range(n):
            pos = self.where[runs[rng.integers(len(runs))]]
            j = int(rng.integers(len(pos)))
            k = int(np.clip(j + rng.integers(-self.cfg["near"], self.cfg["near"] + 1), 0, len(pos) - 1))
            ia.append(pos[j])
            ib.append(pos[k])
        perms = [torch.as_tensor(np.stack([rng.permutation(m) for _ in range(n)]), device=self.device)
                 for m in self.sizes]
        ws_b = permute_weights(self.weights(ib), perms)
        noise = self.cfg["noise"]
        g = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))
        scale = torch.as_tensor(rng.uniform(0, noise, size=n), dtype=torch.float32, device=self.device)
        out = []
        for w, b in ws_b:
            rms_w = w.pow(2).mean((1, 2)).sqrt()
            rms_b = b.pow(2).mean(1).sqrt()
            w = w + (scale * rms_w)[:, None, None] * torch.randn(w.shape, generator=g).to(self.device)
            b = b + (scale * rms_b)[:, None] * torch.randn(b.shape, generator=g).to(self.device)
            out.append((w, b))
        return self.weights(ia), out, [torch.argsort(p, dim=1) for p in perms]

    def run_pairs(self, rng, n: int):
        """(A, B) from two different runs at the same point of the late half of training, or None (one run)."""
        rows = late_pairs(self.where, rng, n)
        return None if rows is None else (self.weights(rows[0]), self.weights(rows[1]))


# --- what both aligners' trainings share (this one's and deep_align_spec_train's) ----------------------------
def late_pairs(where: dict, rng, n: int):
    """Rows (ia, ib) of ``n`` pairs of different runs at the same point of the late half of training (``where``:
    run -> its rows in step order), or None with one run."""
    runs = list(where)
    if len(runs) < 2:
        return None
    ia, ib = [], []
    for _ in range(n):
        ra, rb = rng.choice(len(runs), size=2, replace=False)
        f = rng.uniform(0.5, 1.0)
        pa, pb = where[runs[ra]], where[runs[rb]]
        ia.append(pa[int(round(f * (len(pa) - 1)))])
        ib.append(pb[int(round(f * (len(pb) - 1)))])
    return ia, ib


def data_batch(rng, x, y, n: int):
    """A random batch of at most ``n`` samples of (x, y), for the interpolation loss."""
    idx = torch.as_tensor(rng.choice(len(x), size=min(n, len(x)), replace=False), device=x.device)
    return x[idx], y[idx]


@contextlib.contextmanager
def one_cpu_thread(device):
    """The aligners' ops are small (MFLOPs): on the CPU one thread beats several, whose synchronisation dominated
    (on the shared 2-core machine, 2 threads ran > 20x slower per step than 1)."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def new_or_resumed(build, arch: dict, cfg: dict, seed: int, device, resume_from: dict | None):
    """The aligner net ``build(arch)`` and its Adam optimizer, new (seeded) or as ``resume_from`` left them:
    (net, optimizer, first step, seconds trained so far)."""
    torch.manual_seed(seed)
    net = build(arch).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    if resume_from is None:
        return net, opt, 0, 0.0
    net.load_state_dict(resume_from["model"])
    if "optimizer" in resume_from:
        opt.load_state_dict(resume_from["optimizer"])
    return net, opt, int(resume_from["step"]), float(resume_from["config"].get("train_seconds", 0.0))


def train_steps(net, opt, cfg: dict, config: dict, path: str, seed: int, start: int, seconds: float, step_loss,
                progress: bool):
    """Adam steps ``start`` .. cfg["steps"] on ``step_loss(rng) -> (loss, supervised, interpolation)``, with rng
    seeded by (seed, step) so that a resumed training draws the same batches; the aligner is saved to ``path``
    every cfg["save_every"] steps and at the end. Returns (net in eval mode, config with its training time)."""
    net.train()
    bar = tqdm(total=cfg["steps"], initial=start, desc="deep-align: train aligner", unit="step", disable=not progress)
    t0 = time.time()
    for step in range(start, cfg["steps"]):
        loss, loss_sup, loss_lmc = step_loss(np.random.default_rng([int(seed), step]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        bar.update(1)
        bar.set_postfix(sup=f"{loss_sup.item():.3f}", lmc=f"{loss_lmc.item():.3f}")
        done = step + 1
        if done % cfg["save_every"] == 0 or done == cfg["steps"]:
            config["train_seconds"] = round(seconds + time.time() - t0, 2)
            save_aligner(path, config, net, opt, step=done)
    bar.close()
    config["train_seconds"] = round(seconds + time.time() - t0, 2)
    net.eval()
    return net, config


# --- the MLP aligner ------------------------------------------------------------------------------------------
def train_aligner(study, path: str, steps: int | None = None, seed: int = 0, device="cpu", progress: bool = True,
                  resume_from: dict | None = None, **overrides):
    """Train (or continue training) the aligner of ``study`` and save it to ``path``. Returns (net, config)."""
    with one_cpu_thread(device):
        return _train(study, path, steps, seed, device, progress, resume_from, **overrides)


def _train(study, path, steps, seed, device, progress, resume_from, **overrides):
    from ..evaluation.many_models import eval_data

    device = torch.device(device)
    layers = mlp_layers(study.model_spec, study.layout)
    cfg = {**DEFAULTS, **{k: v for k, v in overrides.items() if k in DEFAULTS and v is not None}}
    if steps is not None:
        cfg["steps"] = int(steps)
    arch = arch_config(study.model_spec["name"], layer_dims(study.layout, layers), cfg["hidden"], cfg["rounds"])
    net, opt, start, seconds = new_or_resumed(build_net, arch, cfg, seed, device, resume_from)
    if resume_from is not None:
        cfg = {**cfg, **{k: resume_from["config"]["train"][k] for k in DEFAULTS if k != "steps"}}
    config = {**arch, "train": cfg, "seed": int(seed), "study": study.dir, "trained_on": trained_on(study, layers)}
    sampler = PairSampler(study, layers, cfg, device)
    x_all, y_all = eval_data(study, "train", None)
    x_all, y_all = x_all.to(device), y_all.to(device)

    def step_loss(rng):
        ws_a, ws_b, targets = sampler.synthetic(rng, cfg["synthetic_pairs"])
        loss = loss_sup = supervised_loss(net, ws_a, ws_b, targets)
        pairs = sampler.run_pairs(rng, cfg["run_pairs"])
        loss_lmc = torch.zeros(())
        if pairs is not None and cfg["lmc_weight"] > 0:
            x, y = data_batch(rng, x_all, y_all, cfg["data_batch"])
            loss_lmc = interpolation_loss(net, *pairs, x, y, rng.uniform(0.2, 0.8, cfg["alphas"]))
            loss = loss + cfg["lmc_weight"] * loss_lmc
        return loss, loss_sup, loss_lmc

    return train_steps(net, opt, cfg, config, path, seed, start, seconds, step_loss, progress)


def trained_on(study, layers) -> dict:
    """What an aligner file says about its training ensemble: another study checks it fits (check_aligner_fits)."""
    return {"study": study.dir, "model_spec": study.model_spec, "layers": layer_signature(study.layout, layers),
            "runs": len(study.runs), "run_seeds": [r.get("seed") for r in study.runs]}


def loaded_net(build, blob: dict, path: str, device):
    """The net of an aligner file's ``blob`` (``build(config)`` with its weights), in eval mode on ``device``; a
    damaged file is one line."""
    net = build(blob["config"])
    try:
        net.load_state_dict(blob["model"])
    except RuntimeError as exc:  # right config, wrong tensors: a damaged file
        first = str(exc).strip().splitlines()[0]
        raise GlobScopeError(f"{path}: the aligner's weights do not fit its config: {first}") from None
    return net.to(torch.device(device)).eval()


def saved_or_trained(path: str, arch: dict, build, train, steps: int | None, seed: int, device, progress: bool,
                     **overrides):
    """The aligner saved at ``path`` when its architecture is ``arch`` and it has trained ``steps`` steps (its own
    count when None), resumed from it when it has trained fewer, else ``train(path, ...)`` from the start."""
    if os.path.exists(path):
        blob = load_aligner_file(path)
        if compatible(blob["config"], arch):
            target = int(steps) if steps is not None else int(blob["config"]["train"]["steps"])
            if blob["step"] >= target:
                return loaded_net(build, blob, path, device), blob["config"]
            return train(path, steps=target, seed=int(blob["config"]["seed"]), device=device, progress=progress,
                         resume_from=blob, **overrides)
        tqdm.write(f"{path}: saved aligner is for another architecture; training a new one")
    return train(path, steps=steps, seed=seed, device=device, progress=progress, **overrides)


def load_trained_aligner(study, path: str, device="cpu"):
    """The aligner of ``path`` as it is (no training), for this study's MLP: (net, config, step); else one line."""
    layers = mlp_layers(study.model_spec, study.layout)
    blob = load_aligner_file(path)
    check_aligner_fits(path, blob["config"], study.model_spec["name"], layer_dims(study.layout, layers),
                       layer_signature(study.layout, layers))
    return loaded_net(build_net, blob, path, device), blob["config"], int(blob["step"])


def ensure_aligner(study, path: str, steps: int | None = None, seed: int = 0, device="cpu", progress: bool = True,
                   **overrides):
    """The saved aligner when it fits this study's MLP and has trained ``steps`` steps; resumed or trained otherwise."""
    layers = mlp_layers(study.model_spec, study.layout)
    hidden = overrides.get("hidden") or DEFAULTS["hidden"]
    rounds = overrides.get("rounds") or DEFAULTS["rounds"]
    arch = arch_config(study.model_spec["name"], layer_dims(study.layout, layers), hidden, rounds)
    return saved_or_trained(path, arch, build_net, functools.partial(train_aligner, study), steps, seed,
                            torch.device(device), progress, **overrides)
