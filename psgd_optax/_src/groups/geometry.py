r"""How a factor of ``Q`` moves on its group (the ``geometry=`` option).

Every geometry fits the same criterion ``E[hᵀPh + vᵀP⁻¹v]`` with ``P = QᵀQ`` and has the
same fixed point ``P E[hhᵀ] P = E[vvᵀ]`` (so ``P → |H|⁻¹`` for Newton pairs and
``P → C^{-1/2}`` for whitening pairs). They differ in the tangent direction they take:

``"eq"``
  The papers' rule (Li, 2019, eq. 19–20): ``dQ = E Q`` with ``E`` upper triangular,

  .. math:: Q \leftarrow Q - \tfrac{\mu}{L}\,\mathrm{triu}(a a^\top - b b^\top)\,Q,
            \quad a = Q h,\; b = Q^{-\top} v,

  which keeps ``Q`` upper triangular and needs a triangular solve for ``b``.
``"q0.5eq1.5"`` (default)
  ``dQ = Q^{1/2} E Q^{3/2}`` for symmetric positive definite ``Q``. The relative gradient is
  then inverse-free:

  .. math:: Q \leftarrow Q - \tfrac{\mu}{L}\,(P h h^\top P - v v^\top)\,Q,

  followed by one step of an online orthogonal Procrustes solver that rotates ``Q`` back
  towards the SPD cone (the rotation leaves ``QᵀQ`` unchanged).
``"quad"``
  The same inverse-free direction applied as a symmetric quadratic form,
  ``Q ← (I − μE/2L) Q (I − μE/2L)``, which keeps ``Q`` SPD without a Procrustes step.

For diagonal factors all three coincide to first order; ``"quad"`` uses the squared gain.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

GEOMETRIES = ("q0.5eq1.5", "eq", "quad")


def procrustes_step(q: jax.Array, max_step: float = 0.125) -> jax.Array:
  """One step of an online solver for ``min_U ‖U Q − I‖_F`` over rotations ``U``.

  Rotates ``Q`` by ``exp(aR) ≈ I + aR + a²R²/2`` with the skew generator
  ``R = (Qᵀ − Q) / ‖Qᵀ − Q‖_F`` and a line-searched ``a ≤ max_step``. Rotations leave
  ``QᵀQ`` unchanged, so the preconditioner is untouched while ``Q`` drifts back towards
  symmetric. The Frobenius norm bounds the spectral one, so ``‖aR‖₂ ≤ max_step`` as with a
  spectral normalization, for one reduction instead of a norm estimate's five.

  Args:
    q: a square matrix, near symmetric positive definite.
    max_step: the largest rotation angle (keep ≤ 1/4: the exponential is expanded to
      second order).

  Returns:
    The rotated matrix.
  """
  # R is kept as S = (Qᵀ − Q)/max|Q| (entries ≤ 2, made in one pass over Q) and the
  # scalar 1/‖S‖_F, so S is the only copy of the skew part; every product below is of S.
  magnitude = jnp.max(jnp.abs(q))
  skew = (q.T - q) / jnp.where(magnitude > 0, magnitude, 1.0)
  # ‖S‖_F² and tr(SQ) in one reduction. The traces are read elementwise (S skew, S²
  # symmetric): tr(SQ) = Σᵢⱼ SᵢⱼQⱼᵢ = −Σᵢⱼ SᵢⱼQᵢⱼ and tr(S²Q) = Σᵢⱼ (S²)ᵢⱼQᵢⱼ.
  # One variadic reduction: a single kernel, and no stacked (2, n, n) copy of the products
  # (a stack of the two products materialized ~2 MB per 512-wide factor).
  zero = jnp.zeros((), q.dtype)
  sums = jax.lax.reduce((skew * skew, skew * q), (zero, zero),
                        lambda a, b: (a[0] + b[0], a[1] + b[1]), (0, 1))
  norm_squared = sums[0]
  inverse_norm = jnp.where(norm_squared > 0,
                           jax.lax.rsqrt(jnp.where(norm_squared > 0, norm_squared, 1.0)), 0.0)
  squared = skew @ skew
  slope = -sums[1] * inverse_norm  # tr(RQ) ≥ 0 in exact arithmetic
  curvature = jnp.sum(squared * q) * inverse_norm * inverse_norm  # tr(R²Q)
  concave = curvature < 0
  best = -slope / jnp.where(concave, curvature, -1.0)
  angle = jnp.where(concave, jnp.minimum(best, max_step), max_step)
  angle = jnp.where(slope > 0, angle, 0.0)
  # exp(aR)·Q ≈ (I + aR + a²R²/2)·Q as one product, with aR = (a/‖S‖_F)·S.
  scaled_angle = (angle * inverse_norm).astype(q.dtype)
  eye = jnp.eye(q.shape[0], dtype=q.dtype)
  return (eye + scaled_angle * (skew + (0.5 * scaled_angle) * squared)) @ q


@dataclasses.dataclass(frozen=True)
class Geometry:
  """A way of moving ``Q``; see the module docstring for the math.

  Attributes:
    name: one of ``GEOMETRIES``.
    uses_inverse: whether the fit uses ``(Q h, Q⁻ᵀ v)`` (the ``"eq"`` rule) rather than
      the inverse-free ``(P h, v)``.
  """

  name: str

  @property
  def uses_inverse(self) -> bool:
    return self.name == "eq"

  @property
  def keeps_triangular(self) -> bool:
    return self.name == "eq"

  def dense_step(self, q: jax.Array, direction: jax.Array, step) -> jax.Array:
    """Moves a dense factor against the relative gradient ``direction``."""
    # Q − μE·Q is applied as (I − μE)·Q: the elementwise I − μE replaces E in the product,
    # so neither E nor E·Q is kept beside Q (the same product, one n×n array fewer).
    eye = jnp.eye(q.shape[0], dtype=q.dtype)
    # E is symmetric in exact arithmetic; its rounding may not be. Made exactly symmetric,
    # a symmetric Q (the first fit's, from s·I) stays so, and the Procrustes step sees no
    # rounding-level skew part, whose normalization has no meaningful derivative.
    direction = 0.5 * (direction + direction.T)
    if self.name == "eq":
      return (eye - step * jnp.triu(direction)) @ q
    if self.name == "quad":
      gain = eye - 0.5 * step * direction
      moved = gain @ q @ gain
      return 0.5 * (moved + moved.T)
    return procrustes_step((eye - step * direction) @ q)

  def diagonal_step(self, d: jax.Array, direction: jax.Array, step) -> jax.Array:
    """Moves a diagonal factor against ``direction``; stays positive for ``step·|E| < 1``."""
    if self.name == "quad":
      gain = 1 - 0.5 * step * direction
      return d * gain * gain
    return d - step * direction * d


def get_geometry(name: str) -> Geometry:
  if name not in GEOMETRIES:
    raise ValueError(f"geometry must be one of {GEOMETRIES}, got {name!r}.")
  return Geometry(name)
