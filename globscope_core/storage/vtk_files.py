"""VTK XML files for ParaView: image data (.vti), poly data (.vtp), unstructured grids (.vtu).

The only module of the core that imports pip ``vtk``. Files are written with inline binary data
(``SetDataModeToBinary``, zlib-compressed): Debian's ParaView 5.11 with an updated libexpat cannot
read the appended-data layout (shared/paraview.md). Every file is written to a temporary name and
renamed, so an interrupted write never leaves half a file.

Every file carries a checksum in its field data (``globscope_checksum``: BLAKE2 of its geometry, cells and
arrays, ``data_checksum``), so ParaView opens it unchanged; every read here checks it, and a damaged or
truncated file is one line naming it and the command that writes it again. Files written before checksums
are read with a one-line note. Sets of files (a merge tree's four) are written by ``safe_write.file_set``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import GlobScopeError
from . import study_files


def _vtk():
    # imported lazily: `globscope train` and the ParaView plugin never need pip vtk
    from vtkmodules import vtkCommonCore, vtkCommonDataModel, vtkIOXML  # noqa: F401
    from vtkmodules.util import numpy_support

    return vtkCommonCore, vtkCommonDataModel, vtkIOXML, numpy_support


def _to_vtk_array(name: str, values) -> object:
    _, _, _, ns = _vtk()
    a = np.ascontiguousarray(values)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if a.dtype.kind in "US":
        raise TypeError("use field data for strings")
    arr = ns.numpy_to_vtk(a.reshape(len(a), -1) if a.ndim > 1 else a, deep=True)
    arr.SetName(name)
    return arr


def _string_array(name: str, values) -> object:
    core, _, _, _ = _vtk()
    arr = core.vtkStringArray()
    arr.SetName(name)
    for v in ([values] if isinstance(values, str) else values):
        arr.InsertNextValue(str(v))
    return arr


def _add_field_data(obj, field_data: dict | None) -> None:
    for name, value in (field_data or {}).items():
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and value and isinstance(value[0], str)):
            obj.GetFieldData().AddArray(_string_array(name, value))
        else:
            obj.GetFieldData().AddArray(_to_vtk_array(name, np.atleast_1d(np.asarray(value))))


def _write(writer_cls, obj, path: str) -> None:
    core, _, io, _ = _vtk()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    ext = os.path.splitext(path)[1]
    from .safe_write import atomic_file

    digest = data_checksum(obj)
    obj.GetFieldData().RemoveArray(CHECKSUM)
    obj.GetFieldData().AddArray(_string_array(CHECKSUM, digest))

    def reads_back(tmp):  # the whole file, as every reader will see it, before it replaces the old one
        _complete_xml(tmp)
        try:
            got = _read_xml(tmp)
        except GlobScopeError as exc:
            raise OSError(errno.EIO, f"{os.path.basename(tmp)} does not read back ({exc})") from None
        if stored_checksum(got) != digest or data_checksum(got) != digest:
            raise OSError(errno.EIO, f"{os.path.basename(tmp)} does not read back (checksum mismatch)")

    with atomic_file(path, suffix=ext, verify=reads_back) as tmp:
        w = getattr(io, writer_cls)()
        # into memory, then to disk by Python: VTK's XML writer crashes (SIGSEGV) on a disk that fills while
        # it writes, where Python raises ENOSPC (one line, and the old file stays)
        w.WriteToOutputStringOn()
        w.SetInputData(obj)
        w.SetDataModeToBinary()  # inline base64; never appended (see module docstring)
        w.SetCompressorTypeToZLib()
        quiet = core.vtkObject.GetGlobalWarningDisplay()
        core.vtkObject.GlobalWarningDisplayOff()
        try:
            ok = w.Write()
        finally:
            core.vtkObject.SetGlobalWarningDisplay(quiet)
        if not ok:
            raise OSError(f"the VTK writer failed on {os.path.basename(tmp)}")
        with open(tmp, "wb") as fh:
            fh.write(w.GetOutputString().encode("ascii"))  # inline base64 and XML: ASCII
            fh.flush()
            os.fsync(fh.fileno())


def _complete_xml(tmp: str) -> None:
    """A VTK XML file that was written to the end (VTK may not notice a full disk itself)."""
    if not _ends_complete(tmp):
        raise OSError(f"{os.path.basename(tmp)} is incomplete (no closing </VTKFile>)")


def _ends_complete(path: str) -> bool:
    with open(path, "rb") as fh:
        fh.seek(max(0, os.path.getsize(path) - 64))
        return b"</VTKFile>" in fh.read()


# --- checksums ------------------------------------------------------------------------------------
CHECKSUM = "globscope_checksum"  # field data array: "blake2b:<hex>" of the data (data_checksum)
_READERS = {".vti": "vtkXMLImageDataReader", ".vtp": "vtkXMLPolyDataReader", ".vtu": "vtkXMLUnstructuredGridReader"}


def data_checksum(obj) -> str:
    """BLAKE2 of what a VTK data object holds, but the checksum itself: its type, geometry (extent, origin,
    spacing, direction; or points), cells, and point, cell and field arrays (names, types, shapes, values).

    Computed on the object, so the same data gives the same checksum whatever the file's encoding; numpy and
    VTK only, so ParaView's own Python can check a file too.
    """
    core, _, _, ns = _vtk()
    h = hashlib.blake2b(digest_size=16)

    def add(tag, values=None):
        h.update(tag.encode() + b"\0")
        if values is not None:
            a = np.ascontiguousarray(values)
            a = a.astype(a.dtype.newbyteorder("<"))  # one byte order: the same data, the same checksum
            h.update(f"{a.dtype.str}{a.shape}".encode() + a.tobytes())

    def add_array(a):
        if a.IsA("vtkStringArray"):
            add(f"{a.GetName()}:str", np.frombuffer("\0".join(a.GetValue(i) for i in range(a.GetNumberOfValues()))
                                                     .encode(), np.uint8))
        elif a.IsA("vtkDataArray"):
            add(f"{a.GetName()}:{a.GetNumberOfComponents()}", ns.vtk_to_numpy(a))
        else:
            add(f"{a.GetName()}:{a.GetClassName()}:{a.GetNumberOfValues()}")

    def add_cells(tag, cells):
        n = cells.GetNumberOfCells() if cells is not None else 0
        add(f"{tag}:{n}")
        if n:
            add(tag, ns.vtk_to_numpy(cells.GetConnectivityArray()).astype(np.int64))
            add(tag, ns.vtk_to_numpy(cells.GetOffsetsArray()).astype(np.int64))

    add(obj.GetClassName())
    if obj.IsA("vtkImageData"):
        m = obj.GetDirectionMatrix()
        add("image", np.array(obj.GetExtent(), np.int64))
        add("image", np.array(obj.GetOrigin() + obj.GetSpacing(), np.float64))
        add("image", np.array([m.GetElement(i, j) for i in range(3) for j in range(3)], np.float64))
    if obj.IsA("vtkPointSet"):
        pts = obj.GetPoints()
        add("points", None if pts is None else ns.vtk_to_numpy(pts.GetData()))
    if obj.IsA("vtkPolyData"):
        for tag, cells in (("verts", obj.GetVerts()), ("lines", obj.GetLines()), ("polys", obj.GetPolys()),
                           ("strips", obj.GetStrips())):
            add_cells(tag, cells)
    if obj.IsA("vtkUnstructuredGrid"):
        add_cells("cells", obj.GetCells())
        if obj.GetNumberOfCells():  # VTK 9.6 renamed GetCellTypesArray (ParaView 5.11 has VTK 9.2)
            new = (core.vtkVersion.GetVTKMajorVersion(), core.vtkVersion.GetVTKMinorVersion()) >= (9, 6)
            add("types", ns.vtk_to_numpy(obj.GetCellTypes() if new else obj.GetCellTypesArray()).astype(np.uint8))
    for tag, data in (("point", obj.GetPointData()), ("cell", obj.GetCellData()), ("field", obj.GetFieldData())):
        arrays = [data.GetAbstractArray(i) for i in range(data.GetNumberOfArrays())]
        arrays = sorted((a for a in arrays if a is not None and a.GetName() != CHECKSUM), key=lambda a: a.GetName() or "")
        add(f"{tag}:{len(arrays)}")
        for a in arrays:
            add_array(a)
    return "blake2b:" + h.hexdigest()


def stored_checksum(obj) -> str | None:
    """The checksum a file's data object carries (None: written before checksums, or not by GlobScope)."""
    a = obj.GetFieldData().GetAbstractArray(CHECKSUM)
    return a.GetValue(0) if a is not None and a.IsA("vtkStringArray") and a.GetNumberOfValues() else None


