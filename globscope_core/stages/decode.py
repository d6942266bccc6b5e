"""`globscope decode`: any point of a landscape as a model, written as a state_dict the user's code loads.

A point is given by its latent coordinates, or named by the merge tree: the minimum of a basin (a NodeId of
``topology-{d}d/nodes.vtu``) or the saddle where two basins join. It must lie on the landscape's grid, and in its
trusted part unless forced. The model is decoded as the landscape decoded it: beyond the hull of the encoded
checkpoints a clamped landscape evaluated the hull boundary on the ray from their centroid, and so does decode.
It is evaluated on the landscape's own evaluation subset, so its loss can be set beside the landscape's value
there (they agree to float32 rounding at grid points).

``PointDecoder`` keeps the study, the reducer and the evaluation data loaded: `globscope serve` and the ParaView
plugin send it one request after another (``answer_requests``: one JSON object per line).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..errors import GlobScopeError
from ..evaluation.many_models import BatchedEvaluator, bn_data, eval_data
from ..networks.device import resolve_device
from ..reducers import load_reducer
from ..reducers.latent_grid import HullClamp, grid_points, interpolate, trusted_points
from ..storage import study_files, vtk_files
from ..storage.locks import output_lock
from ..storage.study import Study
from ..topology import critical_points

FORMATS = (".safetensors", ".pt")


def _coords(pt, digits: int = 6) -> str:
    return "(" + ", ".join(f"{v:.{digits}g}" for v in pt) + ")"


class PointDecoder:
    """The landscape of one dimension of a study, ready to decode and evaluate points of it."""

    def __init__(self, study_dir: str, dim: int | None = None, reducer: str | None = None, device="auto"):
        if dim is None and reducer is None:
            dim = 2
        if dim is None:
            dim = 3 if reducer.endswith("-3d") else 2
        self.dim = int(dim)
        self.study = Study.open(study_dir)
        self.vti = study_files.landscape_vti(self.study.dir, self.dim)
        if not os.path.exists(self.vti):
            raise GlobScopeError(f"{self.vti}: file does not exist (run `globscope landscape --dim {self.dim}` first)")
        self.field = vtk_files.read_vti(self.vti)
        fd = self.field.field_data
        made_with = str(fd.get("reducer", ""))
        reducer = reducer or made_with
        if not reducer:
            raise GlobScopeError(f"{self.vti}: names no reducer; pass --reducer")
        if made_with and reducer != made_with:
            raise GlobScopeError(f"{self.vti} was computed with {made_with}, not {reducer}: its grid and trusted "
                                 f"region belong to {made_with} (use --reducer {made_with}, or compute a landscape "
                                 f"with {reducer})")
        if not reducer.endswith(f"-{self.dim}d"):
            raise GlobScopeError(f"--reducer {reducer} is not a {self.dim}D reducer")
        with output_lock(self.study, f"fit-{reducer}", what=f"decode with {reducer}", reading=True):
            self.reducer = load_reducer(self.study, reducer)
        from .landscape import encode_checkpoints

        self.Z = encode_checkpoints(self.study, self.reducer)
        nx, ny, nz = self.field.dims
        self.spacing = np.asarray(self.field.spacing[: self.dim], np.float64)
        self.lo = np.asarray(self.field.origin[: self.dim], np.float64)
        self.hi = self.lo + self.spacing * (np.array([nx, ny, nz][: self.dim]) - 1)
        self.clamp = HullClamp(self.Z) if fd.get("beyond_hull", "extrapolate") == "clamp" else None
        self.split = str(fd.get("split", "test"))
        self.eval_samples = int(np.ravel(fd.get("eval_samples", 1024))[0])
        x, y = eval_data(self.study, self.split, self.eval_samples, seed=0)  # the landscape's subset (eval_seed 0)
        self.device = resolve_device(device)
        self.evaluator = BatchedEvaluator(self.study.model_spec, x, y, device=self.device, layout=self.study.layout)
        self.bn_reset = None  # a landscape made with --bn recompute: the decoded model gets its statistics the same way
        if str(fd.get("batchnorm", "decoded")) == "recompute":
            from ..networks.batchnorm import BN_SEED, BatchNormReset

            bn_x = bn_data(self.study, int(np.ravel(fd["bn_samples"])[0]), BN_SEED)
            self.bn_reset = BatchNormReset(self.evaluator.model, self.study.layout, bn_x)

    # --- which point --------------------------------------------------------------------------------
    def _topology(self) -> tuple[dict, dict]:
        directory = study_files.topology_dir(self.study.dir, self.dim)
        nodes_path, arcs_path = study_files.topology_files(directory)[:2]
        for p in (nodes_path, arcs_path):
            if not os.path.exists(p):
                raise GlobScopeError(f"{p}: file does not exist (run `globscope topology {self.study.dir}` first)")
        nodes = vtk_files.arrays_of(vtk_files.read_any(nodes_path))
        arcs = vtk_files.arrays_of(vtk_files.read_any(arcs_path), "cell")
        for need, got, p in ((("NodeId", "VertexId", "CriticalType", "Scalar"), nodes, nodes_path),
                             (("upNodeId", "downNodeId"), arcs, arcs_path)):
            missing = [n for n in need if n not in got]
            if missing:
                raise GlobScopeError(f"{p}: no {', '.join(missing)} array (not a merge tree in TTK's layout)")
        return nodes, arcs

    def _vertex_point(self, vertex: int) -> np.ndarray:
        return grid_points(np.array([vertex]), self.field.dims, self.field.origin, self.field.spacing, self.dim)[0]

    def basins(self) -> list[dict]:
        """The basins of the landscape's merge tree: [{node, vertex, scalar, at}], lowest minimum first."""
        nodes, _ = self._topology()
        return [dict(m, at=self._vertex_point(m["vertex"]).tolist()) for m in critical_points.basin_minima(nodes)]

    def point(self, at=None, basin: int | None = None, saddle=None) -> tuple[np.ndarray, str]:
        """(latent point, what it is) from exactly one of coordinates, a basin's NodeId or two basins' NodeIds."""
        if sum(v is not None for v in (at, basin, saddle)) != 1:
            raise GlobScopeError("give exactly one of --at X,Y[,Z], --basin N and --saddle A,B")
        if at is not None:
            pt = np.asarray(at, np.float64).reshape(-1)
            if pt.size != self.dim:
                raise GlobScopeError(f"--at needs {self.dim} coordinates for the {self.dim}D landscape, got {pt.size}")
            if not np.all(np.isfinite(pt)):
                raise GlobScopeError(f"--at {_coords(pt)}: coordinates must be finite numbers")
            return pt, f"at {_coords(pt)}"
        nodes, arcs = self._topology()
        if basin is not None:
            found = [m for m in critical_points.basin_minima(nodes) if m["node"] == int(basin)]
            if not found:
                raise GlobScopeError(f"basin {basin} is not a minimum of the {self.dim}D merge tree (basins by "
                                     f"NodeId, with their minimum's log10 loss: {critical_points.describe(nodes)})")
            return self._vertex_point(found[0]["vertex"]), f"the minimum of basin {int(basin)}"
        a, b = (int(v) for v in saddle)
        s = critical_points.joining_saddle(nodes, arcs, a, b)
        return self._vertex_point(s["vertex"]), f"the saddle joining basins {a} and {b} (node {s['node']})"

    # --- decode and evaluate -------------------------------------------------------------------------
    def decode(self, pt: np.ndarray, force: bool = False) -> tuple[dict, torch.Tensor]:
        """(facts about the point, its decoded flat state [P]); a point off the grid, or untrusted without
        ``force``, is refused in one line."""
        tol = 1e-6 * (self.hi - self.lo)  # a point picked in ParaView has float32 coordinates
        if np.any(pt < self.lo - tol) or np.any(pt > self.hi + tol):
            box = " x ".join(f"[{a:.9g}, {b:.9g}]" for a, b in zip(self.lo, self.hi))
            raise GlobScopeError(f"point {_coords(pt, 9)} lies outside the landscape's grid {box}")
        pt = np.clip(pt, self.lo, self.hi)
        trusted, extrapolation = (float(v[0]) for v in trusted_points(self.Z, pt[None], self.spacing))
        trusted = bool(trusted)
        if not trusted and not force:
            raise GlobScopeError(f"point {_coords(pt)} lies outside the trusted region ({extrapolation:.1%} of the "
                                 "checkpoints' extent beyond their hull: the decoder was fitted on nothing near "
                                 "it); pass --force to decode it anyway")
        at = self.clamp(pt[None])[0] if self.clamp is not None else pt
        z = torch.as_tensor(at[None], dtype=torch.float32, device=self.device)
        with torch.no_grad():
            flat = self.reducer.inverse_transform_torch(z)
            if self.bn_reset is not None:  # written with these statistics too
                flat = self.bn_reset(flat)
            loss, acc = self.evaluator.evaluate(flat)
        land = {name: interpolate(self.field.point_arrays[name], self.field.dims, self.field.origin,
                                  self.field.spacing, pt) for name in ("loss", "accuracy")}
        info = {"study": self.study.dir, "reducer": self.reducer.name, "dim": self.dim, "at": pt.tolist(),
                "decoded_at": at.tolist(), "clamped": bool(np.any(at != pt)), "trusted": trusted,
                "extrapolation": extrapolation, "loss": float(loss[0]), "accuracy": float(acc[0]),
                "landscape_loss": land["loss"], "landscape_accuracy": land["accuracy"], "split": self.split,
                "eval_samples": self.eval_samples, "n_params": int(self.study.n_params),
                "model_spec": self.study.model_spec}
        return info, flat[0].detach().cpu()

    def state_dict(self, flat: torch.Tensor) -> dict:
        """The full state_dict of the study's model holding ``flat`` (integer buffers as a fresh model has them)."""
        from ..networks.models import build_model

        model = self.study.layout.load_into(build_model(self.study.model_spec), flat)
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    def write(self, info: dict, flat: torch.Tensor, out: str) -> str:
        from ..storage.safe_write import save_safetensors, save_torch

        state = self.state_dict(flat)
        if out.endswith(".pt"):
            save_torch(state, out)  # tensors only: torch.load(out, weights_only=True) reads it
        else:
            meta = {k: json.dumps(info[k]) for k in ("study", "reducer", "at", "decoded_at", "trusted", "loss",
                                                       "accuracy", "split", "eval_samples", "model_spec")}
            meta["what"] = info.get("what", "")
            save_safetensors(state, out, metadata=meta)
        return out

    def request(self, at=None, basin=None, saddle=None, force: bool = False, out: str | None = None) -> dict:
        """One decode from start to file: the facts of ``decode`` plus ``what`` and ``out``."""
        pt, what = self.point(at, basin, saddle)
        info, flat = self.decode(pt, force)
        info["what"] = what
        if out is None:
            tag = (f"basin-{int(basin)}" if basin is not None else f"saddle-{int(saddle[0])}-{int(saddle[1])}"
                   if saddle is not None else "at-" + "_".join(f"{v:.4g}" for v in pt))
            out = study_files.decoded_file(self.study.dir, f"{self.reducer.name}-{tag}.safetensors")
        check_format(out)
        info["out"] = self.write(info, flat, out)
        return info


