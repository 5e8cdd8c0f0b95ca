"""Per-axis factors of a Kronecker-product ``Q`` (also the whole ``Q`` of ``dense``/``diag``).

A factor acts on one axis of a tensor. Each kind knows how to apply itself (``Q x`` or
``Qᵀ x`` along the axis), solve with its transpose, form the partial second moment of a
tensor over all other axes, bound that moment's norm, and take one normalized step on its
group for a given :class:`~psgd_optax._src.groups.geometry.Geometry`.

``dense``
  a full ``n × n`` matrix: upper triangular under ``geometry="eq"``, symmetric positive
  definite under the inverse-free geometries.
``diagonal``
  a positive vector (the group of invertible diagonal matrices).

The integrated second moment of a probe (``E[vvᵀ]`` over the other axes, ``c·I``) is passed
as a scalar ``c`` so that no ``n × n`` identity is ever stored.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from psgd_optax._src.groups.geometry import Geometry
from psgd_optax._src.normalize import spectral_norm_lower_bound


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
    if jnp.ndim(t2) == 0:
      return spectral_norm_lower_bound(t1) + t2
    return spectral_norm_lower_bound(t1 + t2)

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


FACTOR_KINDS = {"dense": DenseFactor, "diagonal": DiagonalFactor}