def rerun_hint(path: str) -> str:
    """The command that writes ``path`` again (a study's landscapes, trajectories, merge trees, connect views)."""
    name = os.path.basename(path)
    parent = os.path.dirname(os.path.abspath(path))
    m = re.fullmatch(r"(?:landscape|trajectories)-([23])d\.(?:vti|vtp)", name)
    if m:
        reducer = "NAME"
        with contextlib.suppress(OSError, ValueError, LookupError, TypeError):
            with open(study_files.report_json(parent)) as fh:
                reducer = json.load(fh)[f"landscape-{m[1]}d"]["reducer"]
        return f"rerun `globscope landscape {parent} --reducer {reducer}`"
    m = re.fullmatch(r"topology-([23])d", os.path.basename(parent))
    if m and name in study_files.TOPOLOGY_FILES:
        return f"rerun `globscope topology {os.path.dirname(parent)} --dim {m[1]}`"
    m = re.fullmatch(r"connect-(\w+)-(\w+)-(?:2d|3d|plane)\.(?:vti|vtp)", name)
    if m:
        return f"rerun `globscope connect {parent} --runs {m[1]} {m[2]}`"
    return "write it again"


class DamagedFileError(GlobScopeError):
    """A file that is there but cannot be trusted: truncated, unreadable, or its checksum does not match."""