def check_format(out: str) -> None:
    if not out.endswith(FORMATS):
        raise GlobScopeError(f"{out}: the model file must end in .safetensors or .pt")


def summary(info: dict) -> str:
    """Two lines for the terminal: the point and its losses; the file and how to load it."""
    where = "" if not info["clamped"] else f", decoded at the hull boundary {_coords(info['decoded_at'])} as the landscape does"
    trust = "trusted" if info["trusted"] else f"UNTRUSTED ({info['extrapolation']:.1%} beyond the hull, --force)"
    spec = info["model_spec"]
    loader = ("safetensors.torch.load_file(path)" if info["out"].endswith(".safetensors")
              else "torch.load(path, weights_only=True)")
    return (f"{info['reducer']} {info['what']}{where}: {info['split']} loss {info['loss']:.6g}, accuracy "
            f"{info['accuracy']:.4f} on the landscape's {info['eval_samples']} {info['split']} samples; the landscape "
            f"there: loss {info['landscape_loss']:.6g}; {trust}\n"
            f"wrote {info['out']}: {info['n_params']:,} parameters of {spec.get('name')} {json.dumps(spec.get('kwargs', {}))}"
            f"; load with globscope_core.networks.models.build_model(spec).load_state_dict({loader})")


def answer_requests(decoder: PointDecoder, lines, write) -> None:
    """One JSON request per line ({"at": [x, y]} or {"basin": n} or {"saddle": [a, b]}, optional "force" and
    "out"; {"basins": true} lists the basins) answered by one JSON line: the decode's facts with "ok": true, or
    "ok": false and a one-line "error". No request ends the loop but the end of the input."""
    for line in lines:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise GlobScopeError("a request is a JSON object")
            if req.get("basins"):
                answer = {"ok": True, "basins": decoder.basins()}
            else:
                answer = dict(decoder.request(req.get("at"), req.get("basin"), req.get("saddle"),
                                              bool(req.get("force")), req.get("out")), ok=True)
        except (GlobScopeError, OSError, ValueError, TypeError) as exc:
            answer = {"ok": False, "error": " ".join(str(exc).split()) or type(exc).__name__}
        except Exception as exc:  # a bug must not end the server's worker: say it in the answer
            answer = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        write(json.dumps(answer) + "\n")
