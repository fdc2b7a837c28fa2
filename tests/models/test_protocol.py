"""The evaluation protocol's stand-ins for the test set's kinds of slices (models/protocol.py)."""

import torch

from models.protocol import COARSE_FACTOR, close_ups, coarse_close_ups


def _slices() -> torch.Tensor:
    x = torch.zeros(2, 1, 64, 64)
    x[:, :, 8:56, 12:52] = 0.6
    x[:, :, 16:48:2, 20:44] = 0.9  # fine lines inside the object
    return x


def test_close_ups_fill_the_rows_and_leave_empty_margins_along_the_columns():
    near = close_ups(_slices())
    assert near.shape == (2, 1, 64, 64) and float(near.min()) >= 0 and float(near.max()) <= 1
    assert float(near[..., :6].abs().max()) == 0 and float(near[..., -6:].abs().max()) == 0
    assert float((near[..., 10:54] > 0.3).float().mean()) > 0.9  # the object fills the field


def test_coarse_close_ups_lose_the_fine_detail_keep_the_margins_and_are_reproducible():
    near, coarse = close_ups(_slices()), coarse_close_ups(_slices())
    assert coarse.shape == near.shape and float(coarse.min()) >= 0 and float(coarse.max()) <= 1
    assert float(coarse[..., :6].abs().max()) == 0 and float(coarse[..., -6:].abs().max()) == 0
    rows = lambda x: float((x[..., 1:, 16:48] - x[..., :-1, 16:48]).abs().mean())  # noqa: E731
    assert rows(coarse) < 0.5 * rows(near)
    assert torch.equal(coarse, coarse_close_ups(_slices()))
    assert not torch.equal(coarse, coarse_close_ups(_slices(), seed=1))  # the noise is drawn
    assert COARSE_FACTOR > 1
