"""GlobScope's ParaView plugin: a study reader, a merge tree filter, a persistence simplification and a decoder
of picked points (which runs `globscope decode` out of process: ParaView's Python has no torch).

Load it with Tools > Manage Plugins (GUI), ``LoadPlugin(path, ns=globals())`` (pvpython, pvbatch) or
``LoadPlugin(path, remote=True, ns=globals())`` (client of a pvserver). It runs inside ParaView's own
Python (numpy 1.24, no pip vtk): it reads our files with ParaView's VTK readers and calls
``globscope_core.topology`` and ``globscope_core.storage.study_files`` (numpy only), which it finds beside
itself (a checkout or an installed wheel) or on PYTHONPATH; plugin/ must be on PYTHONPATH
too (its sitecustomize.py fixes ParaView 5.11's getargspec import). `globscope render|paraview` set both.

Thin adapter only (the TTK model): algorithms live in globscope_core.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from paraview.util.vtkAlgorithm import VTKPythonAlgorithmBase, smdomain, smhint, smproperty, smproxy
from vtkmodules.util import numpy_support as ns
from vtkmodules.vtkCommonCore import vtkDoubleArray, vtkIntArray, vtkOutputWindow, vtkPoints, vtkStringArray
from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkDataObject, vtkImageData, vtkUnstructuredGrid
from vtkmodules.vtkCommonExecutionModel import vtkStreamingDemandDrivenPipeline as SDDP
from vtkmodules.vtkIOXML import vtkXMLImageDataReader, vtkXMLPolyDataReader, vtkXMLUnstructuredGridReader

# globscope_core when the plugin is loaded by hand: from a checkout, the repository root; from an installed wheel
# (globscope_core/paraview/plugin), the stub package beside it (setup.py), never site-packages itself
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _dir in (_ROOT, os.path.join(_ROOT, "python")):
    if os.path.isdir(os.path.join(_dir, "globscope_core")) and _dir not in sys.path:
        sys.path.append(_dir)
        break

from globscope_core.storage import study_files, vtk_files  # noqa: E402 - file names, checksums (numpy only)

VTK_VERTEX, VTK_LINE = 1, 3


def _error(algorithm, message):
    """Show an error in ParaView's Output Messages (never raise out of a pipeline request)."""
    vtkOutputWindow.GetInstance().DisplayErrorText(f"{algorithm}: {message}\n")


def _piece(out_info):
    return out_info.Get(SDDP.UPDATE_PIECE_NUMBER()) if out_info.Has(SDDP.UPDATE_PIECE_NUMBER()) else 0


def _crop_to_request(img, out_info):
    """Keep only the extent this rank was asked for (pvserver under MPI splits images)."""
    if out_info.Has(SDDP.UPDATE_EXTENT()):
        ext = out_info.Get(SDDP.UPDATE_EXTENT())
        if tuple(ext) != tuple(img.GetExtent()):
            img.Crop(ext)


def _set_image_information(out_info, extent, origin, spacing):
    out_info.Set(SDDP.WHOLE_EXTENT(), list(extent), 6)
    out_info.Set(vtkDataObject.ORIGIN(), list(origin), 3)
    out_info.Set(vtkDataObject.SPACING(), list(spacing), 3)


# --- TopologyResult (numpy, TTK layout) -> VTK ------------------------------------------------------
def _get(part, name, default=None):
    if isinstance(part, dict):
        return part.get(name, default)
    return getattr(part, name, default)


def _add_arrays(data, arrays):
    for name, values in (arrays or {}).items():
        a = np.ascontiguousarray(values)
        if a.dtype == np.bool_:
            a = a.astype(np.uint8)
        arr = ns.numpy_to_vtk(a, deep=True)
        arr.SetName(name)
        data.AddArray(arr)


