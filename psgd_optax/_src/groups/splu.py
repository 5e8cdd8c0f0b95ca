r"""Sparse LU (SPLU) of order ``r``: ``Q = L U`` (Li 2018, §III.B.3 and Appendix A.C.4).

With ``x = [x₁; x₂]`` split after the first ``r`` entries,

.. math::
  L = \begin{bmatrix} L_1 & 0 \\ L_2 & \mathrm{diag}(l_3) \end{bmatrix},\qquad
  U = \begin{bmatrix} U_1 & U_2 \\ 0 & \mathrm{diag}(u_3) \end{bmatrix},

``L₁`` lower and ``U₁`` upper triangular (``r × r``): besides the diagonal only the first
``r`` columns of ``L`` and the first ``r`` rows of ``U`` are nonzero. Both are groups
(products and inverses keep the pattern), and their inverses are blockwise,
e.g. ``L⁻¹ = [[L₁⁻¹, 0], [−diag(l₃)⁻¹L₂L₁⁻¹, diag(l₃)⁻¹]]``, so ``Q⁻ᵀv`` costs two ``r × r``
triangular solves and ``O(rn)``.

Fit (relative gradients ``dL = E_L L`` and ``dU = U E_U``):

.. math::
  E_L = \Pi_L\big[(Qh)(Qh)^\top - (Q^{-\top}v)(Q^{-\top}v)^\top\big],\qquad
  E_U = \Pi_U\big[(Ph)h^\top - v(P^{-1}v)^\top\big],

projected onto each factor's pattern. ``L`` and ``U`` take turns, one per fit, and each
step is normalized by the pair's own curvature along it (:func:`_line_curvature`).
``r = 0`` is a diagonal preconditioner; ``r = n`` a dense (LU) one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from psgd_optax._src.family import (LIPSCHITZ_DECAY_DOC, LIPSCHITZ_DECAY_OPTION,
                                     check_lipschitz_decay, keyword, preconditioner_family)
from psgd_optax._src.normalize import lipschitz_update, safe_step
from psgd_optax._src.validation import check_integer


class SPLUState(NamedTuple):
  """The blocks of ``L`` and ``U`` and the Lipschitz estimates of their fits."""

  l1: jax.Array  # r × r, lower triangular
  l2: jax.Array  # (n − r) × r
  l3: jax.Array  # n − r
  u1: jax.Array  # r × r, upper triangular
  u2: jax.Array  # r × (n − r)
  u3: jax.Array  # n − r
  lipschitz: jax.Array  # [L, U]
  fit_l: jax.Array  # 1.0: the next fit moves L; 0.0: U


def _max_or_zero(x):
  return jnp.max(x) if x.size else jnp.zeros([], x.dtype)


def _line_curvature(moved_fit, moved_probe, probe, twice_moved_probe, direction_norm2):
  """A step normalizer from the pair's own curvature along the fit direction.

  Moving ``Q`` along a generator ``E`` (``Q ← (I − μE)Q`` or ``Q(I − μE)``), the pair's
  criterion ``c(μ) = ‖a(μ)‖² + ‖b(μ)‖²`` has ``c′(0) = −2‖E‖_F²`` and
  ``c″(0) ≤ 2‖Ea‖² + 2‖Eᵀb‖² + 4‖b‖‖EᵀEᵀb‖`` (in the frame of the move). Their ratio is
  the natural ``L`` of a normalized step; the right-relative gradient of ``U`` is
  otherwise badly scaled when ``Q`` is ill-conditioned. ``L ≥ ‖E‖_F`` also keeps
  ``μ‖E‖ < 1`` (``Q`` stays invertible).
  """
  curvature = (jnp.sum(moved_fit ** 2) + jnp.sum(moved_probe ** 2)
               + 2 * jnp.linalg.norm(probe) * jnp.linalg.norm(twice_moved_probe))
  positive = direction_norm2 > 0
  ratio = curvature / jnp.where(positive, direction_norm2, 1.0)
  return jnp.where(positive, jnp.maximum(ratio, jnp.sqrt(direction_norm2)), 0.0)


@dataclasses.dataclass(frozen=True)
class SPLUGroup:
  """``Q = LU`` of order ``min(order, n)`` over a flattened leaf of ``shape``."""

  shape: tuple[int, ...]
  order: int = 10
  lipschitz_decay: float = 0.9

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def r(self) -> int:
    return min(self.order, self.size)

  def init(self, scale, dtype) -> SPLUState:
    n, r = self.size, self.r
    root = jnp.sqrt(jnp.asarray(scale, dtype))
    return SPLUState(
        l1=root * jnp.eye(r, dtype=dtype), l2=jnp.zeros((n - r, r), dtype),
        l3=root * jnp.ones((n - r,), dtype),
        u1=root * jnp.eye(r, dtype=dtype), u2=jnp.zeros((r, n - r), dtype),
        u3=root * jnp.ones((n - r,), dtype),
        lipschitz=jnp.zeros((2,), dtype), fit_l=jnp.ones([], dtype))

  # Products and solves with the blocks; x is flat, split as [x₁ (r), x₂ (n − r)].
  def _split(self, x):
    return x[:self.r], x[self.r:]

  def _l(self, q, x):
    x1, x2 = self._split(x)
    return jnp.concatenate([q.l1 @ x1, q.l2 @ x1 + q.l3 * x2])

  def _l_transpose(self, q, x):
    x1, x2 = self._split(x)
    return jnp.concatenate([q.l1.T @ x1 + q.l2.T @ x2, q.l3 * x2])

  def _u(self, q, x):
    x1, x2 = self._split(x)
    return jnp.concatenate([q.u1 @ x1 + q.u2 @ x2, q.u3 * x2])

  def _u_transpose(self, q, x):
    x1, x2 = self._split(x)
    return jnp.concatenate([q.u1.T @ x1, q.u2.T @ x1 + q.u3 * x2])

  def _l_solve(self, q, y):
    y1, y2 = self._split(y)
    x1 = solve_triangular(q.l1, y1, lower=True)
    return jnp.concatenate([x1, (y2 - q.l2 @ x1) / q.l3])

  def _l_solve_transpose(self, q, y):
    y1, y2 = self._split(y)
    x2 = y2 / q.l3
    x1 = solve_triangular(q.l1, y1 - q.l2.T @ x2, lower=True, trans="T")
    return jnp.concatenate([x1, x2])

  def _u_solve(self, q, y):
    y1, y2 = self._split(y)
    x2 = y2 / q.u3
    x1 = solve_triangular(q.u1, y1 - q.u2 @ x2, lower=False)
    return jnp.concatenate([x1, x2])

  def _u_solve_transpose(self, q, y):
    y1, y2 = self._split(y)
    x1 = solve_triangular(q.u1, y1, lower=False, trans="T")
    return jnp.concatenate([x1, (y2 - q.u2.T @ x1) / q.u3])

  def apply(self, q, x):
    """``Q x`` for a flat ``x``."""
    return self._l(q, self._u(q, x))

  def _solve_transpose_flat(self, q, x):
    return self._l_solve_transpose(q, self._u_solve_transpose(q, x))

  def solve_transpose(self, q, x):
    """``Q⁻ᵀ x = L⁻ᵀ U⁻ᵀ x`` for a leaf-shaped ``x``."""
    return self._solve_transpose_flat(q, x.reshape(-1)).reshape(x.shape)

  def precondition(self, q, g):
    fitted = self.apply(q, g.reshape(-1))
    return self._u_transpose(q, self._l_transpose(q, fitted)).reshape(g.shape)

  def update(self, q: SPLUState, v, h, lr, *, integrate_probe: bool) -> SPLUState:
    """Moves ``L`` or ``U`` (they take turns, one per fit)."""
    del integrate_probe  # the fit needs Q⁻ᵀv explicitly
    h, v = h.reshape(-1), v.reshape(-1)
    fitted = self.apply(q, h)                   # a = Q h
    probe = self._solve_transpose_flat(q, v)    # b = Q⁻ᵀ v

    def move_l(_):
      # E_L = Π_L(aaᵀ − bbᵀ): tril r × r block, the (n − r) × r block, the diagonal rest.
      a1, a2 = self._split(fitted)
      b1, b2 = self._split(probe)
      e1 = jnp.tril(jnp.outer(a1, a1) - jnp.outer(b1, b1))
      e2 = jnp.outer(a2, a1) - jnp.outer(b2, b1)
      e3 = a2 * a2 - b2 * b2
      pattern = q._replace(l1=e1, l2=e2, l3=e3)  # E_L has L's pattern: reuse L's products
      moved_probe = self._l_transpose(pattern, probe)
      bound = _line_curvature(
          self._l(pattern, fitted), moved_probe, probe,
          self._l_transpose(pattern, moved_probe),
          jnp.sum(e1 * e1) + jnp.sum(e2 * e2) + jnp.sum(e3 * e3))
      lipschitz = lipschitz_update(q.lipschitz[0], bound, self.lipschitz_decay)
      step = safe_step(lr, lipschitz)
      l_factors = (q.l1 - step * (e1 @ q.l1),
                   q.l2 - step * (e2 @ q.l1 + e3[:, None] * q.l2),
                   q.l3 - step * (e3 * q.l3))
      return l_factors, (q.u1, q.u2, q.u3), q.lipschitz.at[0].set(lipschitz)

    def move_u(_):
      # E_U = Π_U((Ph)hᵀ − v(P⁻¹v)ᵀ): triu r × r block, the r × (n − r) block, the diagonal.
      p_h = self._u_transpose(q, self._l_transpose(q, fitted))
      p_inv_v = self._u_solve(q, self._l_solve(q, probe))
      x1, x2 = self._split(p_h)
      y1, y2 = self._split(h)
      s1, s2 = self._split(v)
      w1, w2 = self._split(p_inv_v)
      f1 = jnp.triu(jnp.outer(x1, y1) - jnp.outer(s1, w1))
      f2 = jnp.outer(x1, y2) - jnp.outer(s1, w2)
      f3 = x2 * y2 - s2 * w2
      pattern = q._replace(u1=f1, u2=f2, u3=f3)  # E_U has U's pattern: reuse U's products
      moved_v = self._u_transpose(pattern, v)
      bound = _line_curvature(
          self.apply(q, self._u(pattern, h)), self._solve_transpose_flat(q, moved_v), probe,
          self._solve_transpose_flat(q, self._u_transpose(pattern, moved_v)),
          jnp.sum(f1 * f1) + jnp.sum(f2 * f2) + jnp.sum(f3 * f3))
      lipschitz = lipschitz_update(q.lipschitz[1], bound, self.lipschitz_decay)
      step = safe_step(lr, lipschitz)
      u_factors = (q.u1 - step * (q.u1 @ f1),
                   q.u2 - step * (q.u1 @ f2 + q.u2 * f3[None, :]),
                   q.u3 - step * (q.u3 * f3))
      return (q.l1, q.l2, q.l3), u_factors, q.lipschitz.at[1].set(lipschitz)

    l_factors, u_factors, lipschitz = jax.lax.cond(q.fit_l > 0.5, move_l, move_u, None)
    l_factors, u_factors = self._balance(l_factors, u_factors)
    return SPLUState(*l_factors, *u_factors, lipschitz=lipschitz, fit_l=1.0 - q.fit_l)

  @staticmethod
  def _balance(l_factors, u_factors):
    """Equal max-abs entries for ``L`` and ``U`` (``Q = LU`` unchanged)."""
    norm_l = jnp.max(jnp.stack([_max_or_zero(jnp.abs(x)) for x in l_factors]))
    norm_u = jnp.max(jnp.stack([_max_or_zero(jnp.abs(x)) for x in u_factors]))
    ok = (norm_l > 0) & (norm_u > 0)
    ratio = jnp.sqrt(jnp.where(ok, norm_l, 1.0) / jnp.where(ok, norm_u, 1.0))
    return tuple(x / ratio for x in l_factors), tuple(x * ratio for x in u_factors)

  def l_matrix(self, q):
    n, r = self.size, self.r
    matrix = jnp.zeros((n, n), q.l3.dtype)
    matrix = matrix.at[:r, :r].set(q.l1).at[r:, :r].set(q.l2)
    return matrix.at[jnp.arange(r, n), jnp.arange(r, n)].set(q.l3)

  def u_matrix(self, q):
    n, r = self.size, self.r
    matrix = jnp.zeros((n, n), q.u3.dtype)
    matrix = matrix.at[:r, :r].set(q.u1).at[:r, r:].set(q.u2)
    return matrix.at[jnp.arange(r, n), jnp.arange(r, n)].set(q.u3)

  def q_matrix(self, q):
    """The dense ``Q = LU`` (for tests and plots)."""
    return self.l_matrix(q) @ self.u_matrix(q)

  def materialize(self, q):
    matrix = self.q_matrix(q)
    return matrix.T @ matrix


def splu_group(shape, *, order=10, lipschitz_decay=0.9) -> SPLUGroup:
  """The sparse-LU group of ``order`` over a leaf of ``shape`` (flattened): ``Q = LU``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> group = psgd.splu_group((5,), order=2)
    >>> q = group.init(4.0, jnp.float32)        # L = U = 2·I, so Q = 4·I
    >>> group.q_matrix(q)[0]
    Array([4., 0., 0., 0., 0.], dtype=float32)
  """
  return SPLUGroup(tuple(shape), int(order), lipschitz_decay)


def _check_options(*, order, lipschitz_decay):
  check_integer("order", order, low=0.0)
  check_lipschitz_decay(lipschitz_decay)


def _group_for_options(*, order, lipschitz_decay):
  def group_for_shape(shape, state_leaves=None):
    # The order is read from the state in update (inject_hyperparams may trace options).
    effective = order if state_leaves is None else state_leaves[0].shape[0]
    return SPLUGroup(tuple(shape), int(effective), lipschitz_decay)
  return group_for_shape


splu = preconditioner_family(
    "splu", __name__,
    [keyword("order", 10, int), LIPSCHITZ_DECAY_OPTION],
    _group_for_options, _check_options,
    r"""PSGD with a sparse-LU preconditioner ``Q = LU`` of order ``r`` per leaf.

  ``L`` (``U``) is lower (upper) triangular with nonzeros only on the diagonal and in its
  first ``r`` columns (rows): the first ``r`` parameters of a leaf are coupled densely with
  all others, the rest only through the diagonal. ``O(rn)`` memory and work.

  .. math::
    L \leftarrow L - \frac{\mu}{L_L}\,\Pi_L\big[aa^\top - bb^\top\big] L,\quad
    U \leftarrow U - \frac{\mu}{L_U}\,U\,\Pi_U\big[(Ph)h^\top - v(P^{-1}v)^\top\big],

  with ``a = Qh``, ``b = Q⁻ᵀv`` (see :mod:`psgd_optax._src.groups.splu`).

  Args:
    order: ``r`` (capped at the leaf size); the paper used 10.
""" + LIPSCHITZ_DECAY_DOC + """
{engine_args}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` returning ``P g``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> state = psgd.splu(order=2).init(jnp.zeros(5))
    >>> q = state.preconditioner["leaves_0"]
    >>> q.l1.shape, q.l2.shape
    ((2, 2), (3, 2))

  References:
    Li, *Preconditioned stochastic gradient descent*, IEEE TNNLS 2018 (Appendix A).
""")
