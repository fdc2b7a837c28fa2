"""Reading images (NPY, PNG, DICOM) into the model's [0, 1] intensity range, and writing previews.

CT DICOM pixel values are converted to Hounsfield units with RescaleSlope/Intercept, then
mapped linearly so that air (−1000 HU) is 0 and ``hu_max`` is 1:

.. math:: x = \\mathrm{clip}\\left(\\frac{HU + 1000}{hu_{max} + 1000}, 0, 1\\right)

which keeps x proportional to the linear attenuation coefficient (μ = μ_water (1 + HU/1000)),
as the Radon model of the scanner requires. Other images are min-max scaled to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image
from skimage.transform import resize


@dataclass(frozen=True)
class HUMapping:
    """Linear map between Hounsfield units and the model's [0, 1] range."""

    hu_air: float = -1000.0
    hu_max: float = 3000.0

    def to_unit(self, hu: np.ndarray) -> np.ndarray:
        return np.clip((hu - self.hu_air) / (self.hu_max - self.hu_air), 0.0, 1.0)

    def to_hu(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x) * (self.hu_max - self.hu_air) + self.hu_air


def read_dicom_hu(path: str | Path) -> np.ndarray:
    """Pixel data of a single-frame DICOM in HU (RescaleSlope/Intercept applied)."""
    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array.astype(np.float64)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return arr * slope + intercept, str(getattr(ds, "Modality", ""))


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)


def load_image(
    path: str | Path, size: int | None = None, hu: HUMapping = HUMapping()
) -> torch.Tensor:
    """Read an image file as a ``(1, 1, size, size)`` float32 tensor in [0, 1].

    ``.npy`` arrays already in [0, 1] are kept as they are; other ranges are min-max scaled.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False).astype(np.float64).squeeze()
        if arr.min() < 0 or arr.max() > 1:
            arr = _minmax(arr)
    elif suffix == ".png":
        arr = _minmax(np.asarray(Image.open(path).convert("L"), dtype=np.float64))
    elif suffix in (".dcm", ".dicom"):
        values, modality = read_dicom_hu(path)
        arr = hu.to_unit(values) if modality == "CT" else _minmax(values)
    else:
        raise ValueError(f"image must be .npy, .png or .dcm, got '{path.name}'")
    if arr.ndim != 2:
        raise ValueError(f"image must be 2D, got shape {arr.shape} from '{path.name}'")
    if size is not None:
        arr = fit_square(arr, size)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]


def fit_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop a 2-D [0, 1] image to a square, then resize (anti-aliased) to ``size``²."""
    if arr.shape[0] != arr.shape[1]:
        side = min(arr.shape)
        r0, c0 = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
        arr = arr[r0 : r0 + side, c0 : c0 + side]
    if arr.shape != (size, size):
        arr = np.clip(resize(arr, (size, size), anti_aliasing=True), 0, 1)
    return arr


def load_problems(path: str | Path, spec) -> tuple[list, torch.Tensor]:
    """A measurement file read against a parsed spec, as per-slice operators and the data
    they fit (:func:`models.physics.slice_problems`); errors name ``--input``."""
    from models.measurements import MeasurementError, read_measurement, read_noise_scan
    from models.physics import needs_data, slice_problems

    raw = Path(path).read_bytes()
    try:
        y = read_measurement(raw, spec)
        noise = read_noise_scan(raw, y.shape[-3]) if needs_data(spec) else None
    except MeasurementError as exc:
        raise type(exc)(f"--input: {exc}") from None
    return slice_problems(spec, y, None if noise is None else torch.from_numpy(noise))


def load_measurement(path: str | Path, operator) -> torch.Tensor:
    """A measurement file (see :mod:`models.measurements`) as (B, *shape), checked against
    the operator's shape; errors name ``--input``."""
    from models.measurements import MeasurementError, as_measurement, read_array

    try:
        return as_measurement(read_array(Path(path).read_bytes()), operator)
    except MeasurementError as exc:
        raise type(exc)(f"--input: {exc}") from None


def save_png(path: str | Path, image, vmin: float = 0.0, vmax: float = 1.0) -> None:
    """Write a 2D image (tensor or array) as an 8-bit greyscale PNG with the given window."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    arr = np.abs(arr.squeeze()) if np.iscomplexobj(arr) else arr.squeeze()
    scaled = np.clip((arr - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    Image.fromarray((scaled * 255).round().astype(np.uint8)).save(path, format="PNG")


def bundled_image() -> Path:
    """The Shepp-Logan phantom that scikit-image ships (used by the demo and the tests)."""
    import skimage.data

    return Path(skimage.data.__file__).parent / "phantom.png"
