"""``--method deep-align``: the aligner of a study, trained (or resumed, or loaded from another study's file) with
the encoder its model needs: the MLP encoder (deep_align_train.py) or the spec-driven one (deep_align_spec_train.py).
Its own module so that neither training module imports the other's caller (no import cycle)."""
from __future__ import annotations

import os
import time

from ..networks.models import is_mlp
from ..storage.study_files import aligner_file
from .deep_align import DeepAlign, mlp_layers
from .deep_align_train import ensure_aligner, load_trained_aligner
from .matching import WeightMatching


def make_deep_align(spec, study, refine: bool = False, seed: int = 0, device="cpu", aligner_path=None,
                    aligner_steps: int | None = None, progress: bool = True, max_iter: int = 100, aligner=None, **_):
    """Factory for methods.ALIGNERS: the study's saved aligner when compatible and trained far enough, else train.

    ``aligner``: a file of an aligner trained elsewhere (another study of the same MLP), used as it is.
    The Aligner's ``provenance`` says where it was trained, how far, and how long training took here.
    Models other than the registry's MLPs get the spec-driven encoder (deep_align_spec.py).
    """
    mlp = is_mlp(study.model_spec)
    if mlp:
        layers = mlp_layers(study.model_spec, study.layout)
    else:
        from . import deep_align_spec_train as spec_train

        spec_train.spec_tensors(spec, study.layout)  # an unsupported spec: one line before any work
    if aligner is not None:
        path = os.path.abspath(aligner)
        net, config, step = (load_trained_aligner(study, path, device=device) if mlp else
                             spec_train.load_trained_spec_aligner(study, spec, path, device=device))
        here = 0.0
    else:
        path = os.path.abspath(aligner_path or aligner_file(study.dir))
        before = os.path.getmtime(path) if os.path.exists(path) else None
        t0 = time.time()
        net, config = (ensure_aligner(study, path=path, steps=aligner_steps, seed=seed, device=device,
                                      progress=progress) if mlp else
                       spec_train.ensure_spec_aligner(study, spec, path=path, steps=aligner_steps, seed=seed,
                                                      device=device, progress=progress))
        trained = not os.path.exists(path) or os.path.getmtime(path) != before
        here, step = (time.time() - t0 if trained else 0.0), int(config["train"]["steps"])
    source = config.get("study")
    provenance = {"file": path, "given": aligner is not None, "trained_on": source,
                  "in_ensemble": source is not None and os.path.abspath(source) == os.path.abspath(study.dir),
                  "steps": step, "train_seconds": config.get("train_seconds"), "train_seconds_here": round(here, 2),
                  "trained_on_seeds": (config.get("trained_on") or {}).get("run_seeds")}
    wm = WeightMatching(spec, max_iter=max_iter, seed=seed) if refine else None
    if mlp:
        out = DeepAlign(spec, net, layers, config, refine=wm, device=device)
    else:
        from .deep_align_spec import DeepAlignSpec

        out = DeepAlignSpec(spec, net, config, refine=wm, device=device)
    out.provenance = provenance
    return out
