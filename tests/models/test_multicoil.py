"""The realistic multi-coil test set (models/multicoil.py) and its fastMRI file."""

import io

import h5py
import numpy as np
import pytest
import torch

from models.measurements import (
    as_measurement,
    check_mask,
    read_array,
    read_mask,
    remove_readout_oversampling,
)
from models.metrics import psnr
from models.multicoil import simulate_multicoil, write_fastmri, write_ismrmrd
from models.phantoms import mri_phantoms
from models.physics import layout_operator, parse_spec, slice_problems
from models.physics.coils import noise_covariance, rss
from models.physics.mri import ifft2c


def _case(**kw):
    return simulate_multicoil(mri_phantoms(2, 64, seed=3)[:, :, :, 4:60], coils=6, **kw)


def test_fully_sampled_noiseless_data_combine_to_the_reference():
    """Oversampling removed and coils combined by RSS, the data are the reference: the
    simulation's scaling (fine grid, oversampled readout, normalised coils) is consistent."""
    case = _case(acceleration=1, noise_std=0.0)
    assert case.kspace.shape == (2, 6, 64, 28) and case.oversampling == 2
    k = torch.from_numpy(remove_readout_oversampling(case.kspace.numpy(), 32))
    combined = rss(ifft2c(k), 1)[:, None]
    assert combined.shape == case.reference.shape == (2, 1, 32, 28)
    assert psnr(combined[0].clamp(0, 1), case.reference[0]) > 45
    assert torch.allclose(rss(case.sensitivities, 0), torch.ones(32, 28), atol=1e-4)


def test_coil_noise_is_correlated_as_declared_and_the_mask_has_zeros():
    case = _case(acceleration=4, center_fraction=0.25, noise_std=0.02, correlation=0.5)
    cov = case.noise_covariance
    off = (cov - torch.diag(cov.diagonal())).abs().max() / cov.diagonal().real.mean()
    assert float(off) > 0.05  # correlated
    assert torch.allclose(cov.diagonal().real, torch.full((6,), 2 * 0.02**2), rtol=1e-3)
    measured = noise_covariance(case.noise_scan)
    assert float((measured - cov).abs().max()) < 0.35 * float(cov.diagonal().real.mean())
    unsampled = ~case.mask
    assert bool((case.kspace[..., unsampled] == 0).all())
    assert bool((case.kspace[..., case.mask] != 0).all())


def test_the_fastmri_file_reads_back_with_its_mask(tmp_path):
    case = _case(acceleration=2, center_fraction=0.3)
    raw = write_fastmri(tmp_path / "case.h5", case).read_bytes()
    with h5py.File(io.BytesIO(raw)) as f:
        assert f["kspace"].shape == (2, 6, 64, 28) and f["mask"].shape == (28,)
        header = f["ismrmrd_header"][()].decode()
    assert "<reconSpace><matrixSize><x>32</x><y>28</y>" in header
    spec = parse_spec(
        {
            "modality": "mri",
            "image_size": [32, 28],
            "sensitivities": "espirit",
            "mask": {"kind": "equispaced", "acceleration": 2, "center_fraction": 0.3},
        }
    )
    arr = read_array(raw)
    op = layout_operator(spec, arr)
    lines = read_mask(raw)
    check_mask(lines, op)
    y = as_measurement(arr, op)
    assert y.shape == (2, 6, 64, 28)  # kept as sent: its empty half holds the noise
    assert np.array_equal(lines, case.mask.numpy())
    ops, yw = slice_problems(spec, y)
    assert yw.shape == (2, 6, 32, 28) and ops[0].image_shape == (32, 28)


