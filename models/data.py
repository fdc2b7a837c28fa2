"""Training data from hospital archives: DICOM series, NIfTI volumes, NPY and PNG stacks.

A folder is scanned into :class:`Volume` objects (one per DICOM series, NIfTI file or NPY
stack), each a ``(Z, H, W)`` array with its modality and voxel spacing. Volumes are split
into training and validation sets *by volume* (never by slice, so neighbouring slices of one
patient cannot leak across), sliced along a chosen axis, mapped to the model's [0, 1] range
and fitted to the model size:

- CT (DICOM Modality CT, or a NIfTI/NPY volume whose values reach below −500, i.e. HU):
  HU from RescaleSlope/Intercept, then :class:`models.io.HUMapping`, x = (HU + 1000) / 4000.
- MR and other magnitudes: divided by the volume's 99.5th percentile (of voxels above 1 % of
  its maximum, so the background does not set the scale), clipped to [0, 1].
- Images already in [0, 1] (NPY) are kept; other NPY/PNG ranges are min-max scaled.

Unreadable or inconsistent files are skipped: the log counts them (file names can carry
patient names), the :class:`ScanReport` names each with its reason; nothing in a folder
makes the scan fail.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from models.io import HUMapping, fit_square

log = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima", ""}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MR_PERCENTILE = 99.5
MAX_VOXELS = 2**29  # one volume read for training: at most 2 GiB as float32
HU = HUMapping()


@dataclass
class Volume:
    """One series or volume: ``data`` is (Z, H, W), HU for CT, raw magnitude otherwise."""

    id: str
    source: str
    modality: str
    data: np.ndarray
    spacing: tuple[float, float, float]  # (z, y, x) in mm; nan where unknown
    files: list[str] = field(default_factory=list)

    def describe(self, root: Path | None = None) -> str:
        """One line: source, modality, shape, spacing, range and id; a file id under
        ``root`` is given relative to it (an upload's report names the archive's own paths,
        not the server's folders)."""
        z, h, w = self.data.shape
        ident = self.id
        if root is not None and Path(self.id).is_relative_to(root):
            ident = str(Path(self.id).relative_to(root))
        sp = ", ".join("?" if math.isnan(s) else f"{s:.2f}" for s in self.spacing)
        rng = f"{float(self.data.min()):.0f}..{float(self.data.max()):.0f}"
        unit = "HU" if self.modality == "CT" else "a.u."
        return (
            f"{self.source:5s} {self.modality:2s} {z}x{h}x{w} spacing ({sp}) mm "
            f"range {rng} {unit}  {ident}"
        )


@dataclass
class ScanReport:
    volumes: list[Volume]
    skipped: list[tuple[str, str]]  # (file, reason)

    def summary(self) -> str:
        lines = [f"{len(self.volumes)} volume(s), {len(self.skipped)} file(s) skipped"]
        lines += ["  " + v.describe() for v in self.volumes]
        lines += [f"  skipped {f}: {why}" for f, why in self.skipped]
        return "\n".join(lines)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def scan(directory: str | Path) -> ScanReport:
    """Every volume under ``directory`` (recursively), with the files that were skipped."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--data: '{directory}' is not a directory")
    volumes: list[Volume] = []
    skipped: list[tuple[str, str]] = []
    dicom_files: list[Path] = []
    real_root = root.resolve()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if path.is_symlink() or real_root not in path.resolve().parents:
            # A link could make a training run read any file the server can (another
            # tenant's results, the environment): only files inside the folder are read.
            skipped.append((str(path), "a link (only regular files inside the folder are read)"))
            continue
        try:
            if _is_nifti(path):
                volumes.append(read_nifti(path))
            elif suffix == ".npy":
                volumes.append(_read_npy(path))
            elif suffix == ".png":
                volumes.append(_read_png(path))
            elif suffix in DICOM_SUFFIXES:
                dicom_files.append(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, not fatal
            skipped.append((str(path), f"{type(exc).__name__}: {exc}"))
    series, bad = read_dicom_series(dicom_files)
    volumes += series
    skipped += bad
    if skipped:
        # A count, not the names: the folders of medical exports are often named after the
        # patient. The report (``skipped``) names each file for whoever asked for the scan.
        log.warning("skipped %d unreadable or inconsistent file(s)", len(skipped))
    return ScanReport(volumes, skipped)


def _position(ds) -> float | None:
    """Slice position along the normal of the image plane (for sorting a series)."""
    pos, iop = (
        getattr(ds, "ImagePositionPatient", None),
        getattr(ds, "ImageOrientationPatient", None),
    )
    if pos is None or iop is None:
        return None
    normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
    return float(np.dot(normal, np.array(pos, float)))


class _Header(NamedTuple):
    shape: tuple[int, int]
    position: float | None
    instance: int
    slope: float
    intercept: float


def _header(ds) -> _Header:
    """The header values a series needs from one file; a value that does not parse raises
    (the file is then skipped, not the scan)."""
    return _Header(
        (int(ds.Rows), int(ds.Columns)),
        _position(ds),
        int(getattr(ds, "InstanceNumber", 0) or 0),
        float(getattr(ds, "RescaleSlope", 1.0) or 1.0),
        float(getattr(ds, "RescaleIntercept", 0.0) or 0.0),
    )


def _number(value, default: float = math.nan) -> float:
    """A DICOM decimal string as float; ``default`` when absent or malformed."""
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def read_dicom_series(files: list[Path]) -> tuple[list[Volume], list[tuple[str, str]]]:
    """Group DICOM files by SeriesInstanceUID, sort by position, convert to HU.

    Files that are not DICOM, have no pixel data, no series UID or a malformed header value,
    or whose size differs from the rest of their series, are skipped with the reason. A
    missing RescaleSlope or RescaleIntercept is taken as 1 or 0 (stored values are then HU).
    """
    groups: dict[str, list[tuple[Path, pydicom.Dataset, _Header]]] = defaultdict(list)
    skipped: list[tuple[str, str]] = []
    for path in files:
        try:
            ds = pydicom.dcmread(str(path))
        except Exception as exc:  # noqa: BLE001
            skipped.append((str(path), f"not readable as DICOM ({type(exc).__name__})"))
            continue
        if "PixelData" not in ds:
            skipped.append((str(path), "no pixel data"))
            continue
        uid = getattr(ds, "SeriesInstanceUID", None)
        if not uid:
            skipped.append((str(path), "no SeriesInstanceUID"))
            continue
        try:
            header = _header(ds)
        except Exception as exc:  # noqa: BLE001 - any malformed value skips this file only
            skipped.append((str(path), f"malformed header value ({type(exc).__name__})"))
            continue
        groups[str(uid)].append((path, ds, header))
    volumes = []
    for uid, members in groups.items():
        shapes = [header.shape for _, _, header in members]
        common = max(set(shapes), key=shapes.count)
        kept = []
        for path, ds, header in members:
            if header.shape != common:
                why = f"size {header.shape} differs from its series' {common}"
                skipped.append((str(path), why))
            else:
                kept.append((path, ds, header))
        positions = [header.position for _, _, header in kept]
        if all(p is not None for p in positions):
            order = np.argsort(positions)
        else:
            order = np.argsort([header.instance for _, _, header in kept])
        kept = [kept[i] for i in order]
        slices, paths = [], []
        for path, ds, header in kept:
            try:
                arr = ds.pixel_array.astype(np.float32)
            except Exception as exc:  # noqa: BLE001 - e.g. a codec that is not installed
                skipped.append((str(path), f"pixel data not decodable ({exc})"))
                continue
            arr = arr * header.slope + header.intercept
            slices.extend(arr if arr.ndim == 3 else [arr])
            paths.append(str(path))
        if not slices:
            continue
        first = kept[0][1]
        spacing = getattr(first, "PixelSpacing", None)
        pixel = [_number(v) for v in spacing] if spacing and len(spacing) == 2 else [math.nan] * 2
        ordered = sorted(p for p in positions if p is not None)
        dz = (
            float(np.median(np.diff(ordered)))
            if len(ordered) > 1
            else _number(getattr(first, "SliceThickness", None))
        )
        volumes.append(
            Volume(
                id=uid,
                source="dicom",
                modality=str(getattr(first, "Modality", "OT")),
                data=np.stack(slices),
                spacing=(dz, pixel[0], pixel[1]),
                files=paths,
            )
        )
    return volumes, skipped


def _guess_modality(data: np.ndarray) -> str:
    return "CT" if float(data.min()) < -500 else "MR"


def read_nifti(path: str | Path) -> Volume:
    """A NIfTI volume as (Z, Y, X) with the header's voxel sizes (nibabel)."""
    import nibabel as nib

    img = nib.load(str(path))
    shape = tuple(img.shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"expected a 3-D volume, got shape {shape}")
    if math.prod(shape[:3]) > MAX_VOXELS:
        # Checked before reading: a small .nii.gz can declare (and inflate to) any size.
        raise ValueError(f"declares {shape[:3]} voxels, more than {MAX_VOXELS} per volume")
    # The first volume of a 4-D series only: the others are never read or inflated.
    data = np.asarray(img.dataobj[..., 0] if len(shape) == 4 else img.dataobj, np.float32)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    vol = np.ascontiguousarray(np.transpose(data, (2, 1, 0))[:, ::-1, :])  # (k, j, i), j up
    return Volume(
        str(path), "nifti", _guess_modality(vol), vol, (zooms[2], zooms[1], zooms[0]), [str(path)]
    )


def write_nifti(
    path: str | Path,
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    dtype=None,
    z0: int = 0,
) -> None:
    """Write a (Z, Y, X) volume (Y up, as :func:`read_nifti` returns it) so that
    :func:`read_nifti` reads it back unchanged; ``spacing`` is (z, y, x) in mm and ``z0`` the
    index of its first slice in a larger volume (kept in the affine's offset)."""
    import nibabel as nib

    data = np.transpose(np.asarray(volume)[:, ::-1, :], (2, 1, 0))
    if dtype is not None:
        data = data.astype(dtype)
    dz, dy, dx = (float(s) for s in spacing)
    affine = np.diag([dx, dy, dz, 1.0])
    affine[2, 3] = z0 * dz
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_zooms((dx, dy, dz))
    nib.save(img, str(path))


def _read_npy(path: Path) -> Volume:
    arr = np.load(path, allow_pickle=False)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"expected a real 2-D image or 3-D stack, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("contains NaN or Inf")
    modality = "CT" if float(arr.min()) < -500 else "OT"
    nan = math.nan
    return Volume(str(path), "npy", modality, arr, (nan, nan, nan), [str(path)])


def _read_png(path: Path) -> Volume:
    from PIL import Image

    arr = np.asarray(Image.open(path).convert("L"), dtype=np.float32)[None]
    nan = math.nan
    return Volume(str(path), "png", "OT", arr, (nan, nan, nan), [str(path)])


def mr_scale(values: np.ndarray) -> float:
    """An MR magnitude's unit: the ``MR_PERCENTILE`` percentile of its foreground (values
    above 1 % of the maximum); 1 where there is none. Training volumes are divided by it
    (:func:`to_unit`), and so is each measurement before the prior sees it
    (:func:`models.inverse.intensity_scale`)."""
    v = np.asarray(values, np.float64)
    fg = v[v > 0.01 * float(v.max())] if v.size else v
    return float(np.percentile(fg, MR_PERCENTILE)) if fg.size else 1.0


def to_unit(volume: Volume, hu: HUMapping = HU) -> np.ndarray:
    """The volume in the model's [0, 1] range (see the module docstring for each modality)."""
    data = volume.data
    if volume.modality == "CT":
        return hu.to_unit(data).astype(np.float32)
    if volume.modality == "MR":
        return np.clip(data / max(mr_scale(data), 1e-12), 0, 1).astype(np.float32)
    lo, hi = float(data.min()), float(data.max())
    if lo >= 0 and hi <= 1:
        return data.astype(np.float32)
    return ((data - lo) / max(hi - lo, 1e-12)).astype(np.float32)


def slices(volume: np.ndarray, axis: int = 0) -> np.ndarray:
    """2-D slices of a (Z, H, W) array along ``axis`` (0 axial, 1 coronal, 2 sagittal for
    the usual orientation), displayed with the first remaining axis pointing up."""
    if axis not in (0, 1, 2):
        raise ValueError("axis must be 0, 1 or 2")
    moved = np.moveaxis(volume, axis, 0)
    return moved if axis == 0 else moved[:, ::-1, :]


def split_by_volume(
    volumes: list[Volume], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Volume], list[Volume]]:
    """Whole volumes go to validation (at least one when there are two or more and
    ``val_fraction`` > 0)."""
    if not 0 <= val_fraction < 1:
        raise ValueError("val_fraction must be in [0, 1)")
    ids = sorted(range(len(volumes)), key=lambda i: volumes[i].id)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = (
        0 if len(volumes) < 2 or val_fraction == 0 else max(1, round(val_fraction * len(volumes)))
    )
    val_idx = {ids[p] for p in perm[:n_val]}
    train = [v for i, v in enumerate(volumes) if i not in val_idx]
    val = [v for i, v in enumerate(volumes) if i in val_idx]
    return train, val


