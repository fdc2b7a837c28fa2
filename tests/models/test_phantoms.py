"""The procedural phantoms: determinism per seed, anatomy's HU values, MR contrasts."""

import pytest
import torch

from models.phantoms import INDEX, ct_phantoms, mri_phantoms


def test_same_seed_same_slices_and_prefix_independent_of_n():
    a = ct_phantoms(40, 32, seed=3)
    assert torch.equal(a, ct_phantoms(40, 32, seed=3))
    assert torch.equal(a[:5], ct_phantoms(5, 32, seed=3))
    assert not torch.equal(a, ct_phantoms(40, 32, seed=4))
    assert a.shape == (40, 1, 32, 32) and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 1


# Typical unenhanced CT values (HU): each tissue's median inside its label region.
RANGES = {
    "air": (-1010, -990),
    "lung": (-950, -700),
    "fat": (-140, -60),
    "muscle": (20, 70),
    "liver": (40, 80),
    "kidney": (15, 50),
    "csf": (-10, 25),
    "grey": (30, 50),
    "white": (18, 38),
    "cancellous": (120, 400),
    "cortical": (600, 2000),
}


def _core(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 4-neighbours share the label: away from partial-volume edges."""
    core = mask.clone()
    for shift, dim in ((1, 1), (-1, 1), (1, 2), (-1, 2)):
        core &= torch.roll(mask, shift, dim)
    return core


def test_tissues_have_realistic_hounsfield_units():
    hu, labels = ct_phantoms(96, 128, seed=0, hu=True, return_labels=True)
    hu = hu[:, 0]
    for tissue, (lo, hi) in RANGES.items():
        region = _core(labels == INDEX[tissue])
        assert int(region.sum()) > 200, f"{tissue} missing from the phantoms"
        median = float(hu[region].median())
        assert lo <= median <= hi, f"{tissue}: median {median:.0f} HU outside [{lo}, {hi}]"


def test_kinds_select_anatomy_and_bad_kinds_are_refused():
    _, head = ct_phantoms(16, 64, seed=1, kinds=("head",), return_labels=True)
    assert not (head == INDEX["lung"]).any() and (head == INDEX["white"]).any()
    _, chest = ct_phantoms(16, 64, seed=1, kinds=("thorax",), return_labels=True)
    assert (chest == INDEX["lung"]).any() and not (chest == INDEX["white"]).any()
    with pytest.raises(ValueError, match="kinds"):
        ct_phantoms(2, 64, kinds=("knee",))


def test_mri_contrasts_order_tissues_like_t1_and_t2():
    t1, lab = mri_phantoms(16, 64, seed=0, contrast="t1", return_labels=True)
    t2, _ = mri_phantoms(16, 64, seed=0, contrast="t2", return_labels=True)

    def med(img, tissue):
        return float(img[:, 0][lab == INDEX[tissue]].median())

    assert med(t1, "white") > med(t1, "grey") > med(t1, "csf")
    assert med(t2, "csf") > med(t2, "grey") > med(t2, "white")
    assert float(t1.min()) >= 0 and float(t1.max()) <= 1
