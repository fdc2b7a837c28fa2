"""Readers for two research formats the real data sources come in (no extra dependency).

- InVesalius project files (``.inv3``): a gzip tar holding ``main.plist`` (an Apple property
  list naming the volume's file, dtype, shape and voxel spacing) and the raw voxels
  (``matrix.dat``, C order, no header).
- MetaImage (``.mha`` with the data in the same file, ``.mhd`` with ``ElementDataFile``
  naming a raw file next to it): ``Key = Value`` header lines up to ``ElementDataFile``,
  then the voxels, zlib-compressed when ``CompressedData = True``.

Both check the byte count against the declared shape and refuse volumes over ``MAX_VOXELS``
before reading them (a small compressed file can declare any size).
"""

from __future__ import annotations

import math
import plistlib
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

MAX_VOXELS = 2**29

_INV3_DTYPES = {"int16", "uint16", "int8", "uint8", "int32", "float32", "float64"}


@dataclass
class Inv3Volume:
    """``data`` is (Z, rows, cols) as stored; ``spacing`` (z, y, x) in mm."""

    data: np.ndarray
    spacing: tuple[float, float, float]
    modality: str
    name: str
    byte_order: str  # "<" or ">", as detected


def read_inv3(path: str | Path) -> Inv3Volume:
    """The image volume of an InVesalius ``.inv3`` project (masks and surfaces are ignored).

    ``main.plist`` gives ``matrix`` {``filename``, ``dtype``, ``shape`` (Z, rows, cols)} and
    ``spacing`` (x, y, z). The plist does not record the byte order (InVesalius writes a
    numpy memmap in the machine's order): little-endian is taken unless the values then fall
    outside the plist's ``scalar_range`` and big-endian ones do not.
    """
    with tarfile.open(path, "r:*") as tar:
        members = {PurePosixPath(m.name).name: m for m in tar.getmembers() if m.isfile()}
        if "main.plist" not in members:
            raise ValueError(f"{Path(path).name}: no main.plist (not an InVesalius project)")
        meta = plistlib.loads(tar.extractfile(members["main.plist"]).read())
        matrix = meta.get("matrix")
        if not isinstance(matrix, dict):
            raise ValueError("main.plist has no 'matrix' entry")
        dtype = str(matrix.get("dtype", ""))
        if dtype not in _INV3_DTYPES:
            raise ValueError(f"main.plist: unsupported matrix dtype '{dtype}'")
        shape = tuple(int(s) for s in matrix.get("shape", ()))
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"main.plist: expected a 3-D matrix shape, got {shape}")
        if math.prod(shape) > MAX_VOXELS:
            raise ValueError(f"main.plist declares {shape}, more than {MAX_VOXELS} voxels")
        name = PurePosixPath(str(matrix.get("filename", "matrix.dat"))).name
        if name not in members:
            raise ValueError(f"main.plist names '{name}', which the archive does not hold")
        expected = math.prod(shape) * np.dtype(dtype).itemsize
        if members[name].size != expected:
            raise ValueError(
                f"{name}: {members[name].size} bytes, expected {expected} for {dtype} {shape}"
            )
        raw = tar.extractfile(members[name]).read()
    spacing = [float(s) for s in meta.get("spacing", (math.nan,) * 3)]
    if len(spacing) != 3:
        raise ValueError(f"main.plist: expected 3 spacings, got {spacing}")
    order = "<"
    rng = meta.get("scalar_range")
    if np.dtype(dtype).itemsize > 1 and rng is not None and len(rng) == 2:
        lo, hi = float(rng[0]), float(rng[1])

        def fits(o: str) -> bool:
            a = np.frombuffer(raw, o + np.dtype(dtype).str[1:])
            return bool(lo <= a.min() and a.max() <= hi)

        if not fits("<") and fits(">"):
            order = ">"
    data = np.frombuffer(raw, order + np.dtype(dtype).str[1:]).reshape(shape)
    return Inv3Volume(
        data.astype(np.dtype(dtype).newbyteorder("=")),
        (spacing[2], spacing[1], spacing[0]),
        str(meta.get("modality", "")),
        str(meta.get("name", "")),
        order,
    )


_MET_TYPES = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG": "i4",
    "MET_ULONG": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


@dataclass
class MetaImage:
    """``data`` has the axes in reverse ``DimSize`` order ((Z,) Y, X), channels last when
    ``ElementNumberOfChannels`` > 1; ``spacing`` in the same order as ``data``'s axes."""

    data: np.ndarray
    spacing: tuple[float, ...]
    header: dict[str, str]


def read_metaimage(path: str | Path) -> MetaImage:
    """A MetaImage file (``.mha``, or ``.mhd`` + raw file), compressed or not."""
    path = Path(path)
    blob = path.read_bytes()
    header: dict[str, str] = {}
    pos = 0
    while True:
        end = blob.find(b"\n", pos)
        if end < 0:
            raise ValueError(f"{path.name}: no ElementDataFile line (not a MetaImage header)")
        line = blob[pos:end].decode("latin-1").strip()
        pos = end + 1
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path.name}: malformed header line '{line[:60]}'")
        header[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
        if len(header) > 200:
            raise ValueError(f"{path.name}: header too long (not a MetaImage file)")
    dims = [int(d) for d in header.get("DimSize", "").split()]
    if not dims or len(dims) != int(header.get("NDims", len(dims))) or min(dims) < 1:
        raise ValueError(f"{path.name}: bad DimSize '{header.get('DimSize')}'")
    etype = header.get("ElementType", "")
    if etype not in _MET_TYPES:
        raise ValueError(f"{path.name}: unsupported ElementType '{etype}'")
    channels = int(header.get("ElementNumberOfChannels", "1"))
    count = math.prod(dims) * channels
    if math.prod(dims) > MAX_VOXELS or channels < 1 or channels > 64:
        raise ValueError(f"{path.name}: declares {dims} x {channels} values, too many")
    msb = _true(header.get("BinaryDataByteOrderMSB", header.get("ElementByteOrderMSB")))
    dtype = np.dtype((">" if msb else "<") + _MET_TYPES[etype])
    datafile = header["ElementDataFile"]
    if datafile.upper() == "LOCAL":
        raw = blob[pos:]
    else:
        if " " in datafile or "%" in datafile or datafile.upper().startswith("LIST"):
            raise ValueError(f"{path.name}: multi-file ElementDataFile '{datafile}' not supported")
        target = (path.parent / datafile).resolve()
        if target.parent != path.parent.resolve():
            raise ValueError(f"{path.name}: ElementDataFile '{datafile}' is not next to it")
        raw = target.read_bytes()
    nbytes = count * dtype.itemsize
    if _true(header.get("CompressedData")):
        size = header.get("CompressedDataSize")
        if size is not None:
            raw = raw[: int(size)]
        inflater = zlib.decompressobj()
        raw = inflater.decompress(raw, nbytes)
    else:
        skip = int(header.get("HeaderSize", "0"))
        raw = raw[len(raw) - nbytes :] if skip == -1 else raw[max(skip, 0) :]
    if len(raw) < nbytes:
        raise ValueError(f"{path.name}: {len(raw)} bytes of data, expected {nbytes}")
    data = np.frombuffer(raw[:nbytes], dtype).astype(dtype.newbyteorder("="))
    shape = tuple(reversed(dims)) + ((channels,) if channels > 1 else ())
    spacing = header.get("ElementSpacing", header.get("ElementSize", ""))
    sp = [float(s) for s in spacing.split()] if spacing else [math.nan] * len(dims)
    return MetaImage(data.reshape(shape), tuple(reversed(sp)), header)
