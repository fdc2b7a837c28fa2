"""Linear measurement operators (CT via ASTRA, MRI via FFT) and the measurement spec."""

from models.physics.base import (
    DecomposedOperator,
    LinearOperator,
    adjointness_test,
    conjugate_gradient,
)
from models.physics.spec import (
    MeasurementSpec,
    SpecError,
    from_spec,
    layout_operator,
    needs_data,
    parse_spec,
    slice_problems,
)

__all__ = [
    "DecomposedOperator",
    "LinearOperator",
    "MeasurementSpec",
    "SpecError",
    "adjointness_test",
    "conjugate_gradient",
    "from_spec",
    "layout_operator",
    "needs_data",
    "parse_spec",
    "slice_problems",
]
