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

from psgd_optax._src.family import (LIPSCHITZ_DECAY_DOC, LIPSCHITZ_DECAY_OPTION,
                                     check_lipschitz_decay, preconditioner_family)
from psgd_optax._src.normalize import lipschitz_update, safe_step

PERMUTATIONS = ("flip", "half_swap")


class XState(NamedTuple):
  """``Q = diag(a) + diag(b)·Π_σ`` and the Lipschitz estimate of its fit."""

  a: jax.Array
  b: jax.Array
  lipschitz: jax.Array


@dataclasses.dataclass(frozen=True)
class InvolutionGroup:
  """``T(x | a, b) = a ⊙ x + b ⊙ σ(x)`` over a flattened leaf, for an involution ``σ``.

  Attributes:
    shape: the leaf's shape.
    permutation: ``"flip"`` (``xmat``) or ``"half_swap"`` (``butterfly``).
    lipschitz_decay: decay of the step normalizer's moving estimate.
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

  def init(self, scale, dtype) -> XState:
    scale = jnp.asarray(scale, dtype)
    return XState(a=scale * jnp.ones((self.size,), dtype), b=jnp.zeros((self.size,), dtype),
                  lipschitz=jnp.zeros([], dtype))

  def apply(self, q: XState, x: jax.Array) -> jax.Array:
    """``Q x`` for a flat ``x``."""
    return q.a * x + q.b * self.sigma(x)

  def apply_transpose(self, q: XState, x: jax.Array) -> jax.Array:
    """``Qᵀ x``: ``Π_σ`` is symmetric, so ``(diag(b) Π_σ)ᵀ x = σ(b ⊙ x)``."""
    return q.a * x + self.sigma(q.b * x)

  def _determinant_terms(self, q: XState) -> jax.Array:
    # c = a ⊙ σ(a) − b ⊙ σ(b); each 2×2 block [[a_i, b_i], [b_σi, a_σi]] has det c_i.
    return q.a * self.sigma(q.a) - q.b * self.sigma(q.b)

  def solve_transpose(self, q: XState, x: jax.Array) -> jax.Array:
    """``Q⁻ᵀ x`` for a leaf-shaped ``x``, from the closed-form inverse."""
    flat = x.reshape(-1)
    c = self._determinant_terms(q)
    # Q stays invertible on its group (c ≠ 0); the guard only keeps a corrupt state finite.
    c = jnp.where(c == 0, jnp.finfo(c.dtype).tiny, c)
    inverse = XState(a=self.sigma(q.a) / c, b=-q.b / c, lipschitz=q.lipschitz)
    return self.apply_transpose(inverse, flat).reshape(x.shape)

  def precondition(self, q: XState, g: jax.Array) -> jax.Array:
    return self.apply_transpose(q, self.apply(q, g.reshape(-1))).reshape(g.shape)

  def update(self, q: XState, v, h, lr, *, integrate_probe: bool) -> XState:
    del integrate_probe  # the fit needs Q⁻ᵀv explicitly
    fitted = self.apply(q, h.reshape(-1))
    probe = self.solve_transpose(q, v.reshape(-1))
    mask = self.moved_mask(fitted.dtype)
    grad_a = fitted * fitted - probe * probe
    cross_fitted = fitted * self.sigma(fitted)
    cross_probe = probe * self.sigma(probe)
    grad_b = (cross_fitted - cross_probe) * mask
    # Row sums of |aaᵀ| + |bbᵀ| on the two diagonals bound ‖E‖₂ (E's rows have two
    # entries), so μ‖E‖ ≤ lr < 1 keeps Q invertible.
    bound = jnp.max(fitted * fitted + probe * probe
                    + mask * (jnp.abs(cross_fitted) + jnp.abs(cross_probe)))
    lipschitz = lipschitz_update(q.lipschitz, bound, self.lipschitz_decay)
    step = safe_step(lr, lipschitz)
    # Q ← (I − μE) Q with the group's product rule.
    a = q.a - step * (grad_a * q.a + grad_b * self.sigma(q.b))
    b = q.b - step * (grad_a * q.b + grad_b * self.sigma(q.a))
    return XState(a=a, b=b * mask, lipschitz=lipschitz)

  def q_matrix(self, q: XState) -> jax.Array:
    """The dense ``Q`` (for tests and plots)."""
    eye = jnp.eye(self.size, dtype=q.a.dtype)
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
    >>> q = group.init(1.0, jnp.float32)._replace(b=jnp.array([0.5, 0.0, 0.0, 0.0]))
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
    >>> q = group.init(1.0, jnp.float32)._replace(b=jnp.array([0.5, 0.0, 0.0, 0.0]))
    >>> group.q_matrix(q)[0]          # row 0 couples entry 0 with entry 2
    Array([1. , 0. , 0.5, 0. ], dtype=float32)
  """
  return InvolutionGroup(tuple(shape), "half_swap", lipschitz_decay)


def _group_for_options(permutation):
  def group_for_options(*, lipschitz_decay):
    def group_for_shape(shape, state_leaves=None):
      del state_leaves
      return InvolutionGroup(tuple(shape), permutation, lipschitz_decay)
    return group_for_shape
  return group_for_options


_OPTIONS = [LIPSCHITZ_DECAY_OPTION]

xmat = preconditioner_family(
    "xmat", __name__, _OPTIONS, _group_for_options("flip"), check_lipschitz_decay,
    r"""PSGD with an X-shape preconditioner per leaf: ``Q = diag(a) + diag(b)·J``.

  ``J`` reverses the flattened leaf, so ``Q`` has nonzeros on its diagonal and
  anti-diagonal: each parameter is coupled with its mirror image, at ``O(n)`` cost.

  .. math::
    Q \leftarrow Q - \frac{\mu}{L}\,\Pi_X\!\big(a a^\top - b b^\top\big)\,Q,
    \qquad a = Q h,\; b = Q^{-\top} v,

  where :math:`\Pi_X` keeps the diagonal and anti-diagonal. For the whole model as one
  vector use ``optax.flatten(psgd.xmat())``.

  Args:
""" + LIPSCHITZ_DECAY_DOC + """
{engine_args}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` returning ``P g``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> tx = psgd.xmat(curvature="newton", update_probability=1.0, precond_lr=0.5)
    >>> state = tx.init(jnp.zeros(4))
    >>> q = state.preconditioner["leaves_0"]
    >>> q.a.shape, q.b.shape
    ((4,), (4,))

  References:
    Li, Xu and Demir, *Curvature-informed SGD via general purpose Lie-group
    preconditioners*, 2023 (Theorem 3.1, Example 2).
""")

butterfly = preconditioner_family(
    "butterfly", __name__, _OPTIONS, _group_for_options("half_swap"),
    check_lipschitz_decay,
    r"""PSGD with a butterfly preconditioner per leaf: ``Q = diag(a) + diag(b)·S``.

  ``S`` swaps the two halves of the flattened leaf (a circular shift by ``n/2``; for odd
  ``n`` the last entry stays on the diagonal), so each parameter is coupled with the one
  half a leaf away. Same fit and cost as :func:`psgd_optax.xmat`.

  Args:
""" + LIPSCHITZ_DECAY_DOC + """
{engine_args}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` returning ``P g``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> tx = psgd.butterfly()
    >>> params = {"w": jnp.zeros((3, 3))}
    >>> state = tx.init(params)
    >>> psgd.preconditioner_per_leaf(state, params)["w"].a.shape
    (9,)

  References:
    Li, Xu and Demir, *Curvature-informed SGD via general purpose Lie-group
    preconditioners*, 2023 (Theorem 3.1, Example 3).
""")