def _to_tensor(
    volumes: list[Volume], size: int, axes: tuple[int, ...], min_fg: float
) -> torch.Tensor:
    out = []
    for vol in volumes:
        unit = to_unit(vol)
        for axis in axes:
            if unit.shape[axis] < 1 or (axis and unit.shape[0] == 1):
                continue  # a single 2-D image has no coronal/sagittal slices
            for sl in slices(unit, axis):
                if float((sl > 0.05).mean()) < min_fg:
                    continue  # (almost) empty slice: the ends of a volume
                out.append(fit_square(sl.astype(np.float64), size))
    if not out:
        return torch.empty(0, 1, size, size)
    return torch.from_numpy(np.stack(out).astype(np.float32))[:, None]


@dataclass
class Dataset:
    train: torch.Tensor  # (N, 1, size, size) in [0, 1]
    val: torch.Tensor
    report: ScanReport
    train_volumes: list[str]
    val_volumes: list[str]


def load_dataset(
    directory: str | Path,
    size: int,
    axes: tuple[int, ...] = (0,),
    val_fraction: float = 0.1,
    seed: int = 0,
    min_foreground: float = 0.02,
) -> Dataset:
    """Scan, split by volume, slice, normalise and resize: the training set of a folder."""
    report = scan(directory)
    if not report.volumes:
        raise ValueError(
            f"--data: no readable DICOM, NIfTI, NPY or PNG images in '{directory}' "
            f"({len(report.skipped)} file(s) skipped)"
        )
    train, val = split_by_volume(report.volumes, val_fraction, seed)
    return Dataset(
        _to_tensor(train, size, axes, min_foreground),
        _to_tensor(val, size, axes, min_foreground),
        report,
        [v.id for v in train],
        [v.id for v in val],
    )


