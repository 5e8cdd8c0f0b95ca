r"""Matrix-free groups from a permutation subgroup ``{e, σ}`` (Li et al. 2023, Theorem 3.1).

For an involution ``σ`` (``σ∘σ = e``), the maps ``T(x | a, b) = a ⊙ x + b ⊙ σ(x)`` with
``a, b ∈ ℝⁿ`` form a Lie group wherever they are invertible:

.. math::
  T(a, b)\,T(u, w) = T\big(a ⊙ u + b ⊙ σ(w),\; a ⊙ w + b ⊙ σ(u)\big), \qquad
  T(a, b)^{-1} = T\big(σ(a) ⊘ c,\; -b ⊘ c\big),\quad c = a ⊙ σ(a) - b ⊙ σ(b).

``xmat``
  ``σ`` flips the vector: ``Q`` has nonzeros on its diagonal and anti-diagonal only (an
  "X").
``butterfly``
  ``σ`` swaps the two halves (a circular shift by ``n/2``): the building block of
  butterfly/Kaleidoscope matrices.

Where ``σ`` has a fixed point (the middle entry of an odd-length ``xmat``; the last entry
of an odd-length ``butterfly``, which is left out of the half swap) ``b`` is kept at 0:
there ``a`` alone is the diagonal.

``Q`` is fitted on its own group with the relative gradient ``dQ = E Q`` of the papers'
triangular rule: with ``a = Qh`` and ``b = Q⁻ᵀv`` (closed-form inverse, ``O(n)``), ``E``
is the projection of ``aaᵀ − bbᵀ`` onto the group's two diagonals. ``O(n)`` memory and
work per leaf, so a whole model fits through ``optax.flatten``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from psgd_optax._src.normalize import lipschitz_step, scale_pair

PERMUTATIONS = ("flip", "half_swap")


class XState(NamedTuple):
  """X-shape ``Q = diag(a) + diag(b)·J`` (``J`` reverses the leaf): its diagonal ``a``,
  its anti-diagonal ``b`` and the Lipschitz estimate of its fit.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> q = psgd.xmat().init({"w": jnp.zeros(5)}).preconditioner[0]
    >>> q.diagonal.shape, q.anti_diagonal.shape
    ((1, 5), (1, 5))
  """

  diagonal: jax.Array
  anti_diagonal: jax.Array
  lipschitz: jax.Array


class ButterflyState(NamedTuple):
  """Butterfly ``Q = diag(a) + diag(b)·S`` (``S`` swaps the leaf's halves): ``a``, the
  coefficients ``b`` of the swapped entries and the Lipschitz estimate of its fit.

  Field names of its own, so that an X-shape checkpoint (same shapes, another coupling)
  is not restored as a butterfly one (Orbax refuses a target whose field it does not hold).

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> q = psgd.butterfly().init({"w": jnp.zeros(6)}).preconditioner[0]
    >>> q.diagonal.shape, q.half_swap.shape
    ((1, 6), (1, 6))
  """

  diagonal: jax.Array
  half_swap: jax.Array
  lipschitz: jax.Array


@dataclasses.dataclass(frozen=True)
class InvolutionGroup:
  """``T(x | a, b) = a ⊙ x + b ⊙ σ(x)`` over a flattened leaf, for an involution ``σ``.

  Attributes:
    shape: the leaf's shape.
    permutation: ``"flip"`` (``xmat``) or ``"half_swap"`` (``butterfly``).
    lipschitz_decay: decay of the step normalizer's moving estimate.

  Its state is an :class:`XState` or a :class:`ButterflyState`, read by position here:
  ``q[0] = a``, ``q[1] = b``, ``q[2]`` the Lipschitz estimate.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> group = psgd.xmat_group((5,))
    >>> q = group.init(2.0, jnp.float32)
    >>> bool(jnp.allclose(group.materialize(q), 4.0 * jnp.eye(5)))
    True
  """

  shape: tuple[int, ...]
  permutation: str = "flip"
  lipschitz_decay: float = 0.9

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def sigma(self, x: jax.Array) -> jax.Array:
    """``σ(x)`` for a vector."""
    if self.permutation == "flip":
      return x[::-1]
    half = self.size // 2
    return jnp.concatenate([x[half:2 * half], x[:half], x[2 * half:]])

  def moved_mask(self, dtype) -> jax.Array:
    """1 where ``σ(i) ≠ i`` (``b`` may be nonzero), 0 at fixed points."""
    index = jnp.arange(self.size)
    return (self.sigma(index) != index).astype(dtype)

  @property
  def state_type(self) -> type:
    return XState if self.permutation == "flip" else ButterflyState

  def init(self, scale, dtype) -> XState | ButterflyState:
    scale = jnp.asarray(scale, dtype)
    return self.state_type(scale * jnp.ones((self.size,), dtype),
                           jnp.zeros((self.size,), dtype), jnp.zeros([], dtype))

  def apply(self, q: XState, x: jax.Array) -> jax.Array:
    """``Q x`` for a flat ``x``."""
    return q[0] * x + q[1] * self.sigma(x)

  def apply_transpose(self, q: XState, x: jax.Array) -> jax.Array:
    """``Qᵀ x``: ``Π_σ`` is symmetric, so ``(diag(b) Π_σ)ᵀ x = σ(b ⊙ x)``."""
    return q[0] * x + self.sigma(q[1] * x)

  def _determinant_terms(self, q: XState) -> jax.Array:
    # c = a ⊙ σ(a) − b ⊙ σ(b); each 2×2 block [[a_i, b_i], [b_σi, a_σi]] has det c_i.
    return q[0] * self.sigma(q[0]) - q[1] * self.sigma(q[1])

  def solve_transpose(self, q: XState, x: jax.Array) -> jax.Array:
    """``Q⁻ᵀ x`` for a leaf-shaped ``x``, from the closed-form inverse."""
    flat = x.reshape(-1)
    c = self._determinant_terms(q)
    # Q stays invertible on its group (c ≠ 0); the guard only keeps a corrupt state finite.
    c = jnp.where(c == 0, jnp.finfo(c.dtype).tiny, c)
    inverse = self.state_type(self.sigma(q[0]) / c, -q[1] / c, q.lipschitz)
    return self.apply_transpose(inverse, flat).reshape(x.shape)

  def precondition(self, q: XState, g: jax.Array) -> jax.Array:
    return self.apply_transpose(q, self.apply(q, g.reshape(-1))).reshape(g.shape)

  def update(self, q: XState, v, h, lr, *, integrate_probe: bool) -> XState:
    del integrate_probe  # the fit needs Q⁻ᵀv explicitly
    unit, fitted, probe = scale_pair(self.apply(q, h.reshape(-1)),
                                     self.solve_transpose(q, v.reshape(-1)))
    mask = self.moved_mask(fitted.dtype)
    grad_a = fitted * fitted - probe * probe
    cross_fitted = fitted * self.sigma(fitted)
    cross_probe = probe * self.sigma(probe)
    grad_b = (cross_fitted - cross_probe) * mask
    # Row sums of |aaᵀ| + |bbᵀ| on the two diagonals bound ‖E‖₂ (E's rows have two
    # entries), so μ‖E‖ ≤ lr < 1 keeps Q invertible.
    bound = jnp.max(fitted * fitted + probe * probe
                    + mask * (jnp.abs(cross_fitted) + jnp.abs(cross_probe)))
    step, lipschitz = lipschitz_step(lr, q.lipschitz, bound, self.lipschitz_decay, unit)
    # Q ← (I − μE) Q with the group's product rule.
    a = q[0] - step * (grad_a * q[0] + grad_b * self.sigma(q[1]))
    b = q[1] - step * (grad_a * q[1] + grad_b * self.sigma(q[0]))
    return self.state_type(a, b * mask, lipschitz)

  def q_matrix(self, q: XState) -> jax.Array:
    """The dense ``Q`` (for tests and plots)."""
    eye = jnp.eye(self.size, dtype=q[0].dtype)
    return jax.vmap(lambda column: self.apply(q, column), in_axes=1, out_axes=1)(eye)

  def materialize(self, q: XState) -> jax.Array:
    matrix = self.q_matrix(q)
    return matrix.T @ matrix


def xmat_group(shape, *, lipschitz_decay=0.9) -> InvolutionGroup:
  """The X-shape group over a leaf of ``shape`` (flattened): ``Q = diag(a) + diag(b)·J``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> group = psgd.xmat_group((4,))
    >>> q = group.init(1.0, jnp.float32)._replace(anti_diagonal=jnp.array([0.5, 0, 0, 0]))
    >>> group.q_matrix(q)[0]          # row 0: diagonal 1, anti-diagonal 0.5
    Array([1. , 0. , 0. , 0.5], dtype=float32)
  """
  return InvolutionGroup(tuple(shape), "flip", lipschitz_decay)


def butterfly_group(shape, *, lipschitz_decay=0.9) -> InvolutionGroup:
  """The butterfly group over a leaf of ``shape`` (flattened): ``Q = diag(a) + diag(b)·S``,
  ``S`` swapping the two halves.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> group = psgd.butterfly_group((4,))
    >>> q = group.init(1.0, jnp.float32)._replace(half_swap=jnp.array([0.5, 0, 0, 0]))
    >>> group.q_matrix(q)[0]          # row 0 couples entry 0 with entry 2
    Array([1. , 0. , 0.5, 0. ], dtype=float32)
  """
  return InvolutionGroup(tuple(shape), "half_swap", lipschitz_decay)


def involution_group_for_options(permutation: str):
  """``group_for_options`` of ``xmat`` (``"flip"``) or ``butterfly`` (``"half_swap"``)."""
  def group_for_options(*, lipschitz_decay):
    def group_for_shape(shape, state_leaves=None):
      del state_leaves  # the shape fixes the structure
      return InvolutionGroup(tuple(shape), permutation, lipschitz_decay)
    return group_for_shape
  return group_for_options
