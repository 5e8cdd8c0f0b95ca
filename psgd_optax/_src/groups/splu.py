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
``r = n`` is a dense (LU) preconditioner.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from psgd_optax._src.normalize import lipschitz_step, norm, scale_pair
from psgd_optax._src.validation import check_rank


class SPLUState(NamedTuple):
  """``L`` and ``U`` as their diagonals and their first ``r`` columns (rows) off the
  diagonal (other entries kept at zero), and the Lipschitz estimates of their fits: unlike
  the blocks ``L₁, L₂, l₃``, no array is empty for any ``1 ≤ r ≤ n`` (Orbax refuses those).

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> q = psgd.splu(order=2).init({"w": jnp.zeros(6)}).preconditioner[0]
    >>> q.l_columns.shape, q.u_rows.shape  # the first 2 columns of L, rows of U
    ((1, 6, 2), (1, 2, 6))
  """

  l_diagonal: jax.Array  # n
  l_columns: jax.Array  # n × r: L's first r columns below the diagonal
  u_diagonal: jax.Array  # n
  u_rows: jax.Array  # r × n: U's first r rows right of the diagonal
  lipschitz: jax.Array  # [L, U]
  fit_l: jax.Array  # 1.0: the next fit moves L; 0.0: U


class _Blocks(NamedTuple):
  """The blocks the math works with (``n − r`` may be 0 here: these are not stored)."""

  l1: jax.Array  # r × r, lower triangular
  l2: jax.Array  # (n − r) × r
  l3: jax.Array  # n − r
  u1: jax.Array  # r × r, upper triangular
  u2: jax.Array  # r × (n − r)
  u3: jax.Array  # n − r


def _max_or_zero(x):
  return jnp.max(x) if x.size else jnp.zeros([], x.dtype)


def _line_curvature(moved_fit, moved_probe, probe, twice_moved_probe, direction_norm2):
  """A step normalizer from the pair's curvature along the fit's generator ``E``.

  The criterion ``c(μ) = ‖a(μ)‖² + ‖b(μ)‖²`` has ``c′(0) = −2‖E‖_F²`` and ``c″(0) ≤
  2‖Ea‖² + 2‖Eᵀb‖² + 4‖b‖‖EᵀEᵀb‖``; their ratio is the natural ``L`` (a norm bound alone
  misscales ``U``'s right-relative gradient when ``Q`` is ill-conditioned). ``L ≥ ‖E‖_F``
  keeps ``μ‖E‖ < 1``: ``Q`` stays invertible."""
  curvature = (jnp.sum(moved_fit ** 2) + jnp.sum(moved_probe ** 2)
               + 2 * norm(probe) * norm(twice_moved_probe))
  positive = direction_norm2 > 0
  ratio = curvature / jnp.where(positive, direction_norm2, 1.0)
  return jnp.where(positive, jnp.maximum(ratio, jnp.sqrt(direction_norm2)), 0.0)


