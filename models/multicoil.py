"""Realistic multi-coil k-space made here, and fastMRI's HDF5 layout to carry it.

The test set of ``docs/benchmarks/mri_multicoil.md`` and of the gateway tests: what a
scanner sends, simulated from real MR slices (or phantoms) under the evaluation protocol of
:mod:`models.protocol`:

* a smooth image phase (B0 and transmit phase), so images are complex;
* receive fields of loop coils by Biot-Savart
  (:func:`models.physics.coils.loop_coil_sensitivities`), normalised to a root sum of
  squares of one (a prescan-normalised array, so the reference is the object, not the
  object shaded by the coil profile);
* coil noise correlated across coils (a mixing matrix of unit-norm rows: each coil has the
  stated std per component, neighbours share part of it), and a noise scan of the same noise;
* the data simulated on a grid twice as fine, k-space cropped to the acquired matrix (no
  inverse crime), with the readout 2× oversampled (the field of view doubled along rows, as
  fastMRI's 640 readout points for a 320 field of view);
* Cartesian line masks with fastMRI's centre fractions, zeros at unsampled lines.

``write_fastmri`` stores the result as fastMRI does: ``kspace`` (slices, coils, rows, cols)
complex64, ``mask`` (cols,), and an ISMRMRD XML header (``ismrmrd_header``) with the encoded
(oversampled) and reconstruction matrices. ``write_ismrmrd`` stores it as a scanner's raw
data converter does: one acquisition per measured line, and the noise scan as noise
measurements before them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.physics.coils import loop_coil_sensitivities, rss
from models.physics.mri import equispaced_mask, fft2c, ifft2c, random_mask
from models.protocol import smooth_phase

# ISMRMRD AcquisitionHeader and EncodingCounters (ismrmrd.h), as HDF5 compound types.
COUNTERS = np.dtype(
    [
        (name, "<u2")
        for name in (
            "kspace_encode_step_1",
            "kspace_encode_step_2",
            "average",
            "slice",
            "contrast",
            "phase",
            "repetition",
            "set",
            "segment",
        )
    ]
    + [("user", "<u2", (8,))]
)
ACQUISITION = np.dtype(
    [
        ("version", "<u2"),
        ("flags", "<u8"),
        ("measurement_uid", "<u4"),
        ("scan_counter", "<u4"),
        ("acquisition_time_stamp", "<u4"),
        ("physiology_time_stamp", "<u4", (3,)),
        ("number_of_samples", "<u2"),
        ("available_channels", "<u2"),
        ("active_channels", "<u2"),
        ("channel_mask", "<u8", (16,)),
        ("discard_pre", "<u2"),
        ("discard_post", "<u2"),
        ("center_sample", "<u2"),
        ("encoding_space_ref", "<u2"),
        ("trajectory_dimensions", "<u2"),
        ("sample_time_us", "<f4"),
        ("position", "<f4", (3,)),
        ("read_dir", "<f4", (3,)),
        ("phase_dir", "<f4", (3,)),
        ("slice_dir", "<f4", (3,)),
        ("patient_table_position", "<f4", (3,)),
        ("idx", COUNTERS),
        ("user_int", "<i4", (8,)),
        ("user_float", "<f4", (8,)),
    ]
)


@dataclass
class MultiCoilCase:
    kspace: torch.Tensor  # (N, C, R·rows, cols) complex64, zeros at unsampled lines
    mask: torch.Tensor  # (cols,) bool, the measured phase-encoding lines
    reference: torch.Tensor  # (N, 1, rows, cols) magnitude on the [0, 1] scale
    phase: torch.Tensor  # (N, 1, rows, cols) radians
    sensitivities: torch.Tensor  # (C, rows, cols) the true maps, RSS 1
    noise_scan: torch.Tensor  # (C, M) noise-only samples
    noise_covariance: torch.Tensor  # (C, C) the true coil noise covariance
    oversampling: int  # readout oversampling R of ``kspace``


def coil_mixing(coils: int, correlation: float, generator: torch.Generator) -> torch.Tensor:
    """A (C, C) complex mixing matrix with unit-norm rows: white noise times it has unit
    variance per coil and correlations of about ``correlation`` between coils."""
    a = (
        torch.eye(coils, dtype=torch.complex64)
        + correlation
        * torch.complex(
            torch.randn(coils, coils, generator=generator),
            torch.randn(coils, coils, generator=generator),
        )
        / (2 * coils) ** 0.5
    )
    return a / a.abs().pow(2).sum(1, keepdim=True).sqrt()


def simulate_multicoil(
    images_fine: torch.Tensor,
    coils: int = 8,
    acceleration: float = 4,
    kind: str = "equispaced",
    center_fraction: float = 0.08,
    noise_std: float = 0.01,
    correlation: float = 0.3,
    oversampling: int = 2,
    seed: int = 0,
    segments: int = 64,
) -> MultiCoilCase:
    """Multi-coil k-space of real-valued ``images_fine`` (N, 1, 2 rows, 2 cols) on [0, 1].

    ``noise_std`` per real component of each coil on the image's scale (orthonormal FFT),
    for the samples as acquired (removing the readout oversampling halves its variance);
    ``segments`` of each loop in the Biot-Savart sum.
    """
    g = torch.Generator().manual_seed(seed)
    n, _, fine_rows, fine_cols = images_fine.shape
    if fine_rows % 2 or fine_cols % 2:
        raise ValueError("the fine grid must have even sides (twice the reconstruction's)")
    rows, cols = fine_rows // 2, fine_cols // 2
    phase_fine = smooth_phase(n, (fine_rows, fine_cols), seed + 1)
    obj = images_fine.to(torch.complex64) * torch.exp(1j * phase_fine)
    # The oversampled field of view: the object in the middle of R times the rows.
    pad = (oversampling - 1) * fine_rows // 2
    obj_os = torch.nn.functional.pad(obj, (0, 0, pad, pad))
    # Coil fields are smooth: computed on the acquired grid, interpolated to the fine one.
    maps = loop_coil_sensitivities(
        (oversampling * rows, cols), coils, extent=max(rows, cols) / 2, segments=segments
    )
    maps = maps / rss(maps, 0).clamp_min(1e-12)
    parts = torch.view_as_real(maps).permute(3, 0, 1, 2)  # (2, C, R rows, cols)
    fine = torch.nn.functional.interpolate(parts, scale_factor=2, mode="bilinear")
    maps_fine = torch.complex(fine[0], fine[1])
    maps_fine = maps_fine / rss(maps_fine, 0).clamp_min(1e-12)
    k_fine = fft2c(obj_os * maps_fine[None])
    r0 = (k_fine.shape[-2] - oversampling * rows) // 2
    c0 = (fine_cols - cols) // 2
    # Orthonormal FFTs: halve for the coarser grid; and a scanner's samples do not depend on
    # how densely the readout is sampled, so undo the 1/√R the longer FFT put on them.
    k = k_fine[..., r0 : r0 + oversampling * rows, c0 : c0 + cols] / 2 * oversampling**0.5
    # The reference: the object at the acquired resolution (its own k-space centre).
    r1 = (fine_rows - rows) // 2
    k_obj = fft2c(obj)[..., r1 : r1 + rows, c0 : c0 + cols] / 2
    image = ifft2c(k_obj)
    mix = coil_mixing(coils, correlation, g)

    def coil_noise(shape: tuple[int, ...]) -> torch.Tensor:
        white = torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
        return noise_std * torch.einsum("dc,nc...->nd...", mix, white)

    k = k + coil_noise(k.shape)
    scan = coil_noise((1, coils, 256))[0]
    if kind == "equispaced":
        line_mask = equispaced_mask((1, cols), acceleration, center_fraction)[0]
    else:
        line_mask = random_mask((1, cols), acceleration, center_fraction, seed)[0]
    top = (oversampling - 1) * rows // 2
    return MultiCoilCase(
        kspace=(k * line_mask).to(torch.complex64),
        mask=line_mask,
        reference=image.abs().clamp(0, 1),
        phase=image.angle(),
        sensitivities=maps[:, top : top + rows].to(torch.complex64),
        noise_scan=scan,
        noise_covariance=noise_std**2 * 2 * (mix @ mix.conj().T),
        oversampling=oversampling,
    )


def fastmri_header(encoded: tuple[int, int], recon: tuple[int, int]) -> str:
    """A minimal ISMRMRD XML header: encoded (readout, phase) and reconstruction matrices."""

    def space(name: str, size: tuple[int, int]) -> str:
        x, y = size
        return (
            f"<{name}><matrixSize><x>{x}</x><y>{y}</y><z>1</z></matrixSize>"
            f"<fieldOfView_mm><x>{x}</x><y>{y}</y><z>1</z></fieldOfView_mm></{name}>"
        )

    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
        + space("encodedSpace", encoded)
        + space("reconSpace", recon)
        + "<trajectory>cartesian</trajectory></encoding></ismrmrdHeader>"
    )


def write_fastmri(path: str | Path, case: MultiCoilCase, recon_columns: int | None = None) -> Path:
    """``case`` as a fastMRI multi-coil HDF5 file (``kspace``, ``mask``, ``ismrmrd_header``);
    ``recon_columns``: the header's reconSpace y where it is narrower than the encoded lines
    (fastMRI knee: 320 of 368)."""
    import h5py

    path = Path(path)
    os_rows, cols = case.kspace.shape[-2:]
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=case.kspace.numpy())
        f.create_dataset("mask", data=case.mask.numpy())
        recon = (os_rows // case.oversampling, recon_columns or cols)
        header = fastmri_header((os_rows, cols), recon)
        f.create_dataset("ismrmrd_header", data=np.bytes_(header))
        f.attrs["acquisition"] = "simulated multi-coil (scorerecon models/multicoil.py)"
    return path


def write_ismrmrd(path: str | Path, case: MultiCoilCase) -> Path:
    """``case`` as ISMRMRD raw data (``dataset/data``, ``dataset/xml``): the noise scan as
    acquisitions flagged ``ACQ_IS_NOISE_MEASUREMENT`` (bit 19), then one acquisition per
    measured (slice, phase-encoding line), its readout as acquired (oversampled); the header's
    encoded x is the readout's length and its reconstruction x the field of view's."""
    import h5py

    path = Path(path)
    n, coils, os_rows, cols = case.kspace.shape
    lines = case.mask.nonzero().flatten().tolist()
    noise = case.noise_scan.numpy().reshape(coils, -1, os_rows).transpose(1, 0, 2)
    vlen = h5py.vlen_dtype(np.dtype("<f4"))
    acqs = np.zeros(
        len(noise) + n * len(lines), [("head", ACQUISITION), ("traj", vlen), ("data", vlen)]
    )
    readouts = [(1 << 18, 0, 0, r) for r in noise] + [
        (0, s, ky, case.kspace[s, :, :, ky].numpy()) for s in range(n) for ky in lines
    ]
    for a, (flags, s, ky, data) in zip(acqs, readouts, strict=True):
        a["head"]["flags"] = flags
        a["head"]["number_of_samples"] = os_rows
        a["head"]["active_channels"] = a["head"]["available_channels"] = coils
        a["head"]["idx"]["kspace_encode_step_1"] = ky
        a["head"]["idx"]["slice"] = s
        a["traj"] = np.zeros(0, np.float32)
        a["data"] = np.stack([data.real, data.imag], -1).astype(np.float32).ravel()
    header = fastmri_header((os_rows, cols), (os_rows // case.oversampling, cols))
    with h5py.File(path, "w") as f:
        g = f.create_group("dataset")
        g.create_dataset("data", data=acqs)
        g.create_dataset("xml", data=[header.encode()], dtype=h5py.string_dtype())
    return path
