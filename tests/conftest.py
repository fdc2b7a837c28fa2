import numpy as np
import pytest
import torch


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def smooth_image() -> torch.Tensor:
    """A smooth 64² test image, zero outside the inscribed circle."""
    n = 64
    yy, xx = np.mgrid[0:n, 0:n]
    img = np.exp(-((xx - 25.0) ** 2 + (yy - 35.0) ** 2) / 40) + 0.5 * np.exp(
        -((xx - 40.0) ** 2 + (yy - 22.0) ** 2) / 20
    )
    img *= (xx - 31.5) ** 2 + (yy - 31.5) ** 2 < 28**2
    return torch.tensor(img, dtype=torch.float32)[None, None]
