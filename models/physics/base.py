"""The linear measurement operator contract shared by CT and MRI.

Every operator maps a batch of images ``(B, 1, H, W)`` to measurements and back:
``forward`` is :math:`A`, ``adjoint`` is :math:`A^*` under the real inner product
:math:`\\langle a, b\\rangle = \\mathrm{Re}\\sum \\bar a b`. Operators that admit the
decomposition of Proposition 8.1 (seed 002, ch. 8.3.1),

.. math:: A = \\mathcal{P}(\\Lambda)\\, T,

also expose ``T``, ``T_inv``, the boolean ``mask`` :math:`\\Lambda` on T's range,
``subsample`` (:math:`\\mathcal{P}(\\Lambda)`) and ``pad`` (:math:`\\mathcal{P}^{-1}(\\Lambda)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def real_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Real inner product Re<a, b> summed over everything, in float64."""
    if a.is_complex() or b.is_complex():
        return (torch.conj(a.to(torch.complex128)) * b.to(torch.complex128)).real.sum()
    return (a.double() * b.double()).sum()


class LinearOperator:
    """A linear map from images ``(B, 1, H, W)`` to measurements."""

    image_size: int

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) of the images; N×N unless an operator says otherwise."""
        return (self.image_size, self.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def measurement_shape(self) -> tuple[int, ...]:
        """Shape of one measurement (without the batch dimension)."""
        x = torch.zeros(1, 1, *self.image_shape)
        return tuple(self.forward(x).shape[1:])

    @property
    def complex_measurements(self) -> bool:
        """True when measurements are complex (k-space), False for real ones (sinograms)."""
        return self.forward(torch.zeros(1, 1, *self.image_shape)).is_complex()

    @property
    def has_decomposition(self) -> bool:
        """True when ``A = P(Λ) T`` with an invertible T (Proposition 8.1)."""
        return False

    def norm(self, n_iter: int = 30, seed: int = 0) -> float:
        """Operator norm ||A||_2 by power iteration on A*A (used for step sizes)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 1, *self.image_shape, generator=g)
        x = x / x.norm()
        value = 0.0
        for _ in range(n_iter):
            z = self.adjoint(self.forward(x))
            value = float(z.norm())
            x = z / value
        return value**0.5

    def pseudo_inverse(
        self, y: torch.Tensor, n_iter: int = 50, x0: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Least-squares solution of ``A x = y`` by CG on the normal equations A*A x = A*y."""
        return conjugate_gradient(
            lambda v: self.adjoint(self.forward(v)), self.adjoint(y), n_iter=n_iter, x0=x0
        )


class DecomposedOperator(LinearOperator):
    """An operator ``A = P(Λ) T`` (Proposition 8.1); subclasses define T, T_inv and Λ.

    ``mask`` is a boolean tensor of T's range shape (without batch and channel). When
    Λ keeps whole lines along one axis (sparse-view angles, Cartesian k-space lines),
    ``subsample`` keeps the measurement structured by selecting those lines; otherwise
    (metal trace removal, arbitrary 2D masks) it returns the kept entries as ``(B, 1, m)``.
    """

    mask: torch.Tensor

    def T(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def T_adjoint(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def T_inv(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def has_decomposition(self) -> bool:
        return True

    def _line_selection(self) -> tuple[int, torch.Tensor] | None:
        """(axis, kept indices) when Λ is constant along all but one axis, else None."""
        m = self.mask
        for axis in range(m.ndim):
            other = tuple(a for a in range(m.ndim) if a != axis)
            reduced_any = m.any(dim=other) if other else m
            reduced_all = m.all(dim=other) if other else m
            if torch.equal(reduced_any, reduced_all):
                return axis, torch.nonzero(reduced_any).flatten()
        return None

    def range_shape(self) -> tuple[int, ...]:
        """Shape of one element of T's range (without the batch dimension), from Λ alone."""
        return (1, *self.mask.shape)

    def measurement_shape(self) -> tuple[int, ...]:
        """Shape of ``P(Λ) T x`` from Λ alone: validating a request never runs T (a large
        declared geometry would otherwise cost a full projection before any check)."""
        sel = self._line_selection()
        if sel is None:
            return (1, int(self.mask.sum()))
        axis, idx = sel
        shape = list(self.mask.shape)
        shape[axis] = len(idx)
        return (1, *shape)

    def subsample(self, z: torch.Tensor) -> torch.Tensor:
        """P(Λ): keep the entries of ``z`` (in T's range) that Λ marks as measured."""
        sel = self._line_selection()
        if sel is not None:
            axis, idx = sel
            return torch.index_select(z, z.ndim - self.mask.ndim + axis, idx.to(z.device))
        return z[..., self.mask.to(z.device)]

    def pad(self, y: torch.Tensor) -> torch.Tensor:
        """P⁻¹(Λ): place measured entries back in T's range, zeros elsewhere."""
        lead = y.shape[:2]
        out = torch.zeros(*lead, *self.mask.shape, dtype=y.dtype, device=y.device)
        sel = self._line_selection()
        if sel is not None:
            axis, idx = sel
            return out.index_copy(2 + axis, idx.to(y.device), y)
        out[..., self.mask.to(y.device)] = y
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.subsample(self.T(x))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.T_adjoint(self.pad(y))


def conjugate_gradient(
    normal_op,
    rhs: torch.Tensor,
    n_iter: int = 50,
    tol: float = 1e-6,
    x0: torch.Tensor | None = None,
    each: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Solve ``M x = rhs`` for a symmetric (Hermitian) positive semi-definite ``M``, batched.

    Real or complex: inner products are Re⟨a, b⟩, so a Hermitian ``M`` on complex images
    is solved as the symmetric real operator it is on (real, imaginary) pairs. Each batch
    element has its own step sizes; iteration stops when every residual has dropped below
    ``tol`` times the norm of its right-hand side. ``each`` is called before every iteration
    and may raise to stop a long solve (a job's cancel check).
    """
    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - normal_op(x) if x0 is not None else rhs.clone()
    p = r.clone()
    dims = tuple(range(1, rhs.ndim))

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.conj() * b).real.sum(dim=dims, keepdim=True)

    rs = dot(r, r)
    stop = (tol * rhs.flatten(1).norm(dim=1)).view(-1, *([1] * (rhs.ndim - 1))) ** 2
    for _ in range(n_iter):
        if bool((rs <= stop).all()):
            break
        if each is not None:
            each()
        mp = normal_op(p)
        alpha = rs / dot(p, mp).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * mp
        rs_new = dot(r, r)
        p = r + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    return x


@dataclass(frozen=True)
class AdjointReport:
    """Outcome of a dot-product test: |<Ax, y> - <x, A*y>| relative to their size."""

    lhs: float
    rhs: float
    relative_mismatch: float


def adjointness_test(
    op: LinearOperator, batch: int = 2, seed: int = 0, generator: torch.Generator | None = None
) -> AdjointReport:
    """Dot-product test ``<A x, y> = <x, A* y>`` with random x and y.

    >>> from models.physics.mri import MRIOperator, equispaced_mask
    >>> op = MRIOperator(16, equispaced_mask(16, 4, 0.125))
    >>> adjointness_test(op).relative_mismatch < 1e-5
    True
    """
    g = generator or torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, *op.image_shape, generator=g)
    ax = op.forward(x)
    y = torch.randn(ax.shape, generator=g, dtype=torch.float32)
    if ax.is_complex():
        y = torch.complex(y, torch.randn(ax.shape, generator=g))
    lhs = float(real_inner(ax, y))
    rhs = float(real_inner(x, op.adjoint(y)))
    scale = max(abs(lhs), abs(rhs), 1e-30)
    return AdjointReport(lhs, rhs, abs(lhs - rhs) / scale)
