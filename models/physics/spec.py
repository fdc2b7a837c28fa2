"""The measurement spec (shared by the CLI and the gateway) and ``from_spec``.

Example specs::

    {"modality": "ct", "geometry": "parallel", "image_size": 128, "n_views": 23}
    {"modality": "ct", "geometry": "fan", "image_size": 128, "n_views": 60,
     "source_distance": 500, "detector_distance": 300}
    {"modality": "mri", "image_size": 128,
     "mask": {"kind": "equispaced", "acceleration": 8, "center_fraction": 0.04}}
    {"modality": "mri", "image_size": [640, 368], "sensitivities": "espirit",
     "mask": {"kind": "equispaced", "acceleration": 4, "center_fraction": 0.08}}

Multi-coil MRI: ``"sensitivities": "espirit"`` estimates the coil maps of each slice from its
own auto-calibration lines (:func:`models.physics.coils.espirit_maps`), so the operator is
built from the data (:func:`slice_problems`); the coil count is the measurement's.
``"coils": C`` alone keeps the synthetic birdcage maps of simulations.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from models.physics.base import LinearOperator
from models.physics.ct import (
    CTGeometry,
    CTOperator,
    default_detectors,
    sparse_view,
    uniform_angles,
)
from models.physics.mri import (
    MRIOperator,
    MultiCoilMRIOperator,
    birdcage_sensitivities,
    equispaced_mask,
    random_mask,
)


class SpecError(ValueError):
    """An invalid measurement spec; the message names the field and the fix."""


class MaskSpec(BaseModel):
    """A Cartesian k-space mask: equispaced or random lines, or an explicit line list."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["equispaced", "random", "explicit"]
    acceleration: float | None = Field(None, ge=1, le=64)
    center_fraction: float = Field(0.08, gt=0, le=1)
    seed: int = 0
    lines: list[int] | None = Field(
        None, description="explicit: indices of the measured phase-encoding lines (columns)"
    )

    @model_validator(mode="after")
    def _check(self) -> MaskSpec:
        if self.kind == "explicit" and not self.lines:
            raise ValueError("mask.lines is required for kind 'explicit' (list of column indices)")
        if self.kind != "explicit" and self.acceleration is None:
            raise ValueError(f"mask.acceleration is required for kind '{self.kind}' (e.g. 4 or 8)")
        return self


