"""Per-axis factors of a Kronecker-product ``Q`` (also the whole ``Q`` of ``dense``/``diag``).

A factor acts on one axis of a tensor. Each kind knows how to apply itself (``Q x`` or
``Qᵀ x`` along the axis) and its ``QᵀQ``, solve with its transpose, form the partial second
moment of a tensor over all other axes, bound that moment's norm, and take one normalized
step on its group for a given :class:`~psgd_optax._src.groups.geometry.Geometry`.

``dense``
  a full ``n × n`` matrix: upper triangular under ``geometry="eq"``, symmetric positive
  definite under the inverse-free geometries.
``diagonal``
  a positive vector (the group of invertible diagonal matrices).
``normalization``
  diagonal plus last column (Li 2019 §5.3): ``Q = diag(d) + c e_nᵀ`` with ``c_n = 0``,
  stored as the ``(2, n)`` array ``[d; c]``. For an axis holding ``[features; 1]`` it
  scales and shifts the features (``x′ = Qx`` subtracts a learned mean through the
  constant 1), a group because products and inverses keep the pattern. Only the
  ``"eq"`` geometry (``Q`` is not symmetric).

The integrated second moment of a probe (``E[vvᵀ]`` over the other axes, ``c·I``) is passed
as a scalar ``c`` so that no ``n × n`` identity is ever stored.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from psgd_optax._src.groups.geometry import Geometry
from psgd_optax._src.normalize import norm, spd_norm_lower_bound


def _other_axes(ndim: int, axis: int) -> tuple[int, ...]:
  return tuple(i for i in range(ndim) if i != axis)


def _broadcast_along(vector: jax.Array, ndim: int, axis: int) -> jax.Array:
  shape = [1] * ndim
  shape[axis] = vector.shape[0]
  return vector.reshape(shape)


@dataclasses.dataclass(frozen=True)
class DenseFactor:
  """A full ``n × n`` factor."""

  size: int
  kind: str = "dense"

  def identity(self, scale, dtype) -> jax.Array:
    return jnp.asarray(scale, dtype) * jnp.eye(self.size, dtype=dtype)

  def apply(self, q, x, axis, transpose=False):
    contracted = 0 if transpose else 1
    return jnp.moveaxis(jnp.tensordot(q, x, axes=(contracted, axis)), 0, axis)

  def precondition(self, q, x, axis):
    """``QᵀQ x`` along ``axis``."""
    if self.size * self.size < x.size:
      # Forming QᵀQ (2n³ flops) and one product (2n·numel) beats two products (4n·numel)
      # when n² < numel, the axis is shorter than the rest of the leaf.
      return self.apply(q.T @ q, x, axis)
    return self.apply(q, self.apply(q, x, axis), axis, transpose=True)

  def solve_transpose(self, q, x, axis):
    """``Q⁻ᵀ x`` along ``axis`` for an upper-triangular ``Q``."""
    moved = jnp.moveaxis(x, axis, 0)
    flat = moved.reshape(self.size, -1)
    solved = solve_triangular(q, flat, trans="T", lower=False)
    return jnp.moveaxis(solved.reshape(moved.shape), 0, axis)

  def second_moment(self, x, axis):
    others = _other_axes(x.ndim, axis)
    return jnp.tensordot(x, x, axes=(others, others))

  def norm_bound(self, t1, t2):
    # T1 and T2 are second moments (symmetric positive semidefinite).
    if jnp.ndim(t2) == 0:
      return spd_norm_lower_bound(t1) + t2
    return spd_norm_lower_bound(t1 + t2)

  def step(self, q, t1, t2, step, geometry: Geometry):
    if jnp.ndim(t2) == 0:
      direction = t1 - t2 * jnp.eye(self.size, dtype=t1.dtype)
    else:
      direction = t1 - t2
    return geometry.dense_step(q, direction, step)

  def max_abs(self, q):
    return jnp.max(jnp.abs(q))

  def matrix(self, q):
    return q


@dataclasses.dataclass(frozen=True)
class DiagonalFactor:
  """A positive diagonal factor stored as a vector."""

  size: int
  kind: str = "diagonal"

  def identity(self, scale, dtype) -> jax.Array:
    return jnp.asarray(scale, dtype) * jnp.ones((self.size,), dtype=dtype)

  def apply(self, q, x, axis, transpose=False):
    del transpose  # a diagonal is its own transpose
    return x * _broadcast_along(q, x.ndim, axis)

  def precondition(self, q, x, axis):
    return x * _broadcast_along(q * q, x.ndim, axis)

  def solve_transpose(self, q, x, axis):
    return x / _broadcast_along(q, x.ndim, axis)

  def second_moment(self, x, axis):
    return jnp.sum(x * x, axis=_other_axes(x.ndim, axis))

  def norm_bound(self, t1, t2):
    return jnp.max(t1 + t2)

  def step(self, q, t1, t2, step, geometry: Geometry):
    return geometry.diagonal_step(q, t1 - t2, step)

  def max_abs(self, q):
    return jnp.max(jnp.abs(q))

  def matrix(self, q):
    return jnp.diag(q)


@dataclasses.dataclass(frozen=True)
class NormalizationFactor:
  """``Q = diag(d) + c e_nᵀ`` (``c_n = 0``), stored as ``[d; c]`` of shape ``(2, n)``."""

  size: int
  kind: str = "normalization"

  def identity(self, scale, dtype) -> jax.Array:
    ones = jnp.ones((self.size,), dtype)
    return jnp.stack([jnp.asarray(scale, dtype) * ones, 0 * ones])

  def apply(self, q, x, axis, transpose=False):
    d, c = q[0], q[1]
    scaled = x * _broadcast_along(d, x.ndim, axis)
    last = jnp.take(x, jnp.asarray([self.size - 1]), axis=axis)
    if not transpose:  # Q x = d ⊙ x + c · x_n
      return scaled + _broadcast_along(c, x.ndim, axis) * last
    # Qᵀ x = d ⊙ x + e_n (cᵀ x)
    column = jnp.sum(x * _broadcast_along(c, x.ndim, axis), axis=axis, keepdims=True)
    return scaled + column * _broadcast_along(self._last_indicator(x.dtype), x.ndim, axis)

  def precondition(self, q, x, axis):
    return self.apply(q, self.apply(q, x, axis), axis, transpose=True)

  def _last_indicator(self, dtype):
    return jnp.zeros((self.size,), dtype).at[-1].set(1)

  def solve_transpose(self, q, x, axis):
    """``Q⁻ᵀ x``: ``y_i = x_i / d_i`` for ``i < n``, then ``y_n = (x_n − cᵀy) / d_n``."""
    d, c = q[0], q[1]
    solved = x / _broadcast_along(d, x.ndim, axis)  # c_n = 0, so y_n's term drops out
    column = jnp.sum(solved * _broadcast_along(c, x.ndim, axis), axis=axis, keepdims=True)
    correction = -column / d[-1] * _broadcast_along(self._last_indicator(x.dtype), x.ndim, axis)
    return solved + correction

  def second_moment(self, x, axis):
    """The pattern's entries of ``Σ_others x xᵀ``: the diagonal and the last column."""
    others = _other_axes(x.ndim, axis)
    last = jnp.take(x, jnp.asarray([self.size - 1]), axis=axis)
    diagonal = jnp.sum(x * x, axis=others)
    column = jnp.sum(x * last, axis=others) * (1 - self._last_indicator(x.dtype))
    return jnp.stack([diagonal, column])

  def norm_bound(self, t1, t2):
    # ‖diag(e) + f e_nᵀ‖ ≤ max|e| + ‖f‖ for the pattern of |T1| + |T2|.
    if jnp.ndim(t2) == 0:
      return jnp.max(t1[0] + t2) + norm(t1[1])
    return jnp.max(t1[0] + t2[0]) + norm(t1[1]) + norm(t2[1])

  def step(self, q, t1, t2, step, geometry: Geometry):
    if not geometry.keeps_triangular:
      raise ValueError("the normalization factor moves only with geometry='eq'.")
    if jnp.ndim(t2) == 0:
      direction = t1 - jnp.stack([t2 * jnp.ones_like(t1[0]), jnp.zeros_like(t1[1])])
    else:
      direction = t1 - t2
    e, f = direction[0], direction[1]
    d, c = q[0], q[1]
    # (I − μE)Q with E = diag(e) + f e_nᵀ: the pattern is closed under products.
    return jnp.stack([d - step * e * d, c - step * (e * c + f * d[-1])])

  def max_abs(self, q):
    return jnp.max(jnp.abs(q))

  def matrix(self, q):
    return jnp.diag(q[0]).at[:, -1].add(q[1])


FACTOR_KINDS = {"dense": DenseFactor, "triangular": DenseFactor,
                "diagonal": DiagonalFactor, "normalization": NormalizationFactor}
