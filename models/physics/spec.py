"""The measurement spec (shared by the CLI and the gateway) and ``from_spec``.

Example specs::

    {"modality": "ct", "geometry": "parallel", "image_size": 128, "n_views": 23}
    {"modality": "ct", "geometry": "fan", "image_size": 128, "n_views": 60,
     "source_distance": 500, "detector_distance": 300}
    {"modality": "mri", "image_size": 128,
     "mask": {"kind": "equispaced", "acceleration": 8, "center_fraction": 0.04}}
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    image_size: int = Field(..., ge=8, le=1024)
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

    @model_validator(mode="after")
    def _check(self) -> MeasurementSpec:
        if self.modality == "ct":
            if self.mask is not None or self.coils is not None:
                raise ValueError("mask and coils apply to modality 'mri' only; remove them")
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
            if self.mask.lines and max(self.mask.lines) >= self.image_size:
                raise ValueError(f"mask.lines must be in [0, {self.image_size - 1}]")
            _check_acceleration(self.mask, self.image_size)
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


def _mri(spec: MeasurementSpec) -> LinearOperator:
    m, n = spec.mask, spec.image_size
    if m.kind == "equispaced":
        mask = equispaced_mask(n, m.acceleration, m.center_fraction)
    elif m.kind == "random":
        mask = random_mask(n, m.acceleration, m.center_fraction, m.seed)
    else:
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[:, sorted(set(m.lines))] = True
    if spec.coils and spec.coils > 1:
        return MultiCoilMRIOperator(n, mask, birdcage_sensitivities(n, spec.coils))
    return MRIOperator(n, mask)


_FACTORIES = {"ct": _ct, "mri": _mri}


def from_spec(spec: MeasurementSpec | dict | str) -> LinearOperator:
    """Build the forward operator a spec describes.

    >>> op = from_spec({"modality": "ct", "image_size": 32, "n_views": 8})
    >>> op.measurement_shape()[:2]
    (1, 8)
    """
    if not isinstance(spec, MeasurementSpec):
        spec = parse_spec(spec)
    return _FACTORIES[spec.modality](spec)