def _unstructured(part):
    """A nodes/arcs/diagram part (points, cells, point/cell arrays) as a vtkUnstructuredGrid."""
    ug = vtkUnstructuredGrid()
    pts = vtkPoints()
    p = np.asarray(_get(part, "points"))
    p = np.ascontiguousarray(p.reshape(-1, 3) if p.dtype in (np.float32, np.float64) else p.astype(np.float64).reshape(-1, 3))
    pts.SetData(ns.numpy_to_vtk(p, deep=True))
    ug.SetPoints(pts)
    cells = _get(part, "cells")
    types = _get(part, "cell_types")
    if cells is None:  # nodes: one vertex per point
        cells = [[i] for i in range(len(p))]
    cells = [list(map(int, c)) for c in cells]
    if types is None:
        types = [VTK_VERTEX if len(c) == 1 else VTK_LINE for c in cells]
    ug.Allocate(len(cells))
    for t, c in zip(types, cells):
        ug.InsertNextCell(int(t), len(c), c)
    _add_arrays(ug.GetPointData(), _get(part, "point_arrays"))
    _add_arrays(ug.GetCellData(), _get(part, "cell_arrays"))
    return ug


def compute_tree(img, array_name, values, tree="join", persistence=0.0, relative=False, split_pairs="homology"):
    """Merge tree of ``values`` on image ``img`` with the core; returns (nodes, arcs, segmentation, diagram, res).

    The diagram of a split tree lists the pairs of TTK's default backend (``split_pairs="homology"``), as
    TTKPersistenceDiagram does, so that both engines give the same outputs."""
    from globscope_core.topology import compute_topology

    nx, ny, nz = img.GetDimensions()
    grid = np.asarray(values).reshape(nz, ny, nx)
    order = img.GetPointData().GetArray(f"{array_name}_Order")  # TTK: a simplification's order decides ties
    if order is not None:
        order = ns.vtk_to_numpy(order).reshape(nz, ny, nx)
    res = compute_topology(grid, img.GetOrigin(), img.GetSpacing(), tree=tree, persistence=persistence,
                           relative=relative, name=array_name, order=order, split_pairs=split_pairs)
    seg = vtkImageData()
    seg.ShallowCopy(img)
    # TTK's segmentation: the input's arrays plus SegmentationId (active), RegionSize, RegionSpan, RegionType
    _add_arrays(seg.GetPointData(), res.segmentation)
    seg.GetPointData().SetActiveScalars("SegmentationId")
    return _unstructured(res.nodes), _unstructured(res.arcs), seg, _unstructured(res.diagram), res


# --- TTK, when this ParaView has it --------------------------------------------------------------------
def _loaded_ttk_plugins():
    """File names of the TTK C++ plugins this process has loaded (e.g. through PV_PLUGIN_PATH or LoadPlugin)."""
    try:
        from paraview.modules.vtkRemotingCore import vtkPVPluginTracker
    except ImportError:  # pragma: no cover - other ParaView builds
        return []
    t = vtkPVPluginTracker.GetInstance()
    return [t.GetPluginFileName(i) for i in range(t.GetNumberOfPlugins())
            if t.GetPluginLoaded(i) and t.GetPluginName(i) == "TopologyToolKit"]


def ttk_module():
    """(TTK's Python wrappers or None, why not): found however TTK was loaded. The wrappers are the module
    ``topologytoolkit`` on sys.path, or next to a loaded C++ plugin (PREFIX/bin/plugins/TopologyToolKit/
    TopologyToolKit.so -> PREFIX/lib/python3/site-packages, where `setup.sh --with-ttk` installs them).
    GLOBSCOPE_NO_TTK=1 chooses our own engine."""
    if os.environ.get("GLOBSCOPE_NO_TTK", "") not in ("", "0"):
        return None, "GLOBSCOPE_NO_TTK is set"
    try:
        import topologytoolkit
        return topologytoolkit, ""
    except ImportError:
        pass
    plugins = _loaded_ttk_plugins()
    for so in plugins:
        prefix = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(so)))))
        site = os.path.join(prefix, "lib", "python3", "site-packages")
        if os.path.isdir(os.path.join(site, "topologytoolkit")):
            if site not in sys.path:
                sys.path.append(site)
            import topologytoolkit
            return topologytoolkit, ""
    if plugins:
        return None, (f"TTK's plugin {plugins[0]} is loaded, but its Python wrappers (topologytoolkit) are "
                      "not next to it (build them: setup.sh --with-ttk)")
    return None, "TTK is not loaded (setup.sh --with-ttk installs it)"


def _ttk_run(f, img, name, debug=0):
    f.SetInputData(img)
    f.SetInputArrayToProcess(0, 0, 0, 0, name)
    if hasattr(f, "SetDebugLevel"):
        f.SetDebugLevel(debug)  # no banner and progress lines (BUILD.md trap 5)
    return f