def test_noise_from_the_oversampled_readout_matches_the_true_covariance():
    """The empty half of a 2× oversampled readout gives the coil noise covariance even for an
    object that fills its field of view, where the k-space readout ends carry signal."""
    from models.physics.coils import noise_from_kspace, noise_from_oversampled

    full = torch.ones(2, 1, 64, 56) * 0.8  # fills the field of view: hard edges everywhere
    case = simulate_multicoil(full, coils=4, acceleration=2, noise_std=0.02, correlation=0.5)
    mask = case.mask[None].expand(64, 28)
    truth = case.noise_covariance
    scale = float(truth.diagonal().real.mean())
    good = noise_covariance(noise_from_oversampled(case.kspace, mask))
    assert float((good - truth).abs().max()) < 0.2 * scale
    cropped = torch.from_numpy(remove_readout_oversampling(case.kspace.numpy(), 32))
    bad = noise_covariance(noise_from_kspace(cropped, mask))
    assert float((bad - truth).abs().max()) > float((good - truth).abs().max())


def test_baseline_command_reads_a_fastmri_file_with_espirit(tmp_path):
    """``scorerecon baseline --method sense|cs-wavelet`` on the file as a scanner sends it."""
    import json

    from models.cli import main

    case = _case(acceleration=2, center_fraction=0.3, noise_std=0.005)
    path = write_fastmri(tmp_path / "case.h5", case)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "modality": "mri",
                "image_size": [32, 28],
                "sensitivities": "espirit",
                "mask": {"kind": "equispaced", "acceleration": 2, "center_fraction": 0.3},
            }
        )
    )
    ref = tmp_path / "ref.npy"
    np.save(ref, case.reference[:1].numpy())
    psnrs = {}
    for method in ("zero-filled", "sense", "cs-wavelet"):
        out = tmp_path / method
        args = ["baseline", "--input", str(path), "--spec", str(spec), "--method", method]
        assert main([*args, "--out", str(out), "--reference", str(ref)]) == 0
        x = np.load(out / "recon.npy")
        assert x.shape == (2, 1, 32, 28)
        report = json.loads((out / "report.json").read_text())
        psnrs[method] = report["psnr"]
    # Measured 27.1, 32.4 and 32.6 dB: the parallel-imaging methods unfold the aliasing.
    assert psnrs["zero-filled"] > 24, psnrs
    assert min(psnrs["sense"], psnrs["cs-wavelet"]) > psnrs["zero-filled"] + 3, psnrs


def test_ismrmrd_noise_scan_is_read_and_used_for_whitening(tmp_path):
    """The noise measurements of ISMRMRD raw data come back sample for sample, and the
    per-slice problems whiten with their covariance rather than an estimate from the data."""
    from models.io import load_problems
    from models.measurements import MeasurementError, read_noise_scan
    from models.physics.coils import whitening_matrix

    case = _case(acceleration=2, center_fraction=0.3, noise_std=0.02, correlation=0.5)
    path = write_ismrmrd(tmp_path / "raw.h5", case)
    raw = path.read_bytes()
    k = read_array(raw)
    assert k.shape == (2, 6, 64, 28)  # the readout as acquired
    assert np.allclose(k, case.kspace.numpy(), atol=1e-6)
    scan = read_noise_scan(raw, coils=6)
    assert scan.shape == (6, 256) and np.allclose(scan, case.noise_scan.numpy(), atol=1e-7)
    with pytest.raises(MeasurementError, match="noise: the ISMRMRD noise measurements have 6"):
        read_noise_scan(raw, coils=4)
    spec = parse_spec(
        {
            "modality": "mri",
            "image_size": [32, 28],
            "sensitivities": "espirit",
            "mask": {"kind": "explicit", "lines": case.mask.nonzero().flatten().tolist()},
        }
    )
    ops, y = load_problems(path, spec)
    expected = whitening_matrix(noise_covariance(case.noise_scan))
    assert y.shape == (2, 6, 32, 28)
    assert torch.allclose(ops[1].whitening.to(expected.dtype), expected, atol=1e-5)
    with pytest.raises(MeasurementError, match="reconSpace"):
        load_problems(path, parse_spec({**spec.model_dump(), "image_size": [64, 28]}))