def _damaged(path: str, why: str) -> DamagedFileError:
    return DamagedFileError(f"{path} is damaged ({why}): {rerun_hint(path)}")


def _read_xml(path: str):
    """The data object of a VTK XML file, its checksum checked; a missing, truncated, unreadable or damaged file
    is one GlobScopeError (VTK's own multi-line error log is caught, not printed)."""
    core, _, io, _ = _vtk()
    ext = os.path.splitext(path)[1]
    if ext not in _READERS:
        raise GlobScopeError(f"{path}: not a .vtp, .vtu or .vti file")
    if not os.path.isfile(path):
        raise GlobScopeError(f"{path}: file does not exist")
    if not _ends_complete(path):
        raise _damaged(path, "truncated: no closing </VTKFile>")
    log = core.vtkStringOutputWindow()
    window = core.vtkOutputWindow.GetInstance()
    verbosity = core.vtkLogger.GetCurrentVerbosityCutoff()
    core.vtkOutputWindow.SetInstance(log)
    core.vtkLogger.SetStderrVerbosity(core.vtkLogger.VERBOSITY_OFF)
    try:
        r = getattr(io, _READERS[ext])()
        r.SetFileName(path)
        r.Update()
    finally:
        core.vtkOutputWindow.SetInstance(window)
        core.vtkLogger.SetStderrVerbosity(verbosity)
    out = r.GetOutputDataObject(0)
    # VTK's errors, each "ERROR: In FILE, line N" and "CLASS (0xADDR): message". Not counted: the cached range
    # of an array with inf in it, which VTK writes and cannot read back (metadata; the checksum covers the data)
    errors = [re.sub(r"^\w+ \(0x[0-9a-fA-F]+\): ", "", block.split("\n", 1)[1].strip())
              for block in log.GetOutput().split("\n\n") if block.strip().startswith("ERROR:") and "\n" in block.strip()]
    errors = [e for e in errors if "Error reading InformationKey" not in e]
    if errors or r.GetErrorCode() or out is None:
        reason = errors[0].splitlines()[0] if errors else f"VTK error code {r.GetErrorCode()}"
        raise _damaged(path, f"unreadable: {reason.rstrip('.')}")
    verify(path, out)
    return out


def verify(path: str, obj) -> None:
    """Check the checksum of ``obj``, read from ``path``: a mismatch is one line; none (an older file) a note."""
    stored = stored_checksum(obj)
    if stored is None:
        from .safe_write import note

        note(f"{path} has no checksum (written before checksums, or not by GlobScope): read unchecked")
    elif stored != data_checksum(obj):
        raise _damaged(path, "checksum mismatch")


