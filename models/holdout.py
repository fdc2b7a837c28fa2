"""A regularisation weight chosen per slice by k-space hold-out (cross-validation).

No single weight of the score solver's TV term suits every scan: a slice like the prior's
training data wants little TV, a coarse or smooth scan unlike them much more (at 8× the
validation slices differ by 1-2 dB between λ 10 and 40, in opposite directions; see
docs/benchmarks/mri_multicoil.md). The data say which: a fraction of the measured lines
outside the calibration region is held out, the slice is solved from the rest at each
candidate weight, and the weight whose image best predicts the held-out lines,
min ||M_held (A x_λ − y)||², is chosen. This is the validation-error rule of CS-MRI's
parameter selection applied to k-space the scanner measured; it needs no ground truth and
no training, only one extra solve per candidate.

Only operators that can drop measured lines take part (``without_lines``: multi-coil
Cartesian MRI); others keep the configured weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.physics.base import LinearOperator
from models.physics.mri import calibration_lines

# Fraction of the measured lines outside the calibration region held out; at least
# MIN_HELD, and never all of them (at least MIN_KEPT stay).
FRACTION, MIN_HELD, MIN_KEPT = 0.3, 1, 1

# How a weight was chosen, as the provenance says it.
HOLDOUT, NO_HOLDOUT = "k-space hold-out", "configured (no lines to hold out)"

# (operator without the held lines, one slice's measurement, candidate weight, seed)
# -> its complex image
Solve = Callable[[LinearOperator, torch.Tensor, float, int], torch.Tensor]


def supports_holdout(op: LinearOperator) -> bool:
    """Whether ``op`` can drop measured lines (a Cartesian line mask)."""
    return hasattr(op, "without_lines") and hasattr(op, "mask")


def held_lines(mask: torch.Tensor, seed: int, fraction: float = FRACTION) -> torch.Tensor:
    """Columns of ``mask`` (H × W, lines along the columns) to hold out: a random ``fraction``
    of the measured ones outside the calibration region, drawn from ``seed``; empty where
    fewer than MIN_HELD + MIN_KEPT such lines exist."""
    measured = mask.any(dim=0).nonzero().flatten()
    acs = set(calibration_lines(mask).tolist())
    outer = torch.tensor([int(c) for c in measured if int(c) not in acs], dtype=torch.long)
    if len(outer) < MIN_HELD + MIN_KEPT:
        return torch.zeros(0, dtype=torch.long)
    n = min(max(MIN_HELD, round(fraction * len(outer))), len(outer) - MIN_KEPT)
    gen = torch.Generator().manual_seed(seed)
    return outer[torch.randperm(len(outer), generator=gen)[:n]].sort().values


def holdout_errors(
    op: LinearOperator,
    y: torch.Tensor,
    candidates: tuple[float, ...],
    solve: Solve,
    seed: int,
    fraction: float = FRACTION,
) -> torch.Tensor | None:
    """(B, len(candidates)) squared errors of each candidate's image on the held-out lines of
    each of the B slices in ``y``; ``None`` where ``op`` cannot hold lines out or too few
    lines are measured. Slice i holds out lines drawn from ``seed + i`` and is solved with
    that seed, so a slice's weight is the same alone or in a stack (models.inverse)."""
    if not supports_holdout(op):
        return None
    rows = []
    for i in range(y.shape[0]):
        lines = held_lines(op.mask, seed + i, fraction)
        if len(lines) == 0:
            return None
        kept = op.without_lines(lines)
        held = op.mask & ~kept.mask
        yi = y[i : i + 1]
        errors = []
        for weight in candidates:
            r = (op.forward(solve(kept, yi * kept.mask, weight, seed + i)) - yi) * held
            errors.append(float(r.abs().pow(2).sum()))
        rows.append(errors)
    return torch.tensor(rows, dtype=torch.float64)


def choose(
    op: LinearOperator,
    y: torch.Tensor,
    candidates: tuple[float, ...],
    solve: Solve,
    seed: int,
    fallback: float,
    fraction: float = FRACTION,
) -> tuple[list[float], str]:
    """Each slice's weight among ``candidates`` with the least hold-out error, and how it was
    chosen; ``fallback`` for every slice where no hold-out is possible."""
    errors = holdout_errors(op, y, candidates, solve, seed, fraction)
    if errors is None:
        return [fallback] * y.shape[0], NO_HOLDOUT
    picked = errors.argmin(dim=1)
    return [float(candidates[int(i)]) for i in picked], HOLDOUT