def _copy(img):
    """TTK adds ``<name>_Order`` to its input's point data: give it a copy, never the pipeline's object."""
    c = vtkImageData()
    c.ShallowCopy(img)
    return c


def ttk_tree(tk, img, name, tree):
    """TTK's merge tree (1.2.0: ttkFTMTree, newer: ttkMergeTree) and persistence diagram of the same tree
    type; returns (nodes, arcs, segmentation, diagram, class name)."""
    img = _copy(img)
    cls = getattr(tk, "ttkMergeTree", None) or getattr(tk, "ttkFTMTree")
    f = _ttk_run(cls(), img, name)
    f.SetTreeType(1 if tree == "split" else 0)  # set explicitly: the default is out of range / a contour tree
    if hasattr(f, "SetBackend"):
        f.SetBackend(0)  # FTM
    f.Update()
    d = _ttk_run(tk.ttkPersistenceDiagram(), _copy(img), name)
    # the pairs of the tree's type only (plus the global min-max pair TTK always writes)
    d.SetComputeSadSad(False)
    d.SetComputeSadMax(tree == "split")
    d.SetComputeMinSad(tree != "split")
    d.Update()
    return (f.GetOutputDataObject(0), f.GetOutputDataObject(1), f.GetOutputDataObject(2), d.GetOutputDataObject(0),
            cls.__name__)


def ttk_simplify(tk, img, name, threshold, absolute):
    """TTK's TopologicalSimplificationByPersistence removing minimum-saddle pairs; returns the simplified image."""
    f = _ttk_run(tk.ttkTopologicalSimplificationByPersistence(), _copy(img), name)
    f.SetPairType(1)  # Minimum-Saddle
    f.SetPersistenceThreshold(threshold)
    f.SetThresholdIsAbsolute(bool(absolute))
    f.Update()
    return f.GetOutputDataObject(0)


def _say(text):
    """One line in ParaView's output (Output Messages in the GUI, the terminal for pvpython/pvbatch)."""
    vtkOutputWindow.GetInstance().DisplayText(text + "\n")


# --- the study reader ---------------------------------------------------------------------------------
_READER_PORTS = [("Landscape", "vtkImageData"), ("Trajectories", "vtkPolyData"),
                 ("Merge Tree Nodes", "vtkUnstructuredGrid"), ("Merge Tree Arcs", "vtkUnstructuredGrid"),
                 ("Segmentation", "vtkImageData"), ("Persistence Diagram", "vtkUnstructuredGrid"),
                 ("Connect Paths", "vtkPolyData")]
CONNECT_PORT = 6


def _string_field(data, name, value):
    a = vtkStringArray()
    a.SetName(name)
    a.InsertNextValue(value)
    data.GetFieldData().AddArray(a)


def _study_dir(path):
    """The study directory of the reader's file name (study.h5, or the directory itself)."""
    return path if os.path.isdir(path) else os.path.dirname(path)


def _append_polydata(paths):
    """All connect files as one polydata (cells: the end vertices, then line and curve; cell array ``path``)."""
    from vtkmodules.vtkFiltersCore import vtkAppendPolyData

    app = vtkAppendPolyData()
    for p in paths:
        app.AddInputData(_read(p))
    app.Update()
    return app.GetOutput()


_XML_READERS = {".vti": vtkXMLImageDataReader, ".vtp": vtkXMLPolyDataReader, ".vtu": vtkXMLUnstructuredGridReader}


class _Errors:
    """Collects a VTK reader's error events (instead of VTK's multi-line log) for one clear message."""

    def __init__(self, algorithm):
        self.messages = []
        algorithm.AddObserver("ErrorEvent", self)
        algorithm.GetExecutive().AddObserver("ErrorEvent", self)

    def __call__(self, obj, event, data=None):
        self.messages.append(event)

    __call__.CallDataType = "string0"  # VTK passes the message text


def _xml_reader(path, information_only=False):
    r = _XML_READERS[os.path.splitext(path)[1]]()
    errors = _Errors(r)
    r.SetFileName(path)
    r.UpdateInformation() if information_only else r.Update()
    if errors.messages or r.GetErrorCode():
        raise ValueError(f"{path}: unreadable VTK XML file (broken or not VTK XML)")
    return r


