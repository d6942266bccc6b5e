"""VTK XML files for ParaView: image data (.vti), poly data (.vtp), unstructured grids (.vtu).

The only module of the core that imports pip ``vtk``. Files are written with inline binary data
(``SetDataModeToBinary``, zlib-compressed): Debian's ParaView 5.11 with an updated libexpat cannot
read the appended-data layout (shared/paraview.md). Every file is written to a temporary name and
renamed, so an interrupted write never leaves half a file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import GlobScopeError


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

    with atomic_file(path, suffix=ext, verify=_complete_xml) as tmp:
        w = getattr(io, writer_cls)()
        w.SetFileName(tmp)
        w.SetInputData(obj)
        w.SetDataModeToBinary()  # inline base64; never appended (see module docstring)
        w.SetCompressorTypeToZLib()
        quiet = core.vtkObject.GetGlobalWarningDisplay()
        core.vtkObject.GlobalWarningDisplayOff()  # VTK's own multi-line report of a full disk: we say it in one
        try:
            ok = w.Write()
        finally:
            core.vtkObject.SetGlobalWarningDisplay(quiet)
        if not ok:
            raise OSError(f"the VTK writer failed on {os.path.basename(tmp)}")


def _complete_xml(tmp: str) -> None:
    """A VTK XML file that was written to the end (VTK may not notice a full disk itself)."""
    with open(tmp, "rb") as fh:
        fh.seek(max(0, os.path.getsize(tmp) - 64))
        if b"</VTKFile>" not in fh.read():
            raise OSError(f"{os.path.basename(tmp)} is incomplete (no closing </VTKFile>)")


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
        if a.IsA("vtkStringArray"):
            vals = [a.GetValue(j) for j in range(a.GetNumberOfValues())]
            out[a.GetName()] = vals[0] if len(vals) == 1 else vals
        else:
            out[a.GetName()] = ns.vtk_to_numpy(a)
    return out


def read_vti(path: str) -> ImageField:
    """Read a .vti file; a clear GlobScopeError for a missing, unreadable or non-image file."""
    _, _, io, ns = _vtk()
    if not os.path.exists(path):
        raise GlobScopeError(f"{path}: file does not exist")
    with open(path, "rb") as fh:
        head = fh.read(512)
    if b"<VTKFile" not in head:
        raise GlobScopeError(f"{path}: not a VTK XML file")
    if b'type="ImageData"' not in head:
        kind = head.split(b'type="')[1].split(b'"')[0].decode(errors="replace") if b'type="' in head else "?"
        raise GlobScopeError(f"{path}: holds VTK {kind}, not image data (.vti)")
    r = io.vtkXMLImageDataReader()
    r.SetFileName(path)
    r.Update()
    img = r.GetOutput()
    if img is None or r.GetErrorCode() or img.GetNumberOfPoints() == 0:
        raise GlobScopeError(f"{path}: unreadable or empty image data")
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
    """Read .vtp/.vtu/.vti into a vtk data object (for tests and quick looks)."""
    _, _, io, _ = _vtk()
    readers = {".vtp": "vtkXMLPolyDataReader", ".vtu": "vtkXMLUnstructuredGridReader", ".vti": "vtkXMLImageDataReader"}
    ext = os.path.splitext(path)[1]
    if ext not in readers or not os.path.exists(path):
        raise GlobScopeError(f"{path}: not a readable .vtp/.vtu/.vti file")
    r = getattr(io, readers[ext])()
    r.SetFileName(path)
    r.Update()
    return r.GetOutput()


def arrays_of(data, where: str = "point") -> dict:
    """{name: numpy array} of a vtk data object's point or cell data."""
    _, _, _, ns = _vtk()
    d = data.GetPointData() if where == "point" else data.GetCellData()
    return {d.GetArrayName(i): ns.vtk_to_numpy(d.GetArray(i)) for i in range(d.GetNumberOfArrays())}
