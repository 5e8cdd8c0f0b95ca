r"""Low-rank approximation (LRA): ``Q = diag(d)(I + UVᵀ)`` with ``U, V ∈ ℝ^{n×r}``.

Li et al. (2023, Appendix C–D). ``P = QᵀQ`` can have eigenvalues far above *and* far
below the diagonal part's (Theorem 3.2), so with ``r ≪ n`` it fits both tails of a
Hessian's spectrum, which ``ρI + UUᵀ`` cannot. The three parts are fitted on their own
groups with ``a = Qh`` and ``b = Q⁻ᵀv``:

- ``d`` on the diagonal group (``dQ = E_d Q``): ``d ← d − μ(a² − b²) ⊙ d``, the triangular
  rule of :func:`psgd_optax.diag` with ``geometry="eq"`` (which is what a rank of 0 would
  be: use that family instead of zero-width ``U``, ``V``).
- ``U`` on ``A_V(U) = I + UVᵀ`` (``V`` fixed, ``dA = EVᵀA``):
  ``∇_U = D M D⁻¹ V`` with ``M = aaᵀ − bbᵀ``, ``U ← U − μ ∇_U (I + VᵀU)``.
- ``V`` on ``A_U(V)`` (``U`` fixed, ``dA = UEᵀA``): ``∇_V = D⁻¹ M D U``,
  ``V ← V − μ (I + VUᵀ) ∇_V``.

``U`` and ``V`` take turns, one per fit (the two are different groups). ``Q⁻ᵀv`` needs one
``r × r`` solve (Woodbury: ``(I + VUᵀ)⁻¹ = I − V(I + UᵀV)⁻¹Uᵀ``). Each step is normalized
by a Lipschitz estimate of its generator's norm (``‖∇_U Vᵀ‖``, at most rank two), so
``μ‖generator‖ < 1`` keeps ``Q`` on the group. After every fit ``U`` and ``V`` are
rescaled to equal norms (``UVᵀ`` is unchanged). ``U`` and ``V`` start small and random
(fixed seed): at ``U = V = 0`` neither gradient moves. Norms are taken of rescaled
vectors (:func:`~psgd_optax._src.normalize.norm`): at a loss scale of 1e-20 the vectors
the bounds multiply are ~1e-20, whose float32 squares flush to zero, and a step
normalized by a bound of 0 would throw ``U`` off its group.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from psgd_optax._src.groups.factors import DiagonalFactor
from psgd_optax._src.groups.geometry import get_geometry
from psgd_optax._src.normalize import lipschitz_step, norm, scale_pair
from psgd_optax._src.validation import check_rank

_EQ = get_geometry("eq")


class LRAState(NamedTuple):
  """``Q = diag(d)(I + UVᵀ)``; ``lipschitz`` holds the estimates for ``d``, ``U``, ``V``;
  ``fit_u`` is 1.0 when the next fit moves ``U`` (0.0: ``V``).

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> q = psgd.lra(rank=2).init({"w": jnp.zeros(6)}).preconditioner[0]
    >>> q.d.shape, q.u.shape, q.v.shape
    ((1, 6), (1, 6, 2), (1, 6, 2))
  """

  d: jax.Array
  u: jax.Array
  v: jax.Array
  lipschitz: jax.Array
  fit_u: jax.Array


@dataclasses.dataclass(frozen=True)
class LRAGroup:
  """``diag(d)(I + UVᵀ)`` over a flattened leaf of ``shape``, rank ``min(rank, n) ≥ 1``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> group = psgd.lra_group((6,), rank=2)
    >>> q = group.init(2.0, jnp.float32)
    >>> bool(jnp.allclose(group.materialize(q), 4.0 * jnp.eye(6), atol=0.1))  # U, V small
    True
  """

  shape: tuple[int, ...]
  rank: int = 10
  lipschitz_decay: float = 0.9

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def effective_rank(self) -> int:
    return min(self.rank, self.size)

  def init(self, scale, dtype) -> LRAState:
    n, r = self.size, self.effective_rank
    key_u, key_v = jax.random.split(jax.random.key(0))
    # Columns of norm ~0.1: I + UVᵀ starts close to I but with a nonzero gradient.
    spread = 0.1 / (n * r) ** 0.5
    return LRAState(
        d=jnp.asarray(scale, dtype) * jnp.ones((n,), dtype),
        u=spread * jax.random.normal(key_u, (n, r), dtype),
        v=spread * jax.random.normal(key_v, (n, r), dtype),
        lipschitz=jnp.zeros((3,), dtype),
        fit_u=jnp.ones([], dtype),
    )

  def init_from_unset(self, unset: LRAState, scale) -> LRAState:
    """``init(scale)`` from the state of a unit whose scale is not set (``init`` at some
    scale): only ``d`` depends on the scale, so ``U``, ``V`` are not drawn again."""
    return unset._replace(d=jnp.full_like(unset.d, scale))

  def _apply_a(self, q, x):
    return x + q.u @ (q.v.T @ x)

  def _apply_a_transpose(self, q, x):
    return x + q.v @ (q.u.T @ x)

  def _solve_a_transpose(self, q, x):
    """``(I + VUᵀ)⁻¹ x = x − V (I + UᵀV)⁻¹ Uᵀx`` (an r × r solve)."""
    small = jnp.eye(self.effective_rank, dtype=x.dtype) + q.u.T @ q.v
    return x - q.v @ jnp.linalg.solve(small, q.u.T @ x)

  def precondition(self, q: LRAState, g):
    fitted = q.d * self._apply_a(q, g.reshape(-1))
    return self._apply_a_transpose(q, q.d * fitted).reshape(g.shape)

  def solve_transpose(self, q: LRAState, x):
    """``Q⁻ᵀ x = D⁻¹ (I + VUᵀ)⁻¹ x`` for a leaf-shaped ``x``."""
    return (self._solve_a_transpose(q, x.reshape(-1)) / q.d).reshape(x.shape)

  def update(self, q: LRAState, v, h, lr, *, integrate_probe: bool) -> LRAState:
    del integrate_probe  # the fit needs Q⁻ᵀv explicitly
    h, v = h.reshape(-1), v.reshape(-1)
    a_h = self._apply_a(q, h)              # A h
    fitted = q.d * a_h                     # a = Q h
    a_inv_v = self._solve_a_transpose(q, v)  # A⁻ᵀ v
    probe = a_inv_v / q.d                  # b = Q⁻ᵀ v
    unit, fitted, probe, a_h, a_inv_v = scale_pair(fitted, probe, a_h, a_inv_v)

    diagonal = DiagonalFactor(self.size)
    t1, t2 = fitted * fitted, probe * probe
    step_d, lipschitz_d = lipschitz_step(lr, q.lipschitz[0], diagonal.norm_bound(t1, t2),
                                         self.lipschitz_decay, unit)
    d = diagonal.step(q.d, t1, t2, step_d, _EQ)

    # With x = D a = D²Ah, y = D⁻¹a = Ah, p = D b = A⁻ᵀv, s = D⁻¹ b:
    # ∇_U = x (Vᵀy)ᵀ − p (Vᵀs)ᵀ and ∇_V = y (Uᵀx)ᵀ − s (Uᵀp)ᵀ.
    x, y, p, s = q.d * fitted, a_h, a_inv_v, probe / q.d

    def move_u(_):
      grad = jnp.outer(x, q.v.T @ y) - jnp.outer(p, q.v.T @ s)
      bound = norm(x) * norm(q.v @ (q.v.T @ y)) + norm(p) * norm(q.v @ (q.v.T @ s))
      step, lipschitz = lipschitz_step(lr, q.lipschitz[1], bound, self.lipschitz_decay, unit)
      small = jnp.eye(self.effective_rank, dtype=h.dtype) + q.v.T @ q.u
      u = q.u - step * (grad @ small)
      return u, q.v, q.lipschitz.at[1].set(lipschitz)

    def move_v(_):
      grad = jnp.outer(y, q.u.T @ x) - jnp.outer(s, q.u.T @ p)
      bound = norm(q.u @ (q.u.T @ x)) * norm(y) + norm(q.u @ (q.u.T @ p)) * norm(s)
      step, lipschitz = lipschitz_step(lr, q.lipschitz[2], bound, self.lipschitz_decay, unit)
      v_new = q.v - step * (grad + q.v @ (q.u.T @ grad))
      return q.u, v_new, q.lipschitz.at[2].set(lipschitz)

    u, v_new, lipschitz = jax.lax.cond(q.fit_u > 0.5, move_u, move_v, None)
    u, v_new = self._balance(u, v_new)
    return LRAState(d=d, u=u, v=v_new, lipschitz=lipschitz.at[0].set(lipschitz_d),
                    fit_u=1.0 - q.fit_u)

  @staticmethod
  def _balance(u, v):
    """Equal Frobenius norms for ``U`` and ``V`` (``UVᵀ`` unchanged)."""
    norm_u, norm_v = norm(u), norm(v)
    ok = (norm_u > 0) & (norm_v > 0)
    ratio = jnp.sqrt(jnp.where(ok, norm_u, 1.0) / jnp.where(ok, norm_v, 1.0))
    return u / ratio, v * ratio

  def q_matrix(self, q: LRAState) -> jax.Array:
    """The dense ``Q`` (for tests and plots)."""
    identity = jnp.eye(self.size, dtype=q.d.dtype)
    return q.d[:, None] * (identity + q.u @ q.v.T)

  def materialize(self, q: LRAState) -> jax.Array:
    matrix = self.q_matrix(q)
    return matrix.T @ matrix


def lra_group(shape, *, rank=10, lipschitz_decay=0.9) -> LRAGroup:
  """The LRA group of ``rank`` over a leaf of ``shape`` (flattened): ``Q = diag(d)(I + UVᵀ)``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> group = psgd.lra_group((6,), rank=2)
    >>> q = group.init(2.0, jnp.float32)
    >>> q.u.shape, q.v.shape
    ((6, 2), (6, 2))
    >>> bool(jnp.allclose(group.materialize(q), 4.0 * jnp.eye(6), atol=0.1))  # U, V small
    True
  """
  check_rank("rank", rank)
  return LRAGroup(tuple(shape), int(rank), lipschitz_decay)


def lra_group_for_options(*, rank, lipschitz_decay):
  def group_for_shape(shape, state_leaves=None):
    # The rank is read from the state in update (inject_hyperparams may trace options).
    effective = rank if state_leaves is None else state_leaves[2].shape[-1]
    return LRAGroup(tuple(shape), int(effective), lipschitz_decay)
  return group_for_shape