def _read(path):
    out = _xml_reader(path).GetOutputDataObject(0)
    if out is None or (out.IsA("vtkImageData") and out.GetNumberOfPoints() == 0):
        raise ValueError(f"{path}: holds no data")
    stored = vtk_files.stored_checksum(out)  # older files have none: shown as they are
    if stored is not None and stored != vtk_files.data_checksum(out):
        raise ValueError(f"{path} is damaged (checksum mismatch): {vtk_files.rerun_hint(path)}")
    return out


@smproxy.reader(name="GlobScopeStudyReader", label="GlobScope Study Reader",
                extensions=["h5"], filename_patterns=study_files.STUDY_H5,
                file_description="GlobScope study (study.h5 and the landscape files next to it)")
@smproperty.xml("".join(f'<OutputPort name="{n}" index="{i}" />' for i, (n, _) in enumerate(_READER_PORTS)))
class GlobScopeStudyReader(VTKPythonAlgorithmBase):
    """One file gives everything: the loss landscape, the trajectories, the merge tree outputs and the
    mode-connectivity paths (empty when the study has none)."""

    def __init__(self):
        VTKPythonAlgorithmBase.__init__(self, nInputPorts=0, nOutputPorts=len(_READER_PORTS))
        self._filename = ""
        self._dim = 2

    def FillOutputPortInformation(self, port, info):
        info.Set(vtkDataObject.DATA_TYPE_NAME(), _READER_PORTS[port][1])
        return 1

    @smproperty.stringvector(name="FileName")
    @smdomain.filelist()
    @smhint.filechooser(extensions="h5", file_description="GlobScope study")
    def SetFileName(self, name):
        if name != self._filename:
            self._filename = name or ""
            self.Modified()

    @smproperty.xml("""<IntVectorProperty name="Dimension" command="SetDimension" number_of_elements="1"
        default_values="2"><EnumerationDomain name="enum"><Entry value="2" text="2D"/><Entry value="3" text="3D"/>
        </EnumerationDomain><Documentation>Which landscape of the study: 2D or 3D latent space.</Documentation>
        </IntVectorProperty>""")
    def SetDimension(self, dim):
        if int(dim) != self._dim:
            self._dim = int(dim)
            self.Modified()

    def _files(self):
        if not self._filename:
            raise ValueError("no study file set")
        if not os.path.exists(self._filename):
            raise ValueError(f"{self._filename}: no such file or directory")
        files = study_files.view_files(_study_dir(self._filename), self._dim)  # in port order (0-5)
        if not os.path.exists(files[0]):
            raise ValueError(f"{files[0]}: missing; run `globscope landscape` on this study first")
        return files

    def RequestInformation(self, request, inInfo, outInfo):
        try:
            files = self._files()
            for port, path in ((0, files[0]), (4, files[4])):
                if not os.path.exists(path):
                    path = files[0]  # no topology yet: the segmentation port mirrors the landscape grid
                info = _xml_reader(path, information_only=True).GetOutputInformation(0)
                _set_image_information(outInfo.GetInformationObject(port), info.Get(SDDP.WHOLE_EXTENT()),
                                       info.Get(vtkDataObject.ORIGIN()), info.Get(vtkDataObject.SPACING()))
        except Exception:  # noqa: BLE001 - reported once, by RequestData
            for port in (0, 4):  # empty images, so the pipeline has nothing else to complain about
                _set_image_information(outInfo.GetInformationObject(port), (0, -1, 0, -1, 0, -1), (0, 0, 0), (1, 1, 1))
        return 1

    def RequestData(self, request, inInfo, outInfo):
        try:
            files = self._files()
            missing = []
            for port, path in enumerate(files):  # the study's fixed files (ports 0-5)
                info = outInfo.GetInformationObject(port)
                out = vtkDataObject.GetData(info)
                if not os.path.exists(path):
                    missing.append(os.path.basename(path))
                    continue
                if _READER_PORTS[port][1] == "vtkImageData":
                    out.ShallowCopy(_read(path))
                    _crop_to_request(out, info)
                    if port == 0:  # the file names only the study's basename: GlobScope Decode Point needs the path
                        _string_field(out, "study_dir", os.path.abspath(_study_dir(self._filename)))
                elif _piece(info) == 0:  # points and cells: all on the first rank, none elsewhere
                    out.ShallowCopy(_read(path))
            connect = study_files.connect_files(_study_dir(self._filename), f"{self._dim}d")  # optional: no warning when none
            if connect and _piece(outInfo.GetInformationObject(CONNECT_PORT)) == 0:
                vtkDataObject.GetData(outInfo.GetInformationObject(CONNECT_PORT)).ShallowCopy(_append_polydata(connect))
            if missing:
                vtkOutputWindow.GetInstance().DisplayWarningText(
                    f"GlobScope Study Reader: {', '.join(missing)} not found next to {self._filename} "
                    "(run `globscope topology` on the study); those outputs are empty\n")
        except Exception as exc:  # noqa: BLE001 - an error message in ParaView, empty outputs, never a crash
            _error("GlobScope Study Reader", exc)
        return 1


