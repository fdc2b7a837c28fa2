"""Every operator joins this suite: adjointness, autograd, shapes, T_inv∘T and P⁻¹P."""

import pytest
import torch

from models.physics import adjointness_test, from_spec
from models.physics.ct import metal_trace_operator, sparse_view
from models.physics.mri import MRIOperator, MultiCoilMRIOperator, birdcage_sensitivities

OPERATORS = {
    "ct-parallel-23": lambda: from_spec({"modality": "ct", "image_size": 32, "n_views": 23}),
    "ct-parallel-180": lambda: from_spec({"modality": "ct", "image_size": 32, "n_views": 180}),
    "ct-fan-30": lambda: from_spec(
        {
            "modality": "ct",
            "geometry": "fan",
            "image_size": 32,
            "n_views": 30,
            "source_distance": 100,
            "detector_distance": 60,
        }
    ),
    "ct-explicit-angles": lambda: from_spec(
        {"modality": "ct", "image_size": 32, "angles": [0.05, 0.9, 2.2]}
    ),
    "ct-metal-trace": lambda: metal_trace_operator(
        sparse_view(32, 60),
        torch.zeros(32, 32, dtype=torch.bool).index_fill_(0, torch.tensor([14, 15]), True)
        & torch.zeros(32, 32, dtype=torch.bool).index_fill_(1, torch.tensor([20, 21]), True),
    ),
    "mri-equispaced-4": lambda: from_spec(
        {
            "modality": "mri",
            "image_size": 32,
            "mask": {"kind": "equispaced", "acceleration": 4, "center_fraction": 0.08},
        }
    ),
    "mri-random-8": lambda: from_spec(
        {
            "modality": "mri",
            "image_size": 32,
            "mask": {"kind": "random", "acceleration": 8, "center_fraction": 0.08, "seed": 3},
        }
    ),
    "mri-explicit-2d": lambda: MRIOperator(
        32, torch.rand(32, 32, generator=torch.Generator().manual_seed(0)) < 0.3
    ),
    "mri-multicoil": lambda: MultiCoilMRIOperator(
        32,
        from_spec(
            {"modality": "mri", "image_size": 32, "mask": {"kind": "equispaced", "acceleration": 4}}
        ).mask,
        birdcage_sensitivities(32, 4),
    ),
}


@pytest.fixture(params=sorted(OPERATORS))
def op(request):
    return OPERATORS[request.param]()


def test_adjointness(op):
    assert adjointness_test(op).relative_mismatch < 1e-4


def test_gradient_through_forward_and_adjoint(op):
    """Autograd through A and A* matches the analytic gradients A*r and A r (gradcheck form)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, op.image_size, op.image_size, generator=g, requires_grad=True)
    y = op.forward(x.detach())
    r = torch.randn(y.shape, generator=g, dtype=torch.float32)
    if y.is_complex():
        r = torch.complex(r, torch.randn(y.shape, generator=g))
    loss = (torch.conj(op.forward(x)) * r).real.sum()
    (grad,) = torch.autograd.grad(loss, x)
    expected = op.adjoint(r)
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    v = r.clone().requires_grad_(True) if not r.is_complex() else r.clone().requires_grad_(True)
    back = (op.adjoint(v) * x.detach()).sum()
    (gv,) = torch.autograd.grad(back, v)
    fx = op.forward(x.detach())
    assert torch.allclose(
        gv.real if gv.is_complex() else gv, fx.real, rtol=1e-4, atol=1e-4 * fx.abs().max()
    )


def test_pad_inverts_subsample(op):
    if not op.has_decomposition:
        pytest.skip("no Proposition 8.1 decomposition (multi-coil)")
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 1, *op.mask.shape, generator=g)
    padded = op.pad(op.subsample(z))
    assert torch.equal(padded, z * op.mask)
    assert op.subsample(z).shape[1:] == op.measurement_shape()


def test_measurement_shape_and_dtype_come_from_the_mask_without_running_the_operator(op):
    """The analytic shapes (used to validate uploads) agree with what the operator computes,
    and a decomposed operator finds them without running T."""
    x = torch.zeros(1, 1, op.image_size, op.image_size)
    y = op.forward(x)
    expected = (tuple(y.shape[1:]), y.is_complex())
    if op.has_decomposition:
        full = tuple(op.T(x).shape[1:])

        def refuse(*_):
            raise AssertionError("T ran")

        op.T = op.forward = refuse
        assert tuple(op.range_shape()) == full
    assert (tuple(op.measurement_shape()), op.complex_measurements) == expected
