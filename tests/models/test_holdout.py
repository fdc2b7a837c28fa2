"""The TV weight chosen per slice by k-space hold-out (models/holdout.py)."""

import torch

from models.holdout import NO_HOLDOUT, choose, held_lines, holdout_errors
from models.inverse import Prior, ReconConfig, reconstruct
from models.phantoms import mri_phantoms
from models.physics import from_spec
from models.physics.mri import calibration_lines, equispaced_mask
from models.sde import VESDE

MULTI = {
    "modality": "mri",
    "image_size": 32,
    "coils": 4,
    "mask": {"kind": "equispaced", "acceleration": 4},
}


def test_held_lines_are_measured_outer_lines_drawn_from_the_seed():
    mask = equispaced_mask(64, 4, 0.08)
    measured = set(mask.any(dim=0).nonzero().flatten().tolist())
    acs = set(calibration_lines(mask).tolist())
    outer = measured - acs
    held = held_lines(mask, seed=3)
    assert set(held.tolist()) <= outer and len(held) == round(0.3 * len(outer))
    assert torch.equal(held, held_lines(mask, seed=3))
    assert not torch.equal(held, held_lines(mask, seed=4))
    only_centre = torch.zeros(64, 64, dtype=torch.bool)
    only_centre[:, 28:36] = True
    assert len(held_lines(only_centre, seed=0)) == 0  # nothing outside the calibration


def test_the_weight_whose_image_predicts_the_held_lines_is_chosen_per_slice():
    """Each slice gets the candidate whose solve, from the other lines only, matches its
    held-out lines; the solve never sees those lines."""
    op = from_spec(MULTI)
    truth = mri_phantoms(2, 32, seed=1).to(torch.complex64)
    y = op.forward(truth)

    def solve(kept, y_kept, weight, seed):
        held = op.mask & ~kept.mask
        assert held.any() and not (y_kept * held).abs().any() and y_kept.shape[0] == 1
        assert torch.equal(held.any(dim=0).nonzero().flatten(), held_lines(op.mask, seed))
        # weight 1 suits slice 0 (seed 0), weight 2 slice 1 (seed 1); the other gets zeros
        return truth[seed : seed + 1] * (weight == 1.0 + seed)

    errors = holdout_errors(op, y, (1.0, 2.0), solve, seed=0)
    assert errors.shape == (2, 2) and errors[0, 0] < 1e-6 * errors[0, 1]
    weights, how = choose(op, y, (1.0, 2.0), solve, 0, fallback=5.0)
    assert weights == [1.0, 2.0] and how == "k-space hold-out"
    single = from_spec({k: v for k, v in MULTI.items() if k != "coils"})
    assert choose(single, y, (1.0, 2.0), solve, 0, fallback=5.0)[0] == [5.0, 5.0]


def test_reconstruct_solves_each_slice_at_its_chosen_weight():
    """One candidate: the hold-out picks it, and the result equals a solve at that weight;
    the provenance says which weight each slice got and how; progress counts every solve."""
    op = from_spec(MULTI)
    truth = mri_phantoms(2, 32, seed=2)
    y = op.forward(truth.to(torch.complex64))
    sde = VESDE(0.01, 5.0, N=10)
    prior = Prior(lambda x, t: -x / (1 + sde.sigma(t)[:, None, None, None] ** 2), sde, 32)
    fixed = ReconConfig(n_steps=6, tv=30.0, ood=False)
    held = ReconConfig(n_steps=6, tv=0.0, tv_holdout=(30.0,), ood=False)
    seen: list[tuple[int, int]] = []
    a = reconstruct(op, y, prior, fixed, 2, seed=1, noise_std=0.01)
    b = reconstruct(
        op, y, prior, held, 2, seed=1, noise_std=0.01, progress=lambda i, n: seen.append((i, n))
    )
    assert torch.allclose(a.mean, b.mean, atol=1e-6)
    assert b.provenance["tv_used"] == [30.0, 30.0]
    assert b.provenance["tv_chosen_by"] == "k-space hold-out"
    assert a.provenance["tv_chosen_by"] == "configured"
    assert seen[-1][0] == seen[-1][1] == 2 * 6  # the hold-out solve, then the reconstruction
    two = reconstruct(
        op, y, prior, ReconConfig(n_steps=6, tv_holdout=(0.0, 1e4), ood=False), 2, 1, 0.01
    )
    assert set(two.provenance["tv_used"]) <= {0.0, 1e4}
    alone = reconstruct(
        op, y[1:], prior, ReconConfig(n_steps=6, tv_holdout=(0.0, 1e4), ood=False), 2, 2, 0.01
    )  # slice 1 of a stack seeded 1 is slice 0 of one seeded 2
    assert alone.provenance["tv_used"] == two.provenance["tv_used"][1:]
    assert torch.allclose(alone.mean, two.mean[1:], atol=1e-5)


def test_an_operator_without_lines_to_hold_out_keeps_the_configured_weight():
    """Single-coil MRI (no ``without_lines``) solves at ``tv``, and says so; its progress
    counts the reconstruction alone."""
    single = from_spec({k: v for k, v in MULTI.items() if k != "coils"})
    truth = mri_phantoms(1, 32, seed=3)
    y = single.forward(truth)
    sde = VESDE(0.01, 5.0, N=10)
    prior = Prior(lambda x, t: -x / (1 + sde.sigma(t)[:, None, None, None] ** 2), sde, 32)
    seen: list[tuple[int, int]] = []
    config = ReconConfig(n_steps=6, tv=5.0, tv_holdout=(1.0, 2.0), ood=False)
    rec = reconstruct(single, y, prior, config, 1, 0, 0.01, lambda i, n: seen.append((i, n)))
    assert rec.provenance["tv_used"] == [5.0]
    assert rec.provenance["tv_chosen_by"] == NO_HOLDOUT
    assert seen[-1] == (6, 6)