# --- filters on image data -------------------------------------------------------------------------
_SCALAR_FIELD_XML = """<StringVectorProperty name="{name}" command="SetInputArrayToProcess" number_of_elements="5"
    element_types="0 0 0 0 2" animateable="0"><ArrayListDomain name="array_list" attribute_type="Scalars"
    input_domain_name="inputs_array"><RequiredProperties><Property name="Input" function="Input"/>
    </RequiredProperties></ArrayListDomain><Documentation>The scalar field (point data).</Documentation>
    </StringVectorProperty>"""


class _WholeImageFilter(VTKPythonAlgorithmBase):
    """Base: one image input, needed whole on every rank (a merge tree is global)."""

    def _request_whole_input(self, inInfo):
        info = inInfo[0].GetInformationObject(0)
        info.Set(SDDP.UPDATE_EXTENT(), info.Get(SDDP.WHOLE_EXTENT()), 6)
        info.Set(SDDP.EXACT_EXTENT(), 1)
        info.Set(SDDP.UPDATE_PIECE_NUMBER(), 0)
        info.Set(SDDP.UPDATE_NUMBER_OF_PIECES(), 1)

    def RequestUpdateExtent(self, request, inInfo, outInfo):
        self._request_whole_input(inInfo)
        return 1

    _array = None

    def _set_array(self, field, name):
        if name != self._array:
            self._array = name  # point data only: a merge tree lives on the grid's vertices
            self.Modified()

    def _scalars(self, inInfo):
        img = vtkImageData.GetData(inInfo[0], 0)
        pd = img.GetPointData() if img is not None else None
        arr = (pd.GetArray(self._array) if self._array else pd.GetScalars()) if pd is not None else None
        if arr is None:
            raise ValueError(f"the input has no point array {self._array!r} (set ScalarField/InputArray)")
        if arr.GetNumberOfComponents() != 1:
            raise ValueError(f"array {arr.GetName()} has {arr.GetNumberOfComponents()} components, needs 1")
        return img, arr.GetName(), ns.vtk_to_numpy(arr)


@smproxy.filter(name="GlobScopeMergeTree", label="GlobScope Merge Tree")
@smproperty.xml('<OutputPort name="Skeleton Nodes" index="0" /><OutputPort name="Skeleton Arcs" index="1" />'
                '<OutputPort name="Segmentation" index="2" /><OutputPort name="Persistence Diagram" index="3" />')
