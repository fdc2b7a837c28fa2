"""The evaluation protocol's stand-ins for the test set's kinds of slices (models/protocol.py)."""

import pytest
import torch

from models.protocol import (
    COARSE_FACTOR,
    close_ups,
    coarse_close_ups,
    fine_slices,
    validation_slices,
)
from models.realdata import available


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


def test_mr_validation_holds_close_ups_and_coarse_close_ups_of_its_slices_ct_only_slices():
    """The MR test set holds a coarse field-filling volume; MR validation stands in for it."""
    if not available():
        pytest.skip("no real data fetched (make realdata / scorerecon data fetch)")
    fine = fine_slices("mri", "val", 32, 2)
    mr = validation_slices("mri", 32, 2)
    assert mr.shape == (6, 1, 64, 64)
    assert torch.equal(mr[:2], fine) and torch.equal(mr[2:4], close_ups(fine))
    assert torch.equal(mr[4:], coarse_close_ups(fine))
    assert torch.equal(validation_slices("ct", 32, 2), fine_slices("ct", "val", 32, 2))
