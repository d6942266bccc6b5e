"""Mode connectivity on a study (`globscope connect`): a low-loss curve between the final models of two runs
(Garipov et al., NeurIPS 2018). The curve itself (shapes, training, barriers) is in ``connectivity/curves.py``; its views
(latent space, plane, plot) in ``connect_views.py``.

The curve and the straight line are evaluated at 61 evenly spaced t (train/test loss and accuracy;
BatchNorm statistics recomputed at every point, on a fixed subset of ``bn_samples`` training samples, for models
that have BatchNorm: these are the stored points and the main numbers; the report's ``batchnorm`` section adds
the barriers with the points' own, interpolated statistics, Jordan et al.'s "raw" barrier). The barrier of a
path is that of Entezari et al.: max_t loss(t) - ((1-t) loss(0) + t loss(1)).

Everything that goes into the study is written at the end, in one transaction: the 61 curve
points (run label "curve") and the 61 line points (label "line") go to STUDY/paths.h5, a store of
the same layout kept apart from the ensemble in study.h5, so that fit, info, align and the views
see only the trained and imported runs (``--refit`` fits the reducer on both). Then the files:
STUDY/connect-A-B.pt (control points), connect-A-B.png (loss against t), connect-A-B-{2,3}d.vtp (both paths encoded into the latent space, with the true loss,
the loss of the decoded point and the landscape's loss there), and last the report section
"connect-A-B". Curve training saves its state after every epoch (connect-A-B.partial.pt), so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

from ..connectivity.curves import CURVES, curve_coefficients, evaluate_points, path_summary, train_curve
from ..errors import GlobScopeError
from ..evaluation.one_model import subset
from ..networks import datasets
from ..networks.batchnorm import BN_SAMPLES, BN_SEED, bn_modules, bn_subset
from ..networks.device import resolve_device
from ..networks.models import study_model
from ..networks.optimizers import divergence_hint
from ..storage import study_files
from ..storage.locks import holding, output_lock
from ..storage.safe_write import check_utf8_path, remove_file, save_torch
from ..storage.study import RowUnion, Study, paths_store
from .connect_views import (
    PATH_CURVE,
    PATH_LINE,
    choose_reducers,
    gap_numbers,
    latent_view,
    none_to_nan,
    plane_view,
    plot_paths,
    write_latent_vtp,
    write_plane,
)

N_POINTS = 61
NOT_ENDPOINT_LABELS = ("curve", "line")


# --- inputs -------------------------------------------------------------------------------------
def _endpoint_row(s: Study, run: int) -> int:
    """The last checkpoint of a trained run (a stored curve or line of an older study is no end point)."""
    row = s.final_row(run)
    if s.labels[row] in NOT_ENDPOINT_LABELS:
        raise GlobScopeError(f"{s.h5_path}: run {run} is a stored {s.labels[row]}, not a trained run")
    return row


def _parse_run(ref, study: Study):
    """``N`` (a run of ``study``) or ``DIR:N`` (a run of another study) -> (study, run)."""
    text = str(ref)
    other, sep, num = text.rpartition(":")
    try:
        run = int(num if sep else text)
    except ValueError:
        raise GlobScopeError(f"--runs: '{text}' is not a run number (N, or STUDY_DIR:N)") from None
    return (Study.open(other) if sep else study), run



def _endpoints(study: Study, runs):
    if len(runs) != 2:
        raise GlobScopeError(f"--runs needs exactly two runs, got {len(runs)}")
    if not study.final_rows(label=None):
        raise GlobScopeError(f"{study.h5_path}: the study has no final checkpoints (train runs first)")
    (sa, ra), (sb, rb) = (_parse_run(r, study) for r in runs)
    if sa.h5_path == sb.h5_path and ra == rb:
        raise GlobScopeError(f"--runs {runs[0]} {runs[1]}: the same run twice; a curve needs two different minima")
    for s in (sa, sb):
        if s.model_spec != study.model_spec or s.layout != study.layout:
            raise GlobScopeError(f"{s.h5_path}: runs of different models: {s.model_spec['name']} "
                                 f"{s.model_spec.get('kwargs')} vs {study.model_spec['name']} "
                                 f"{study.model_spec.get('kwargs')}")
        if s.dataset_spec != study.dataset_spec:
            raise GlobScopeError(f"{s.h5_path}: trained on another dataset ({s.dataset_spec['name']}) "
                                 f"than {study.h5_path}")
    wa = sa.read_params([_endpoint_row(sa, ra)])[0]
    wb = sb.read_params([_endpoint_row(sb, rb)])[0]
    if not (np.isfinite(wa).all() and np.isfinite(wb).all()):
        raise GlobScopeError(f"{study.h5_path}: a final checkpoint of runs {runs[0]}, {runs[1]} is not finite")
    if np.array_equal(wa, wb):
        raise GlobScopeError(f"--runs {runs[0]} {runs[1]}: both final checkpoints are identical; nothing to connect")
    return wa, wb, (sa, ra), (sb, rb)


def _tag(study: Study, ref_study: Study, run: int) -> str:
    return str(run) if ref_study.h5_path == study.h5_path else f"{os.path.basename(ref_study.dir)}.{run}"


def _pair_lock(a):
    """The lock of one pair's files (connect-A-B.*, its runs in paths.h5, its report section), named as
    ``_tag`` names them. A second connect of the pair is refused: it would train from the same partial file."""
    ends = []
    for ref in a["runs"] if len(a["runs"]) == 2 else ():
        other, sep, num = str(ref).rpartition(":")
        if not num.strip().isdigit():
            return None  # the stage refuses it
        same = not sep or os.path.abspath(other) == os.path.abspath(a["study_dir"])
        ends.append(str(int(num)) if same else f"{os.path.basename(os.path.abspath(other))}.{int(num)}")
    if len(ends) != 2:
        return None
    return a["study_dir"], study_files.connect_key("-".join(ends)), {
        "refuse_same": True, "hint": ", or stop it and rerun your command (its curve's training resumes)"}


def _check_sizes(study: Study, points: int, plane_resolution: int) -> None:
    """Memory and disk that --points and --plane-resolution ask for, checked before the curve is trained (the
    points are [points, P] arrays, the plane a grid of plane_resolution^2 evaluated models); the message names
    the option whose part is the largest."""
    from ..resources import BASE_BYTES, F32, F64, format_bytes, require
    from ..storage.safe_write import check_writable, free_bytes

    P, n_plane = study.n_params, plane_resolution**2
    opt_points, opt_plane = f"--points {points}", f"--plane-resolution {plane_resolution}"
    mem = {"base": BASE_BYTES,
           # the curve's and the line's points and their evaluated copies, the line made in float64 first
           f"{opt_points}: curve and line points [{points:,} x {P:,}], evaluated copies": 4 * points * P * F32,
           f"{opt_points}: the line in float64 while it is made": 2 * points * P * F64}
    if plane_resolution:  # grid coordinates, loss and accuracy, interpolator, the written arrays; a chunk of models
        mem[f"{opt_plane}: plane of {n_plane:,} points, its arrays"] = n_plane * 10 * F64 + 2 * 128 * P * F32
    big = max((k for k in mem if k != "base"), key=mem.get).split(":")[0]
    require(mem, f"connect {study.dir}", hint=f"use a smaller {big.split()[0]}")
    check_writable(study.dir, 0, "connect")
    disk = {opt_points: 2 * (2 * points * P * F32),  # paths.h5 and its copy while the transaction commits
            opt_plane: n_plane * 2 * F32 * 2}  # the plane's loss and accuracy, base64 in the .vti
    need, free = sum(disk.values()) + (1 << 20), free_bytes(study.dir)
    if free is not None and need > free:
        big = max(disk, key=disk.get)
        raise GlobScopeError(f"connect {study.dir}: {big} needs about {format_bytes(need)} on disk ({points * 2:,} "
                             f"curve and line points of {P:,} parameters in paths.h5, and the plane), only "
                             f"{format_bytes(free)} is free there; use a smaller {big.split()[0]}")


def _check_memory(study: Study, points: int, bends: int, plane_resolution: int, reducers, batch_size) -> str:
    """Refuse the stage when what it needs (resources.estimate_connect) does not fit; the ``memory:`` line to say."""
    from ..resources import estimate_connect, memory_line, require
    from .memory_plan import activation_bytes, data_bytes, data_libraries

    try:
        files = [study_files.reducer_file(study.dir, n) if not n.endswith(".pt") else n
                 for n in choose_reducers(study, reducers).values()]
        reducer_bytes = sum(os.path.getsize(f) for f in files if os.path.exists(f))
    except (GlobScopeError, OSError):  # said by the stage where it loads them
        reducer_bytes = 0
    batch = int(batch_size or (study.plan or {}).get("batch_size") or 64)  # the runs' own, as the stage takes it
    floor = any(e.name.endswith("running_var") for e in study.layout.entries)
    parts = estimate_connect(study.n_params, points, bends, plane_resolution, reducer_bytes,
                             data_bytes(study.dataset_spec), batch, activation_bytes(study.model_spec),
                             data_libraries(study.dataset_spec), batchnorm=floor)
    require(parts, f"connect {study.dir}", hint="use fewer --points or a smaller --plane-resolution")
    return memory_line(parts)


# --- the stage ------------------------------------------------------------------------------------
@holding(_pair_lock)
def connect(study_dir: str, runs=(0, 1), curve: str = "bezier", bends: int = 1, epochs: int = 50,
            lr: float | None = None, optimizer: str | None = None, batch_size: int | None = None,
            weight_decay: float = 0.0, points: int = N_POINTS, eval_samples: int | None = 10000,
            reducers=None, refit: bool = False, store_line: bool = True, seed: int = 0, device: str = "auto",
            plane_resolution: int = 41, plane_eval_samples: int | None = 1024, progress: bool = True,
            bn_samples: int = BN_SAMPLES) -> dict:
    """Train a curve between the final checkpoints of two runs, evaluate it, store and draw it.

    Returns the report section (also written to STUDY/report.json under "connect-A-B").
    """
    if curve not in CURVES:
        raise GlobScopeError(f"--curve {curve}: choose one of {', '.join(CURVES)}")
    if bends < 1:
        raise GlobScopeError(f"--bends must be at least 1, not {bends}")
    if epochs < 1:
        raise GlobScopeError(f"--epochs must be at least 1, not {epochs}")
    if points < 3:
        raise GlobScopeError(f"--points must be at least 3, not {points}")
    if bn_samples < 1:
        raise GlobScopeError(f"--bn-samples must be positive, not {bn_samples}")
    if plane_resolution and plane_resolution < 2:
        raise GlobScopeError(f"--plane-resolution must be 0 (no plane) or at least 2, not {plane_resolution}")
    study = Study.open(study_dir)
    check_utf8_path(study.dir, "connect")  # its views are VTK files
    _check_sizes(study, points, plane_resolution)
    memory = _check_memory(study, points, bends, plane_resolution, reducers, batch_size)  # said when the work starts
    wa, wb, (sa, ra), (sb, rb) = _endpoints(study, list(runs))
    ends = [_tag(study, sa, ra), _tag(study, sb, rb)]
    tag = "-".join(ends)
    key = study_files.connect_key(tag)
    base = study_files.connect_base(study.dir, key)
    run_info = sa.runs[ra]
    optimizer = optimizer or run_info.get("optimizer") or "sgd"
    lr = float(lr if lr is not None else (run_info.get("lr") or 0.05))
    batch_size = int(batch_size or run_info.get("batch_size") or 64)
    dev = resolve_device(device)
    t0 = time.time()

    from ..reducers import fit_reducer, load_reducer

    loaded = {dim: load_reducer(study, name) for dim, name in choose_reducers(study, reducers).items()}
    print(memory, file=sys.stderr, flush=True)  # after every refusal above: an error stays one line
    ds = datasets.load_dataset(study.dataset_spec)
    model = study_model(study).to(dev)
    layout = study.layout
    has_bn = bool(bn_modules(model))
    torch.manual_seed(seed)
    config = dict(runs=ends, curve=curve, bends=bends, epochs=epochs, lr=lr,
                  optimizer=optimizer, batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    config_key = json.dumps(config, sort_keys=True)
    control = train_curve(model, layout, wa, wb, curve, bends, ds, epochs, lr, optimizer, batch_size, weight_decay,
                          seed, dev, partial_path=study_files.connect_partial(base), progress=progress, config_key=config_key)
    train_seconds = time.time() - t0

    # evaluation at evenly spaced t, with the same evaluation subsets as training (stages/train.py)
    t = np.linspace(0.0, 1.0, points)
    ev_train = subset(ds.train_x, ds.train_y, eval_samples, seed=1)
    ev_test = subset(ds.test_x, ds.test_y, eval_samples, seed=2)
    bn_x = bn_subset(ds.train_x, bn_samples, BN_SEED) if has_bn else None
    curve_pts = curve_coefficients(curve, bends, t).numpy().astype(np.float32) @ control
    line_pts = np.outer(1 - t, wa).astype(np.float32) + np.outer(t, wb).astype(np.float32)
    t_eval = time.time()
    curve_rows, m_curve = evaluate_points(study, model, layout, curve_pts, ev_train, ev_test, bn_x, dev, progress)
    line_rows, m_line = evaluate_points(study, model, layout, line_pts, ev_train, ev_test, bn_x, dev, progress)
    t_eval = time.time() - t_eval
    own = None
    if has_bn:  # the same points with their own (interpolated) running statistics: the raw barriers
        t_own = time.time()
        own = {name: evaluate_points(study, model, layout, pts, ev_train, ev_test, None, dev, progress)[1]
               for name, pts in (("curve", curve_pts), ("line", line_pts))}
        t_own = time.time() - t_own
    for name, m in (("curve", m_curve), ("line", m_line)):
        bad = [k for k, v in m.items() if not np.isfinite(v).all()]
        if bad:
            raise GlobScopeError(f"{study.h5_path}: the {name} diverged: {', '.join(bad)} not finite along it "
                                 f"({divergence_hint(optimizer, lr, weight_decay)}). Nothing was stored.")

    views, plane_skipped = {}, None
    if plane_resolution:  # the exact picture: the plane of the curve (needs nothing stored)
        mid = control[1] if bends == 1 else curve_pts[points // 2]
        try:
            views["plane"] = plane_view(study, wa, mid, line_rows, curve_rows, plane_resolution,
                                        eval_samples=plane_eval_samples, device=dev, progress=progress)
        except GlobScopeError as exc:  # a curve still on the line has no plane; the rest stands
            plane_skipped = str(exc)
    if not refit:  # drawn with the reducers as they are, before anything is stored
        for dim, red in sorted(loaded.items()):
            views[dim] = _view(study, red, dim, line_rows, curve_rows, dev, progress, refit=False)

    # everything is computed: store the points in one transaction, apart from the ensemble (paths.h5)
    base_info = dict(label="curve", connect=key, path="curve", **{k: v for k, v in config.items() if k != "runs"},
                     ends=config["runs"], t=t.tolist(), batchnorm_recomputed=has_bn,
                     **({"bn_samples": int(len(bn_x))} if has_bn else {}))
    paths = paths_store(study, create=True)
    # an earlier curve (and line) between the same runs is replaced, not kept beside: its rows are left out of
    # the new paths.h5 and its run numbers reused, so rerunning a pair never grows the file
    earlier = [r for r, info in enumerate(paths.runs) if info.get("connect") == key]
    with paths.transaction(extra_bytes=(2 * points) * study.n_params * 4, drop_runs=tuple(earlier)) as w:
        def new_run(**info):
            if earlier:
                w.replace_run(earlier[0], **info)
                return earlier.pop(0)
            return w.add_run(**info)

        rc = new_run(**base_info)
        w.append(rc, np.arange(points), curve_rows, label="curve", **m_curve)
        rl = None
        if store_line:
            rl = new_run(**dict(base_info, label="line", path="line", curve="line", bends=0, epochs=0))
            w.append(rl, np.arange(points), line_rows, label="line", **m_line)
        for r in earlier:  # left over: the earlier pair had a line and this one has none, or old superseded runs
            w.replace_run(r, connect=key, label="removed", superseded=True)
    save_torch({"control_points": torch.from_numpy(control), "config": config_key}, study_files.connect_pt(base))
    remove_file(study_files.connect_partial(base))

    if refit:  # fitted on the ensemble and the stored paths; it still belongs to the (unchanged) study
        from ..reducers import study_id

        for dim in sorted(loaded):
            red = loaded[dim]
            loaded[dim] = fit_reducer(RowUnion(study, paths), red.kind, red.dim, save=False, **red.config)
            loaded[dim].study_id = study_id(study)
            with output_lock(study, f"fit-{loaded[dim].name}", what=key):  # as fit saves a reducer
                loaded[dim].save(study_files.reducer_file(study.dir, loaded[dim].name))
            views[dim] = _view(study, loaded[dim], dim, line_rows, curve_rows, dev, progress, refit=True)
    latent = {"plane": {"skipped": plane_skipped}} if plane_skipped else {}
    if "plane" in views:
        v = views["plane"]
        write_plane(base, v, {"study": study.dir, "connect": key})
        latent["plane"] = dict(reducer="plane", split=v["split"], eval_samples=v["eval_samples"], note=v["note"],
                               file=os.path.basename(study_files.plane_vtp(base)),
                               landscape=os.path.basename(study_files.plane_vti(base)), **v["gaps"])
    for dim, view in sorted((k, v) for k, v in views.items() if k != "plane"):
        vtp = study_files.connect_vtp(base, dim)
        write_latent_vtp(vtp, view, {"study": study.dir, "reducer": view["reducer"], "split": view["split"],
                                     "connect": key, "curve_decoded_gap": view["gaps"]["curve_decoded_gap"],
                                     "curve_landscape_gap": none_to_nan(view["gaps"].get("curve_landscape_gap"))})
        latent[f"{dim}d"] = dict(reducer=view["reducer"], split=view["split"], eval_samples=view["eval_samples"],
                                 file=os.path.basename(vtp),
                                 note=view["note"], landscape=view["landscape_file"] and
                                 os.path.basename(view["landscape_file"]), **view["gaps"])

    s_curve, s_line = path_summary(m_curve, t), path_summary(m_line, t)
    ratio = s_curve["train_loss_barrier"] / s_line["train_loss_barrier"] if s_line["train_loss_barrier"] > 0 else None
    title = (f"{os.path.basename(study.dir)}: runs {tag}, {curve} with {bends} bend(s), {epochs} epochs | "
             f"train-loss barrier: line {s_line['train_loss_barrier']:.3g}, curve {s_curve['train_loss_barrier']:.3g}")
    plot_paths(study_files.connect_png(base), t, m_line, m_curve, title, views)

    section = dict(config, key=key, points=points, points_file=os.path.basename(paths.h5_path), curve_run=rc,
                   line_run=rl, batchnorm_recomputed=has_bn,
                   n_params=study.n_params, train_seconds=round(train_seconds, 2),
                   seconds=round(time.time() - t0, 2), curve=curve, curve_summary=s_curve, line_summary=s_line,
                   barrier_ratio_train=ratio, t=t.tolist(),
                   along={"curve": {k: v.tolist() for k, v in m_curve.items()},
                          "line": {k: v.tolist() for k, v in m_line.items()}},
                   latent=latent, plot=os.path.basename(study_files.connect_png(base)),
                   control_points=os.path.basename(study_files.connect_pt(base)))
    if has_bn:
        section["batchnorm"] = {
            "recomputed_on": f"{len(bn_x)} train samples (seed {BN_SEED})", "samples": int(len(bn_x)),
            # recomputing is what the evaluation with recomputed statistics costs beyond the one without
            "seconds": round(max(0.0, t_eval - t_own), 2),
            "own_statistics": {"curve_summary": path_summary(own["curve"], t), "line_summary": path_summary(own["line"], t),
                               "along": {k: {m: v.tolist() for m, v in own[k].items()} for k in own}}}
    study.update_report(key, section)
    return section


def _view(study, red, dim, line_rows, curve_rows, dev, progress, refit) -> dict:
    """The latent view of both paths with one reducer, on the landscape's evaluation data if there is one."""
    from ..evaluation.many_models import eval_data
    from ..storage.vtk_files import read_vti

    note = "refitted with the curve and line points" if refit else "fitted before the curve points were added"
    vti = study_files.landscape_vti(study.dir, dim)
    split, samples = "test", None
    if os.path.exists(vti):
        fd = read_vti(vti).field_data
        split = fd.get("split") if fd.get("split") in ("train", "test") else "test"
        samples = int(np.atleast_1d(fd["eval_samples"])[0]) if "eval_samples" in fd else None
        samples = samples if samples and samples > 0 else None
        if refit:
            note += _recompute_landscape(study, red.name, vti, progress)
    x, y = eval_data(study, split, samples, seed=0)  # the landscape's subset (stages/landscape.py, eval_seed=0)
    view = latent_view(study, red, {PATH_LINE: line_rows, PATH_CURVE: curve_rows}, x, y, dev)
    view.update(reducer=red.name, split=split, eval_samples=len(x), note=note,
                landscape_file=vti if os.path.exists(vti) else None)
    view["gaps"] = gap_numbers(view)
    return view