@smhint.xml('<ShowInMenu category="GlobScope" />')
@smproperty.input(name="Input", port_index=0)
@smdomain.datatype(dataTypes=["vtkImageData"], composite_data_supported=False)
class GlobScopeMergeTree(_WholeImageFilter):
    """Join or split tree with TTKMergeTree's outputs and arrays; TTK computes it when this ParaView has TTK."""

    _OUT = ["vtkUnstructuredGrid", "vtkUnstructuredGrid", "vtkImageData", "vtkUnstructuredGrid"]

    def __init__(self):
        VTKPythonAlgorithmBase.__init__(self, nInputPorts=1, nOutputPorts=4)
        self._tree = 0
        self.last_backend = ""

    def FillInputPortInformation(self, port, info):
        info.Set(self.INPUT_REQUIRED_DATA_TYPE(), "vtkImageData")
        return 1

    def FillOutputPortInformation(self, port, info):
        info.Set(vtkDataObject.DATA_TYPE_NAME(), self._OUT[port])
        return 1

    @smproperty.xml(_SCALAR_FIELD_XML.format(name="ScalarField"))
    def SetInputArrayToProcess(self, idx, port, connection, field, name):
        self._set_array(field, name)

    @smproperty.xml("""<IntVectorProperty name="TreeType" command="SetTreeType" number_of_elements="1"
        default_values="0"><EnumerationDomain name="enum"><Entry value="0" text="Join Tree"/>
        <Entry value="1" text="Split Tree"/></EnumerationDomain>
        <Documentation>Join tree: minima merging as the value rises (basins of a loss).</Documentation>
        </IntVectorProperty>""")
    def SetTreeType(self, value):
        if int(value) != self._tree:
            self._tree = int(value)
            self.Modified()

    def RequestInformation(self, request, inInfo, outInfo):
        # the segmentation (port 2) has the input's grid
        src = inInfo[0].GetInformationObject(0)
        if src.Has(SDDP.WHOLE_EXTENT()):
            _set_image_information(outInfo.GetInformationObject(2), src.Get(SDDP.WHOLE_EXTENT()),
                                   src.Get(vtkDataObject.ORIGIN()), src.Get(vtkDataObject.SPACING()))
        return 1

    def RequestData(self, request, inInfo, outInfo):
        try:
            img, name, values = self._scalars(inInfo)
            outs = [vtkDataObject.GetData(outInfo.GetInformationObject(i)) for i in range(4)]
            tk, why = ttk_module()
            tree = "split" if self._tree else "join"
            if tk is not None:
                *parts, cls = ttk_tree(tk, img, name, tree)
                self.last_backend = "ttk"
                _say(f"GlobScope Merge Tree: engine TTK ({cls}, {tree} tree)")
            else:
                parts = compute_tree(img, name, values, tree=tree)[:4]
                self.last_backend = "globscope_core"
                _say(f"GlobScope Merge Tree: engine globscope_core ({tree} tree; {why})")
            for port, (out, part) in enumerate(zip(outs, parts)):
                info = outInfo.GetInformationObject(port)
                if port == 2:
                    out.ShallowCopy(part)
                    _crop_to_request(out, info)
                elif _piece(info) == 0:  # the tree once, on the first rank
                    out.ShallowCopy(part)
        except Exception as exc:  # noqa: BLE001
            _error("GlobScope Merge Tree", exc)
        return 1


@smproxy.filter(name="GlobScopeTopologicalSimplificationByPersistence",
              label="GlobScope Topological Simplification By Persistence")
@smhint.xml('<ShowInMenu category="GlobScope" />')
@smproperty.input(name="Input", port_index=0)
@smdomain.datatype(dataTypes=["vtkImageData"], composite_data_supported=False)
class GlobScopeTopologicalSimplification(_WholeImageFilter):
    """Remove minima whose persistence is at most the threshold (TTK's property names and output arrays)."""

    def __init__(self):
        VTKPythonAlgorithmBase.__init__(self, nInputPorts=1, nOutputPorts=1, outputType="vtkImageData")
        self._threshold = 0.0
        self._absolute = 1
        self.last_backend = ""

    def FillInputPortInformation(self, port, info):
        info.Set(self.INPUT_REQUIRED_DATA_TYPE(), "vtkImageData")
        return 1

    @smproperty.xml(_SCALAR_FIELD_XML.format(name="InputArray"))
    def SetInputArrayToProcess(self, idx, port, connection, field, name):
        self._set_array(field, name)

    @smproperty.doublevector(name="PersistenceThreshold", default_values=0.0)
    @smdomain.doublerange(min=0.0)
    def SetPersistenceThreshold(self, value):
        if float(value) != self._threshold:
            self._threshold = float(value)
            self.Modified()

    @smproperty.xml("""<IntVectorProperty name="ThresholdIsAbsolute" command="SetThresholdIsAbsolute"
        number_of_elements="1" default_values="1"><BooleanDomain name="bool"/>
        <Documentation>Off: the threshold is a fraction of the scalar range.</Documentation></IntVectorProperty>""")
    def SetThresholdIsAbsolute(self, value):
        if int(value) != self._absolute:
            self._absolute = int(value)
            self.Modified()

    def RequestData(self, request, inInfo, outInfo):
        try:
            img, name, values = self._scalars(inInfo)
            out = vtkImageData.GetData(outInfo.GetInformationObject(0))
            tk, why = ttk_module()
            if tk is not None:
                out.ShallowCopy(ttk_simplify(tk, img, name, self._threshold, self._absolute))
                self.last_backend = "ttk"
                _say("GlobScope Topological Simplification: engine TTK (ttkTopologicalSimplificationByPersistence)")
            else:
                *_, res = compute_tree(img, name, values, persistence=self._threshold, relative=not self._absolute)
                out.ShallowCopy(img)
                # TTK's output: the input with the simplified scalar (in place) and its order <name>_Order
                src = img.GetPointData().GetArray(name)
                simplified = ns.numpy_to_vtk(res.simplified_values.ravel().astype(ns.get_numpy_array_type(src.GetDataType())), deep=True)
                simplified.SetName(name)
                out.GetPointData().AddArray(simplified)
                _add_arrays(out.GetPointData(), {f"{name}_Order": res.simplified_order.ravel()})
                self.last_backend = "globscope_core"
                _say(f"GlobScope Topological Simplification: engine globscope_core ({why})")
            _crop_to_request(out, outInfo.GetInformationObject(0))
        except Exception as exc:  # noqa: BLE001
            _error("GlobScope Topological Simplification", exc)
        return 1