def verify_views(study_dir: str, views) -> None:
    """Read and check every VTK file the study's ``views`` show (before pvbatch, whose readers check nothing):
    landscapes, trajectories, merge trees (all four files or none) and connect's paths and planes."""
    files = []
    for view in views:
        if view == study_files.PLANE_VIEW:
            vti = study_files.newest_plane(study_dir)
            files += [vti, study_files.plane_paths(vti)] if vti else []
            continue
        dim = study_files.VIEWS[view]
        tree = study_files.topology_files(study_files.topology_dir(study_dir, dim))
        missing = [os.path.basename(p) for p in tree if not os.path.exists(p)]
        if 0 < len(missing) < len(tree):
            raise GlobScopeError(f"{study_files.topology_dir(study_dir, dim)} is incomplete (no {', '.join(missing)}): "
                                 f"rerun `globscope topology {study_dir} --dim {dim}`")
        files += study_files.view_files(study_dir, dim) + study_files.connect_files(study_dir, f"{dim}d")
    for path in dict.fromkeys(files):
        if os.path.exists(path):
            _read_xml(path)


# --- image data -----------------------------------------------------------------------------------
@dataclass
class ImageField:
    """A regular grid: ``dims`` (nx, ny, nz), point arrays flattened in VTK order (x fastest)."""

    dims: tuple
    origin: tuple
    spacing: tuple
    point_arrays: dict = field(default_factory=dict)
    field_data: dict = field(default_factory=dict)
    active_scalars: str | None = None

    def grid(self, name: str) -> np.ndarray:
        """A point array as a C-order numpy array of shape (nz, ny, nx)."""
        nx, ny, nz = self.dims
        return np.asarray(self.point_arrays[name]).reshape(nz, ny, nx)

    def point_coordinates(self) -> np.ndarray:
        """Coordinates of every point [nx*ny*nz, 3], in VTK point order."""
        nx, ny, nz = self.dims
        k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
        ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], 1).astype(np.float64)
        return np.asarray(self.origin) + ijk * np.asarray(self.spacing)


def write_vti(path: str, f: ImageField) -> None:
    _, dm, _, _ = _vtk()
    img = dm.vtkImageData()
    img.SetDimensions(*[int(d) for d in f.dims])
    img.SetOrigin(*[float(o) for o in f.origin])
    img.SetSpacing(*[float(s) for s in f.spacing])
    n = int(np.prod(f.dims))
    for name, values in f.point_arrays.items():
        values = np.asarray(values)
        if values.size % n:
            raise ValueError(f"point array {name} has {values.size} values for {n} points")
        a = values.reshape(n, -1)  # grids (nz, ny, nx) or flat arrays; components last
        img.GetPointData().AddArray(_to_vtk_array(name, a[:, 0] if a.shape[1] == 1 else a))
    if f.active_scalars:
        img.GetPointData().SetActiveScalars(f.active_scalars)
    _add_field_data(img, f.field_data)
    _write("vtkXMLImageDataWriter", img, path)


def _field_data_dict(obj) -> dict:
    _, _, _, ns = _vtk()
    out = {}
    fd = obj.GetFieldData()
    for i in range(fd.GetNumberOfArrays()):
        a = fd.GetAbstractArray(i)
        if a.GetName() == CHECKSUM:  # of this file's data only: never passed on
            continue
        if a.IsA("vtkStringArray"):
            vals = [a.GetValue(j) for j in range(a.GetNumberOfValues())]
            out[a.GetName()] = vals[0] if len(vals) == 1 else vals
        else:
            out[a.GetName()] = ns.vtk_to_numpy(a)
    return out


def field_data_of(data) -> dict:
    """{name: value} of a vtk data object's field data (strings as str, numbers as numpy), without the checksum."""
    return _field_data_dict(data)