def _recompute_landscape(study: Study, reducer_name: str, vti: str, progress: bool) -> str:
    """After a refit the old landscape belongs to the old latent space: recompute it if we can."""
    try:
        from .landscape import compute_landscape
    except ImportError:
        return "; landscape NOT recomputed (no landscape stage installed): run 'globscope landscape' again"
    from ..storage.vtk_files import read_vti

    f = read_vti(vti)
    fd = f.field_data
    if fd.get("reducer") != reducer_name:
        return f"; landscape {os.path.basename(vti)} was made with {fd.get('reducer')}, left as it is"
    kw = {"split": fd.get("split", "test"), "progress": progress}
    if "eval_samples" in fd:
        kw["eval_samples"] = int(np.atleast_1d(fd["eval_samples"])[0])
    if fd.get("batchnorm") == "recompute":  # the old landscape's BatchNorm setting (none written: decoded)
        kw["bn"], kw["bn_samples"] = "recompute", int(np.atleast_1d(fd["bn_samples"])[0])
    else:
        kw["bn"] = "decoded"
    compute_landscape(study, reducer_name, int(f.dims[0]), **kw)
    dim = 3 if f.dims[2] > 1 else 2
    if not os.path.isdir(study_files.topology_dir(study.dir, dim)):
        return "; landscape recomputed with the refitted reducer"
    from .topology import study_topology

    study_topology(study.dir, dim=dim, verbose=False)  # the old merge tree described the old field
    return "; landscape and merge tree recomputed with the refitted reducer"


def load_control_points(path: str) -> tuple[np.ndarray, dict]:
    """Control points [bends+2, P] and config of a stored curve (STUDY/connect-A-B.pt)."""
    if not os.path.exists(path):
        raise GlobScopeError(f"{path}: no stored curve")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        return st["control_points"].numpy(), json.loads(st["config"])
    except Exception as exc:
        raise GlobScopeError(f"{path}: not a GlobScope curve file ({type(exc).__name__})") from None