LOW_RES_NOISE = 0.03  # the coarsened images' noise std at most, in the prior's [0, 1] unit


def augment(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    flip: bool = True,
    max_rotation_deg: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    intensity: float = 0.05,
    max_zoom: float | None = None,
    low_res: float | None = None,
    max_noise: float = LOW_RES_NOISE,
) -> torch.Tensor:
    """Random left-right flips, small rotations and scalings (zero, i.e. air, outside), and a
    multiplicative intensity jitter of ±``intensity``; one draw per image.

    With ``max_zoom``, half the images are instead magnified by a factor log-uniform between
    ``scale[1]`` and ``max_zoom``: close-ups whose anatomy fills and leaves the field of view,
    and, being interpolated, are no sharper than a low-resolution scan; half of those end in
    empty bands along the columns (:func:`_margins`).

    With ``low_res``, half the images (drawn apart from the close-ups) are seen as a scanner
    with coarser voxels and one acquisition would see them: averaged down by a factor
    log-uniform in [1.5, ``low_res``], given Gaussian noise of std uniform in [0,
    ``max_noise``] at that resolution, and interpolated back (bilinear), as a viewer or our
    own loader (:func:`models.realdata.real_slices`) resamples a coarse volume. The shipped
    templates are averages of many scans: sharp and noise-free, unlike a single coarse scan.
    """
    b = x.shape[0]
    u = torch.rand(b, 5, generator=generator)
    angle = (2 * u[:, 0] - 1) * math.radians(max_rotation_deg)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 1]
    if max_zoom is not None and max_zoom > scale[1]:
        close = (scale[1] * (max_zoom / scale[1]) ** u[:, 1]).to(s.dtype)
        s = torch.where(u[:, 4] < 0.5, close, s)
    sign = torch.where((u[:, 2] < 0.5) & flip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack(
        [
            torch.stack([cos * sign, -sin, torch.zeros(b)], 1),
            torch.stack([sin * sign, cos, torch.zeros(b)], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = 1 + intensity * (2 * u[:, 3] - 1)
    out = out * gain[:, None, None, None]
    if max_zoom is not None and max_zoom > scale[1]:
        out = _margins(out, u[:, 4] < 0.5, generator)
    if low_res is not None and low_res > 1.5:
        out = _coarsen(out, low_res, max_noise, generator)
    return out.clamp(0, 1)


def coarsen(
    x: torch.Tensor, factors: torch.Tensor, noise_std: torch.Tensor, generator=None
) -> torch.Tensor:
    """``x`` (N, 1, H, W) as a scanner with coarser voxels would see it: each image averaged
    down by its factor (> 1), given Gaussian noise of its std at that resolution, and
    interpolated back bilinearly (as a viewer or :func:`models.realdata.real_slices`
    resamples a coarse volume)."""
    h, w = x.shape[-2:]
    out = []
    for img, factor, std in zip(x, factors.tolist(), noise_std.tolist(), strict=True):
        size = (max(2, round(h / factor)), max(2, round(w / factor)))
        small = F.interpolate(img[None], size=size, mode="area")
        small = small + std * torch.randn(small.shape, generator=generator, dtype=small.dtype)
        out.append(F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False))
    return torch.cat(out)


def _margins(x: torch.Tensor, close: torch.Tensor, generator) -> torch.Tensor:
    """Half of the close-ups (``close``) with empty bands of 5-15 % of the width each side
    along the columns: a field of view padded to a square, or a phase-encoding field left
    wider than the anatomy, ends in straight edges against air, which a prior of whole
    heads reads as a skull (a bright rim)."""
    b, w = x.shape[0], x.shape[-1]
    u = torch.rand(b, 2, generator=generator)
    width = (w * (0.05 + 0.1 * u[:, 1])).round()
    cols = torch.arange(w, dtype=width.dtype)
    keep = (cols >= width[:, None]) & (cols < w - width[:, None])
    keep |= ~(close & (u[:, 0] < 0.5))[:, None]
    return x * keep[:, None, None, :].to(x.dtype)


def _coarsen(x: torch.Tensor, low_res: float, max_noise: float, generator) -> torch.Tensor:
    """Half of ``x`` coarsened (:func:`coarsen`) by a factor log-uniform in [1.5,
    ``low_res``] with noise std uniform in [0, ``max_noise``]; one draw per image."""
    u = torch.rand(x.shape[0], 3, generator=generator)
    pick = torch.nonzero(u[:, 0] < 0.5).flatten()
    out = x.clone()
    if len(pick):
        factors = 1.5 * (low_res / 1.5) ** u[pick, 1]
        out[pick] = coarsen(x[pick], factors, max_noise * u[pick, 2], generator)
    return out
