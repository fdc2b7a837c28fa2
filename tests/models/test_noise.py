"""Noise levels estimated from the data (models/noise.py) against the levels that were added."""

import pytest
import torch

from models.noise import estimate_noise
from models.phantoms import ct_phantoms, mri_phantoms
from models.physics import from_spec


# The phantoms' sharp edges leave k-space energy of about 0.006 at the corners: the estimate
# is an upper bound below that level (measured: 0.008 for noise of 0.005 at 128²).
@pytest.mark.parametrize("level", [0.01, 0.02, 0.1])
def test_kspace_noise_is_recovered_from_the_periphery(level):
    op = from_spec(
        {"modality": "mri", "image_size": 128, "mask": {"kind": "random", "acceleration": 4}}
    )
    y = op.forward(mri_phantoms(2, 128, seed=5))
    g = torch.Generator().manual_seed(0)
    noise = torch.complex(torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g))
    est = estimate_noise(op, y + level * noise)
    assert est.shape == (2,)
    assert est.tolist() == pytest.approx([level, level], rel=0.25)


@pytest.mark.parametrize("fraction", [0.002, 0.005, 0.01])
def test_sinogram_noise_is_recovered_from_detector_detail(fraction):
    op = from_spec({"modality": "ct", "image_size": 128, "n_views": 23})
    y = op.forward(ct_phantoms(2, 128, seed=5))
    level = fraction * float(y.max())
    g = torch.Generator().manual_seed(0)
    est = estimate_noise(op, y + level * torch.randn(y.shape, generator=g))
    assert est.tolist() == pytest.approx([level, level], rel=0.25)


def test_noiseless_data_estimate_far_below_realistic_noise():
    op = from_spec({"modality": "ct", "image_size": 64, "n_views": 23})
    y = op.forward(ct_phantoms(1, 64, seed=5))
    assert float(estimate_noise(op, y)[0]) < 1e-3 * float(y.max())