class MeasurementSpec(BaseModel):
    """What was measured, and how: enough to rebuild the forward operator."""

    model_config = ConfigDict(extra="forbid")
    modality: Literal["ct", "mri"]
    image_size: int | tuple[int, int] = Field(
        ...,
        description="N for N×N images, or [rows, cols] (MRI): rows along the readout, "
        "cols the phase-encoding lines",
    )
    noise_std: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="Gaussian noise std in measurement units (per real component for k-space); "
        "omitted: estimated from the data; 0: the data are noiseless and fitted exactly",
    )
    # CT
    geometry: Literal["parallel", "fan"] = "parallel"
    n_views: int | None = Field(None, ge=1, le=4096)
    n_full_views: int | None = Field(None, ge=1, le=8192)
    angles: list[float] | None = Field(None, description="explicit angles in radians")
    n_detectors: int | None = Field(None, ge=1, le=8192)
    detector_spacing: float = Field(1.0, gt=0)
    pixel_size: float = Field(1.0, gt=0)
    source_distance: float | None = Field(None, gt=0)
    detector_distance: float | None = Field(None, ge=0)
    metal_threshold_hu: float | None = Field(
        None,
        gt=0,
        le=30000,
        description="metal artifact removal: drop the bins whose rays cross pixels above this "
        "HU in the FBP of the data (needs every view measured)",
    )
    # MRI
    mask: MaskSpec | None = None
    coils: int | None = Field(None, ge=1, le=64)
    sensitivities: Literal["birdcage", "espirit"] | None = Field(
        None,
        description="multi-coil MRI: 'espirit' estimates coil maps from the data's "
        "auto-calibration lines; 'birdcage' uses synthetic maps (simulations, needs coils)",
    )

    @field_validator("image_size")
    @classmethod
    def _square_as_int(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        return v[0] if not isinstance(v, int) and v[0] == v[1] else v

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the image."""
        n = self.image_size
        return (n, n) if isinstance(n, int) else (int(n[0]), int(n[1]))

    @model_validator(mode="after")
    def _check(self) -> MeasurementSpec:
        if not all(8 <= n <= 1024 for n in self.shape):
            raise ValueError("image_size must lie in [8, 1024] (each of rows and cols)")
        if self.modality == "ct":
            if self.mask is not None or self.coils is not None or self.sensitivities:
                raise ValueError(
                    "mask, coils and sensitivities apply to modality 'mri' only; remove them"
                )
            if not isinstance(self.image_size, int):
                raise ValueError("image_size must be one number N (N×N) for CT")
            sparse = self.n_full_views is not None and self.n_full_views != self.n_views
            if self.metal_threshold_hu is not None and sparse:
                raise ValueError("metal_threshold_hu needs every view measured: drop n_full_views")
            if self.n_views is None and self.angles is None:
                raise ValueError("CT needs n_views (e.g. 23) or angles (list of radians)")
            if self.angles is not None and len(self.angles) == 0:
                raise ValueError("angles must not be empty")
            if self.geometry == "fan":
                if self.source_distance is None or self.detector_distance is None:
                    raise ValueError(
                        "geometry 'fan' needs source_distance and detector_distance (mm)"
                    )
                if self.source_distance <= self.image_size * self.pixel_size / math.sqrt(2):
                    raise ValueError(
                        "source_distance must exceed the image half-diagonal "
                        f"({self.image_size * self.pixel_size / math.sqrt(2):.1f} mm)"
                    )
        else:
            if self.mask is None:
                raise ValueError(
                    "MRI needs mask, e.g. {'kind': 'equispaced', 'acceleration': 8, "
                    "'center_fraction': 0.04}"
                )
            cols = self.shape[1]
            if self.mask.lines and max(self.mask.lines) >= cols:
                raise ValueError(f"mask.lines must be in [0, {cols - 1}]")
            _check_acceleration(self.mask, cols)
            if self.sensitivities == "birdcage" and not self.coils:
                raise ValueError("sensitivities 'birdcage' needs coils (e.g. 8)")
            if self.sensitivities == "espirit":
                from models.physics.coils import MIN_ACS_LINES
                from models.physics.mri import calibration_lines

                acs = len(calibration_lines(mask_of(self)))
                if acs < MIN_ACS_LINES:
                    raise ValueError(
                        f"sensitivities 'espirit' estimates coil maps from the fully sampled "
                        f"k-space centre, and this mask has {acs} centre lines (at least "
                        f"{MIN_ACS_LINES} needed): raise mask.center_fraction, or send data "
                        "with auto-calibration lines"
                    )
            if self.sensitivities != "espirit" and not isinstance(self.image_size, int):
                raise ValueError(
                    "a rectangular image_size needs multi-coil data: set sensitivities to "
                    "'espirit' (or use one number N for N×N)"
                )
            if self.n_views is not None or self.angles is not None:
                raise ValueError("n_views and angles apply to modality 'ct' only; remove them")
            if self.metal_threshold_hu is not None:
                raise ValueError("metal_threshold_hu applies to modality 'ct' only; remove it")
        return self


def _check_acceleration(mask: MaskSpec, size: int) -> None:
    """A mask must reach the acceleration it states: a fully sampled centre wider than the
    lines that acceleration allows would silently measure more (24× becoming 12.8×)."""
    if mask.kind == "explicit" or mask.acceleration is None:
        return
    allowed = int(round(size / mask.acceleration))
    centre = max(1, int(round(size * mask.center_fraction)))
    if centre > allowed:
        most = allowed / size
        raise ValueError(
            f"mask.center_fraction {mask.center_fraction} keeps {centre} centre lines, more than "
            f"the {allowed} lines of acceleration {mask.acceleration:g} at image_size {size}; "
            f"set center_fraction to at most {most:.4f} or lower the acceleration"
        )


def parse_spec(data: dict | str | bytes) -> MeasurementSpec:
    """Validate a spec (dict or JSON text) and raise :class:`SpecError` naming each bad field."""
    try:
        if isinstance(data, dict):
            return MeasurementSpec.model_validate(data)
        return MeasurementSpec.model_validate_json(data)
    except ValidationError as exc:
        raise SpecError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            msg = f"must be one of {err['ctx']['expected']}"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field; remove it (see the MeasurementSpec fields)"
        parts.append(f"{loc}: {msg}")
    return "invalid measurement spec: " + "; ".join(parts)


def _ct(spec: MeasurementSpec) -> CTOperator:
    extra: dict = {"pixel_size": spec.pixel_size, "detector_spacing": spec.detector_spacing}
    if spec.n_detectors is not None:
        extra["n_detectors"] = spec.n_detectors
    if spec.geometry == "fan":
        extra["source_distance"] = spec.source_distance
        extra["detector_distance"] = spec.detector_distance
    if spec.angles is None:
        # Metal trace removal works on a fully measured sinogram: T's angles are the views.
        full = spec.n_views if spec.metal_threshold_hu is not None else spec.n_full_views
        try:
            return sparse_view(spec.image_size, spec.n_views, spec.geometry, full, **extra)
        except ValueError as exc:
            raise SpecError(f"n_full_views: {exc}") from None
    # Explicit angles: T runs on the union of a dense uniform set and the given angles.
    base = 180 if spec.geometry == "parallel" else 360
    dense = sorted(set(uniform_angles(spec.n_full_views or base, spec.geometry)) | set(spec.angles))
    n_det = extra.get("n_detectors") or default_detectors(spec.image_size, spec.geometry, extra)
    geom = CTGeometry(
        image_size=spec.image_size,
        angles=tuple(dense),
        beam=spec.geometry,
        **{**extra, "n_detectors": n_det},
    )
    mask = torch.zeros(len(dense), n_det, dtype=torch.bool)
    wanted = set(spec.angles)
    for i, a in enumerate(dense):
        if a in wanted:
            mask[i] = True
    return CTOperator(geom, mask)


def mask_of(spec: MeasurementSpec) -> torch.Tensor:
    """The boolean (rows, cols) k-space mask an MRI spec describes."""
    m, shape = spec.mask, spec.shape
    if m.kind == "equispaced":
        return equispaced_mask(shape, m.acceleration, m.center_fraction)
    if m.kind == "random":
        return random_mask(shape, m.acceleration, m.center_fraction, m.seed)
    mask = torch.zeros(*shape, dtype=torch.bool)
    mask[:, sorted(set(m.lines))] = True
    return mask


def _mri(spec: MeasurementSpec, kspace: torch.Tensor | None = None) -> LinearOperator:
    mask = mask_of(spec)
    if spec.sensitivities == "espirit":
        return MultiCoilMRIOperator(spec.shape, mask, _espirit(spec, mask, kspace))
    if spec.coils and spec.coils > 1:
        n = spec.image_size
        return MultiCoilMRIOperator(n, mask, birdcage_sensitivities(n, spec.coils))
    return MRIOperator(spec.image_size, mask)


def _espirit(spec: MeasurementSpec, mask: torch.Tensor, kspace) -> torch.Tensor:
    """ESPIRiT maps of one slice's zero-filled k-space ``(C, rows, cols)``, checked first.

    A readout 2× oversampled (``(C, 2 rows, cols)``) is calibrated over its whole field of
    view and the maps cropped to the central rows after: an object that fills the
    reconstruction's field of view along the readout is then not wrapped onto itself, which
    would corrupt the maps along its top and bottom edges (BART and fastMRI do the same).
    """
    from models.physics.coils import espirit_maps

    if kspace is None:
        raise SpecError(
            "sensitivities 'espirit' estimates the coil maps from the measurement: build the "
            "operator with the k-space (slice_problems)"
        )
    k = torch.as_tensor(kspace)
    rows, cols = spec.shape
    if k.ndim != 3 or k.shape[-1] != cols or k.shape[-2] not in (rows, 2 * rows):
        raise SpecError(
            f"measurement: one slice of multi-coil k-space must be (coils, {rows}, {cols}) "
            f"for image_size {list(spec.shape)} (or {2 * rows} rows with the readout 2× "
            f"oversampled), got {tuple(k.shape)}"
        )
    if spec.coils is not None and k.shape[0] != spec.coils:
        raise SpecError(
            f"coils: the spec says {spec.coils} but the measurement has {k.shape[0]}; "
            "drop coils (the measurement's count is used) or send matching data"
        )
    over = k.shape[-2] // rows
    full = mask[:1].expand(k.shape[-2], cols)
    try:
        maps = espirit_maps(k * full, full, calib_rows=32 * over)
    except ValueError as exc:
        raise SpecError(f"sensitivities: {exc}") from None
    top = (k.shape[-2] - rows) // 2
    return maps[:, top : top + rows]


def from_spec(spec: MeasurementSpec | dict | str, kspace=None) -> LinearOperator:
    """Build the forward operator a spec describes; ``kspace`` (one slice's ``(C, H, W)``)
    is needed, and used, only for coil maps estimated from the data (``espirit``).

    >>> op = from_spec({"modality": "ct", "image_size": 32, "n_views": 8})
    >>> op.measurement_shape()[:2]
    (1, 8)
    """
    if not isinstance(spec, MeasurementSpec):
        spec = parse_spec(spec)
    if spec.modality == "mri":
        return _mri(spec, kspace)
    return _ct(spec)


def needs_data(spec: MeasurementSpec) -> bool:
    """True when the operator depends on the measurement (coil maps from the data)."""
    return spec.modality == "mri" and spec.sensitivities == "espirit"


def layout_operator(spec: MeasurementSpec, measurement) -> LinearOperator:
    """An operator with the spec's image shape and mask and the measurement's coil count, with
    unit coil maps: it checks a measurement's layout (shape, calibration lines) before the
    maps are estimated from it, and is not for reconstruction. A readout 2× oversampled
    (twice the spec's rows) is accepted as it is."""
    from models.measurements import MeasurementError

    shape = tuple(getattr(measurement, "shape", ()))
    if len(shape) < 3:
        raise MeasurementError(
            f"multi-coil k-space must be (slices, coils, {spec.shape[0]}, {spec.shape[1]}) "
            f"or (coils, {spec.shape[0]}, {spec.shape[1]}); got {shape}"
        )
    coils = int(shape[-3])
    if spec.coils is not None and coils != spec.coils:
        raise MeasurementError(
            f"coils: the spec says {spec.coils} but the measurement has {coils} (axis -3); "
            "drop coils from the spec (the measurement's count is used) or send matching data"
        )
    rows, cols = spec.shape
    if shape[-2] == 2 * rows:  # kept as sent: the worker uses the empty half for the noise
        rows *= 2
    unit = torch.full((coils, rows, cols), coils**-0.5, dtype=torch.complex64)
    mask = mask_of(spec)[:1].expand(rows, cols)
    return MultiCoilMRIOperator((rows, cols), mask, unit)


def slice_problems(
    spec: MeasurementSpec | dict | str, y: torch.Tensor, noise: torch.Tensor | None = None
) -> tuple[list[LinearOperator], torch.Tensor]:
    """One operator per slice of ``y`` ``(S, ...)``, and the data they fit.

    The same operator serves every slice unless the coil maps come from each slice's own
    data (``espirit``): then each slice's maps are estimated, and its data and operator are
    pre-whitened by the coil noise covariance (:func:`models.physics.coils.prewhiten`),
    estimated from ``noise`` (a noise scan's samples ``(coils, M)``, for every slice) when
    given, else from the empty half of a 2× oversampled readout, which is then removed, or
    else from the readout ends.
    """
    from models.measurements import remove_readout_oversampling
    from models.physics.coils import noise_from_oversampled, prewhiten

    if not isinstance(spec, MeasurementSpec):
        spec = parse_spec(spec)
    if not needs_data(spec):
        return [from_spec(spec)] * len(y), y
    ops, data = [], []
    rows, mask = spec.shape[0], mask_of(spec)
    if noise is not None and (noise.ndim != 2 or noise.shape[0] != y.shape[-3]):
        raise SpecError(
            f"noise: the noise scan has {tuple(noise.shape)} samples but the measurement "
            f"{y.shape[-3]} coils; record it with the same receiver channels"
        )
    for s in range(len(y)):
        ys, samples = y[s : s + 1], noise
        op = from_spec(spec, ys[0])  # maps over the whole (oversampled) field of view
        if ys.shape[-2] == 2 * rows:  # oversampled readout: noise from its empty half
            if samples is None:
                samples = noise_from_oversampled(ys, mask)
            ys = torch.from_numpy(remove_readout_oversampling(ys.numpy(), rows)).to(ys.dtype)
        op, ys = prewhiten(op, ys, samples)
        ops.append(op)
        data.append(ys)
    return ops, torch.cat(data)