@dataclasses.dataclass(frozen=True)
class SPLUGroup:
  """``Q = LU`` of order ``min(order, n)`` over a flattened leaf of ``shape``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> group = psgd.splu_group((6,), order=2)
    >>> q = group.init(2.0, jnp.float32)
    >>> bool(jnp.allclose(group.materialize(q), 4.0 * jnp.eye(6)))
    True
  """

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
    diagonal = jnp.sqrt(jnp.asarray(scale, dtype)) * jnp.ones((n,), dtype)
    return SPLUState(l_diagonal=diagonal, l_columns=jnp.zeros((n, r), dtype),
                     u_diagonal=diagonal, u_rows=jnp.zeros((r, n), dtype),
                     lipschitz=jnp.zeros((2,), dtype), fit_l=jnp.ones([], dtype))

  def blocks(self, q: SPLUState) -> _Blocks:
    r = self.r
    return _Blocks(
        l1=jnp.tril(q.l_columns[:r], -1) + jnp.diag(q.l_diagonal[:r]), l2=q.l_columns[r:],
        l3=q.l_diagonal[r:],
        u1=jnp.triu(q.u_rows[:, :r], 1) + jnp.diag(q.u_diagonal[:r]), u2=q.u_rows[:, r:],
        u3=q.u_diagonal[r:])

  @staticmethod
  def _store(l_factors, u_factors, lipschitz, fit_l) -> SPLUState:
    (l1, l2, l3), (u1, u2, u3) = l_factors, u_factors
    return SPLUState(
        l_diagonal=jnp.concatenate([jnp.diagonal(l1), l3]),
        l_columns=jnp.concatenate([jnp.tril(l1, -1), l2]),
        u_diagonal=jnp.concatenate([jnp.diagonal(u1), u3]),
        u_rows=jnp.concatenate([jnp.triu(u1, 1), u2], axis=1),
        lipschitz=lipschitz, fit_l=fit_l)

  # Products and solves with the blocks; x is flat, split as [x₁ (r), x₂ (n − r)].
  def _split(self, x):
    return x[:self.r], x[self.r:]

  def _l(self, q, x, transpose=False):
    x1, x2 = self._split(x)
    if transpose:
      return jnp.concatenate([q.l1.T @ x1 + q.l2.T @ x2, q.l3 * x2])
    return jnp.concatenate([q.l1 @ x1, q.l2 @ x1 + q.l3 * x2])

  def _u(self, q, x, transpose=False):
    x1, x2 = self._split(x)
    if transpose:
      return jnp.concatenate([q.u1.T @ x1, q.u2.T @ x1 + q.u3 * x2])
    return jnp.concatenate([q.u1 @ x1 + q.u2 @ x2, q.u3 * x2])

  def _l_solve(self, q, y, transpose=False):
    y1, y2 = self._split(y)
    if transpose:
      x2 = y2 / q.l3
      return jnp.concatenate([solve_triangular(q.l1, y1 - q.l2.T @ x2, lower=True,
                                               trans="T"), x2])
    x1 = solve_triangular(q.l1, y1, lower=True)
    return jnp.concatenate([x1, (y2 - q.l2 @ x1) / q.l3])

  def _u_solve(self, q, y, transpose=False):
    y1, y2 = self._split(y)
    if transpose:
      x1 = solve_triangular(q.u1, y1, lower=False, trans="T")
      return jnp.concatenate([x1, (y2 - q.u2.T @ x1) / q.u3])
    x2 = y2 / q.u3
    return jnp.concatenate([solve_triangular(q.u1, y1 - q.u2 @ x2, lower=False), x2])

  def apply(self, q, x):
    """``Q x`` for a flat ``x``."""
    return self._l(q, self._u(q, x))

  def _solve_transpose_flat(self, q, x):
    return self._l_solve(q, self._u_solve(q, x, transpose=True), transpose=True)

  def solve_transpose(self, q: SPLUState, x):
    """``Q⁻ᵀ x = L⁻ᵀ U⁻ᵀ x`` for a leaf-shaped ``x``."""
    return self._solve_transpose_flat(self.blocks(q), x.reshape(-1)).reshape(x.shape)

  def precondition(self, q: SPLUState, g):
    b = self.blocks(q)
    fitted = self.apply(b, g.reshape(-1))
    return self._u(b, self._l(b, fitted, transpose=True), transpose=True).reshape(g.shape)

  def update(self, state: SPLUState, v, h, lr, *, integrate_probe: bool) -> SPLUState:
    """Moves ``L`` or ``U`` (they take turns, one per fit)."""
    del integrate_probe  # the fit needs Q⁻ᵀv explicitly
    q = self.blocks(state)
    h, v = h.reshape(-1), v.reshape(-1)
    fitted = self.apply(q, h)                   # a = Q h
    probe = self._solve_transpose_flat(q, v)    # b = Q⁻ᵀ v
    unit, fitted, probe, h, v = scale_pair(fitted, probe, h, v)

    def move_l(_):
      # E_L = Π_L(aaᵀ − bbᵀ): tril r × r block, the (n − r) × r block, the diagonal rest.
      a1, a2 = self._split(fitted)
      b1, b2 = self._split(probe)
      e1 = jnp.tril(jnp.outer(a1, a1) - jnp.outer(b1, b1))
      e2 = jnp.outer(a2, a1) - jnp.outer(b2, b1)
      e3 = a2 * a2 - b2 * b2
      pattern = q._replace(l1=e1, l2=e2, l3=e3)  # E_L has L's pattern: reuse L's products
      moved_probe = self._l(pattern, probe, transpose=True)
      bound = _line_curvature(
          self._l(pattern, fitted), moved_probe, probe,
          self._l(pattern, moved_probe, transpose=True),
          jnp.sum(e1 * e1) + jnp.sum(e2 * e2) + jnp.sum(e3 * e3))
      step, lipschitz = lipschitz_step(lr, state.lipschitz[0], bound, self.lipschitz_decay,
                                       unit)
      l_factors = (q.l1 - step * (e1 @ q.l1),
                   q.l2 - step * (e2 @ q.l1 + e3[:, None] * q.l2),
                   q.l3 - step * (e3 * q.l3))
      return l_factors, (q.u1, q.u2, q.u3), state.lipschitz.at[0].set(lipschitz)

    def move_u(_):
      # E_U = Π_U((Ph)hᵀ − v(P⁻¹v)ᵀ): triu r × r block, the r × (n − r) block, the diagonal.
      p_h = self._u(q, self._l(q, fitted, transpose=True), transpose=True)
      p_inv_v = self._u_solve(q, self._l_solve(q, probe))
      x1, x2 = self._split(p_h)
      y1, y2 = self._split(h)
      s1, s2 = self._split(v)
      w1, w2 = self._split(p_inv_v)
      f1 = jnp.triu(jnp.outer(x1, y1) - jnp.outer(s1, w1))
      f2 = jnp.outer(x1, y2) - jnp.outer(s1, w2)
      f3 = x2 * y2 - s2 * w2
      pattern = q._replace(u1=f1, u2=f2, u3=f3)  # E_U has U's pattern: reuse U's products
      moved_v = self._u(pattern, v, transpose=True)
      bound = _line_curvature(
          self.apply(q, self._u(pattern, h)), self._solve_transpose_flat(q, moved_v), probe,
          self._solve_transpose_flat(q, self._u(pattern, moved_v, transpose=True)),
          jnp.sum(f1 * f1) + jnp.sum(f2 * f2) + jnp.sum(f3 * f3))
      step, lipschitz = lipschitz_step(lr, state.lipschitz[1], bound, self.lipschitz_decay,
                                       unit)
      u_factors = (q.u1 - step * (q.u1 @ f1),
                   q.u2 - step * (q.u1 @ f2 + q.u2 * f3[None, :]),
                   q.u3 - step * (q.u3 * f3))
      return (q.l1, q.l2, q.l3), u_factors, state.lipschitz.at[1].set(lipschitz)

    l_factors, u_factors, lipschitz = jax.lax.cond(state.fit_l > 0.5, move_l, move_u, None)
    l_factors, u_factors = self._balance(l_factors, u_factors)
    return self._store(l_factors, u_factors, lipschitz, 1.0 - state.fit_l)

  @staticmethod
  def _balance(l_factors, u_factors):
    """Equal max-abs entries for ``L`` and ``U`` (``Q = LU`` unchanged)."""
    norm_l = jnp.max(jnp.stack([_max_or_zero(jnp.abs(x)) for x in l_factors]))
    norm_u = jnp.max(jnp.stack([_max_or_zero(jnp.abs(x)) for x in u_factors]))
    ok = (norm_l > 0) & (norm_u > 0)
    ratio = jnp.sqrt(jnp.where(ok, norm_l, 1.0) / jnp.where(ok, norm_u, 1.0))
    return tuple(x / ratio for x in l_factors), tuple(x * ratio for x in u_factors)

  def l_matrix(self, q: SPLUState):
    """The dense ``L`` (for tests and plots)."""
    r = self.r
    return jnp.diag(q.l_diagonal) + jnp.tril(jnp.pad(q.l_columns, ((0, 0), (0, self.size - r))),
                                             -1)

  def u_matrix(self, q: SPLUState):
    """The dense ``U`` (for tests and plots)."""
    r = self.r
    return jnp.diag(q.u_diagonal) + jnp.triu(jnp.pad(q.u_rows, ((0, self.size - r), (0, 0))), 1)

  def q_matrix(self, q: SPLUState):
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
  check_rank("order", order)
  return SPLUGroup(tuple(shape), int(order), lipschitz_decay)


def splu_group_for_options(*, order, lipschitz_decay):
  def group_for_shape(shape, state_leaves=None):
    # The order is read from the state in update (inject_hyperparams may trace options).
    effective = order if state_leaves is None else state_leaves[1].shape[-1]
    return SPLUGroup(tuple(shape), int(effective), lipschitz_decay)
  return group_for_shape