def read_vti(path: str) -> ImageField:
    """Read a .vti file, its checksum checked; a clear GlobScopeError for a missing, damaged or non-image file."""
    _, _, _, ns = _vtk()
    if not os.path.exists(path):
        raise GlobScopeError(f"{path}: file does not exist")
    with open(path, "rb") as fh:
        head = fh.read(512)
    ours = bool(re.fullmatch(r"(?:landscape-[23]d|segmentation|connect-.+-plane)\.vti", os.path.basename(path)))
    if b"<VTKFile" not in head:
        raise _damaged(path, "not VTK XML") if ours else GlobScopeError(f"{path}: not a VTK XML file")
    if b'type="ImageData"' not in head:
        kind = head.split(b'type="')[1].split(b'"')[0].decode(errors="replace") if b'type="' in head else "?"
        raise (_damaged(path, f"holds VTK {kind}, not image data") if ours
               else GlobScopeError(f"{path}: holds VTK {kind}, not image data (.vti)"))
    img = _read_xml(path)
    if not img.IsA("vtkImageData") or img.GetNumberOfPoints() == 0:
        raise GlobScopeError(f"{path}: empty image data")
    pd = img.GetPointData()
    arrays = {pd.GetArrayName(i): ns.vtk_to_numpy(pd.GetArray(i)) for i in range(pd.GetNumberOfArrays())
              if pd.GetArray(i) is not None}
    active = pd.GetScalars().GetName() if pd.GetScalars() is not None else None
    return ImageField(tuple(img.GetDimensions()), tuple(img.GetOrigin()), tuple(img.GetSpacing()), arrays,
                      _field_data_dict(img), active)


# --- poly data and unstructured grids -----------------------------------------------------------
def _points(points):
    core, _, _, ns = _vtk()
    pts = core.vtkPoints()
    p = np.asarray(points)
    # float32 points stay float32 (TTK's outputs have them); anything else is written as float64
    p = np.ascontiguousarray(p.astype(np.float32 if p.dtype == np.float32 else np.float64).reshape(-1, 3))
    pts.SetData(ns.numpy_to_vtk(p, deep=True))
    return pts


def _cell_array(cells) -> object:
    _, dm, _, _ = _vtk()
    ca = dm.vtkCellArray()
    for c in cells:
        ca.InsertNextCell(len(c), [int(v) for v in c])
    return ca


def _add_arrays(data, arrays: dict | None):
    for name, values in (arrays or {}).items():
        data.AddArray(_to_vtk_array(name, np.asarray(values)))


def write_vtp(path: str, points, lines=(), verts=(), point_arrays=None, cell_arrays=None, field_data=None) -> None:
    """Poly data: ``lines`` and ``verts`` are lists of point-index sequences (cells: verts first)."""
    _, dm, _, _ = _vtk()
    pd = dm.vtkPolyData()
    pd.SetPoints(_points(points))
    if len(verts):
        pd.SetVerts(_cell_array(verts))
    if len(lines):
        pd.SetLines(_cell_array(lines))
    _add_arrays(pd.GetPointData(), point_arrays)
    _add_arrays(pd.GetCellData(), cell_arrays)
    _add_field_data(pd, field_data)
    _write("vtkXMLPolyDataWriter", pd, path)


VTK_VERTEX, VTK_LINE = 1, 3


def write_vtu(path: str, points, cell_types, cells, point_arrays=None, cell_arrays=None, field_data=None) -> None:
    """Unstructured grid: ``cells`` a list of point-index sequences, ``cell_types`` VTK cell type codes."""
    _, dm, _, _ = _vtk()
    ug = dm.vtkUnstructuredGrid()
    ug.SetPoints(_points(points))
    ug.Allocate(len(cells))
    for t, c in zip(cell_types, cells):
        ug.InsertNextCell(int(t), len(c), [int(v) for v in c])
    _add_arrays(ug.GetPointData(), point_arrays)
    _add_arrays(ug.GetCellData(), cell_arrays)
    _add_field_data(ug, field_data)
    _write("vtkXMLUnstructuredGridWriter", ug, path)


def read_any(path: str):
    """Read .vtp/.vtu/.vti into a vtk data object, its checksum checked (quick looks, basins, tests)."""
    if os.path.splitext(path)[1] not in _READERS or not os.path.exists(path):
        raise GlobScopeError(f"{path}: not a readable .vtp/.vtu/.vti file")
    return _read_xml(path)


def arrays_of(data, where: str = "point") -> dict:
    """{name: numpy array} of a vtk data object's point or cell data."""
    _, _, _, ns = _vtk()
    d = data.GetPointData() if where == "point" else data.GetCellData()
    return {d.GetArrayName(i): ns.vtk_to_numpy(d.GetArray(i)) for i in range(d.GetNumberOfArrays())}
