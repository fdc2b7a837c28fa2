import pytest
import torch

from models.physics.mri import acceleration_of, equispaced_mask, fft2c, ifft2c, random_mask


def test_fft_is_orthonormal_and_centred(rng):
    x = torch.randn(2, 1, 32, 32, generator=rng, dtype=torch.float64).to(torch.complex128)
    k = fft2c(x)
    assert torch.allclose(k.abs().pow(2).sum(), x.abs().pow(2).sum())
    assert torch.allclose(ifft2c(k), x, atol=1e-12)
    ones = torch.ones(1, 1, 32, 32, dtype=torch.complex128)
    assert fft2c(ones).abs().argmax() == 16 * 32 + 16  # DC at the centre


@pytest.mark.parametrize("maker", [equispaced_mask, random_mask])
@pytest.mark.parametrize(
    "size,accel,center", [(128, 4, 0.08), (128, 8, 0.04), (256, 8, 0.04), (320, 24, 0.02)]
)
def test_mask_acceleration_within_5_percent(maker, size, accel, center):
    mask = maker(size, accel, center)
    assert abs(acceleration_of(mask) - accel) / accel < 0.05
    n_low = max(1, round(size * center))
    start = (size - n_low + 1) // 2
    assert mask[:, start : start + n_low].all()


def test_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="acceleration"):
        equispaced_mask(64, 0.5, 0.08)
    with pytest.raises(ValueError, match="center_fraction"):
        random_mask(64, 4, 0.0)