# --- decoding a picked point: `globscope decode` out of process (ParaView's Python has no torch) ---------
DECODE_TIMEOUT = 600  # seconds; a decode is one forward pass, but the CLI loads torch and the study first


def globscope_command():
    """How to run globscope's CLI: $GLOBSCOPE_PYTHON -m globscope_core.cli (`globscope paraview|render` set it),
    else ``globscope`` on PATH, else the checkout's .venv next to this plugin."""
    py = os.environ.get("GLOBSCOPE_PYTHON")
    if py:
        return [py, "-m", "globscope_core.cli"]
    exe = shutil.which("globscope")
    if exe:
        return [exe]
    py = os.path.join(_ROOT, ".venv", "bin", "python")
    if os.access(py, os.X_OK):
        return [py, "-m", "globscope_core.cli"]
    raise ValueError("globscope not found: set GLOBSCOPE_PYTHON to a python with globscope_core installed, "
                     "or put globscope on PATH")


def cli_environment():
    """The environment for ``globscope_command``: ParaView's PYTHONHOME out, and only the directory holding
    globscope_core on PYTHONPATH (ParaView's own entries would shadow the virtualenv's numpy and vtk)."""
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(study_files.__file__))))
    return env


def decode_point(study, point, out="", force=False, timeout=DECODE_TIMEOUT):
    """`globscope decode STUDY --at X,Y[,Z] --json`'s answer (a dict); a refused point or a failure raises
    ValueError with the CLI's one line."""
    argv = globscope_command() + ["decode", study, "--at=" + ",".join(repr(float(v)) for v in point), "--json"]
    argv += [f"--out={out}"] if out else []
    argv += ["--force"] if force else []
    try:
        p = subprocess.run(argv, env=cli_environment(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ValueError(f"globscope decode gave no answer within {timeout} s") from None
    except OSError as exc:
        raise ValueError(f"cannot run {argv[0]}: {exc}") from None
    if p.returncode:
        lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
        raise ValueError(lines[-1] if lines else f"globscope decode failed (exit status {p.returncode})")
    return json.loads(p.stdout.strip().splitlines()[-1])


def decoded_message(info):
    """The one line the filter and the macro show."""
    trust = "trusted" if info["trusted"] else "UNTRUSTED"
    return (f"decoded loss {info['loss']:.6g}, landscape {info['landscape_loss']:.6g} ({trust}), accuracy "
            f"{info['accuracy']:.4f}, wrote {info['out']}")


def _field_string(data, name):
    a = data.GetFieldData().GetAbstractArray(name) if data is not None else None
    return str(a.GetValue(0)) if a is not None and a.GetNumberOfValues() else ""


def _point_array(data, name, value, cls=vtkDoubleArray):
    a = cls()
    a.SetName(name)
    a.InsertNextValue(value)
    data.GetPointData().AddArray(a)


@smproxy.filter(name="GlobScopeDecodePoint", label="GlobScope Decode Point")
@smhint.xml('<ShowInMenu category="GlobScope" />')
@smproperty.input(name="Input", port_index=0)
@smdomain.datatype(dataTypes=["vtkDataSet"], composite_data_supported=False)
class GlobScopeDecodePoint(VTKPythonAlgorithmBase):
    """Decodes the FIRST point of its input (a point picked on the study reader's landscape: Extract Selection)
    into a model file with `globscope decode`, and outputs that point with the decoded model's loss beside the
    landscape's value there. On the warped 2D surface z is the warp, so a 2D landscape uses x, y only. A refused
    point (off the grid, untrusted without Force) gives an empty output whose field data ``message`` says why."""

    def __init__(self):
        VTKPythonAlgorithmBase.__init__(self, nInputPorts=1, nOutputPorts=1, outputType="vtkPolyData")
        self._study, self._dim, self._out, self._force = "", 0, "", 0

    def FillInputPortInformation(self, port, info):
        info.Set(self.INPUT_REQUIRED_DATA_TYPE(), "vtkDataSet")
        return 1

    def _set(self, attr, value):
        if getattr(self, attr) != value:
            setattr(self, attr, value)
            self.Modified()

    @smproperty.stringvector(name="StudyDirectory", default_values="")
    @smdomain.xml('<Documentation>The study (its directory or study.h5). Empty: the one the GlobScope Study '
                  'Reader named in the input\'s field data (study_dir).</Documentation>')
    def SetStudyDirectory(self, value):
        self._set("_study", value or "")

    @smproperty.xml("""<IntVectorProperty name="Dimension" command="SetDimension" number_of_elements="1"
        default_values="0"><EnumerationDomain name="enum"><Entry value="0" text="From the landscape"/>
        <Entry value="2" text="2D"/><Entry value="3" text="3D"/></EnumerationDomain><Documentation>Which
        landscape the point belongs to; by default the one the input came from (its reducer, e.g. pca-2d).
        </Documentation></IntVectorProperty>""")
    def SetDimension(self, value):
        self._set("_dim", int(value))

    @smproperty.stringvector(name="OutputFile", default_values="")
    @smdomain.xml('<Documentation>Model file (.safetensors or .pt). Empty: STUDY/decoded/REDUCER-at-X_Y.safetensors.'
                  '</Documentation>')
    def SetOutputFile(self, value):
        self._set("_out", value or "")

    @smproperty.xml("""<IntVectorProperty name="Force" command="SetForce" number_of_elements="1" default_values="0">
        <BooleanDomain name="bool"/><Documentation>Decode an untrusted point too (beyond the hull of the
        encoded checkpoints).</Documentation></IntVectorProperty>""")
    def SetForce(self, value):
        self._set("_force", int(value))

    def RequestData(self, request, inInfo, outInfo):
        data = vtkDataObject.GetData(inInfo[0], 0)
        out = vtkDataObject.GetData(outInfo, 0)
        try:
            if data is None or data.GetNumberOfPoints() == 0:
                raise ValueError("the input has no point: select one on the landscape and Extract Selection")
            study = self._study or _field_string(data, "study_dir")
            if not study:
                raise ValueError("set StudyDirectory (the input does not come from the GlobScope Study Reader)")
            study = _study_dir(study)
            reducer = _field_string(data, "reducer")
            dim = self._dim or (3 if reducer.endswith("-3d") else 2)
            # float32 coordinates of a pick on the grid's edge: decode takes them (1e-6 of the range of slack)
            info = decode_point(study, data.GetPoint(0)[:dim], self._out, bool(self._force))
            pts = vtkPoints()
            pts.SetDataTypeToDouble()
            pts.InsertNextPoint(*(list(info["at"]) + [0.0] * (3 - len(info["at"]))))
            out.SetPoints(pts)
            verts = vtkCellArray()
            verts.InsertNextCell(1, [0])
            out.SetVerts(verts)
            _point_array(out, "loss_decoded", info["loss"])
            _point_array(out, "landscape_loss", info["landscape_loss"])
            _point_array(out, "accuracy_decoded", info["accuracy"])
            _point_array(out, "trusted", int(bool(info["trusted"])), vtkIntArray)
            _string_field(out, "model_file", info["out"])
            _string_field(out, "message", decoded_message(info))
            _say(f"GlobScope Decode Point: {decoded_message(info)}")
        except Exception as exc:  # noqa: BLE001 - a refused point is a message and an empty output, never a crash
            out.Initialize()
            message = " ".join(str(exc).split()) or type(exc).__name__
            _string_field(out, "message", message)
            _error("GlobScope Decode Point", message)
        return 1
