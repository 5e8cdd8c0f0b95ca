"""Step-size normalizers for preconditioner fitting.

PSGD moves a factor of ``Q`` by ``μ / L · E`` where ``E`` is the relative gradient on the
group. ``L`` must upper-bound the local Lipschitz constant of the fitting criterion, which is
``‖T1 + T2‖`` for the second-moment terms ``T1, T2`` of a curvature pair. Computing that
spectral norm exactly costs an eigen-decomposition; a lower bound from one power step is
tight enough in practice, and an exponential moving average of it (never
allowed to drop below the newest bound) keeps steps from jumping when a single pair is
unusually small.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _tiny(dtype) -> jax.Array:
  return jnp.asarray(jnp.finfo(dtype).tiny, dtype)


def norm(x: jax.Array) -> jax.Array:
  """``‖x‖₂`` as ``m·‖x/m‖`` with ``m = max|x|``.

  A float32 square of 1e-20 flushes to 0 (and of 1e20 overflows), so ``jnp.linalg.norm``
  of a vector at those scales is 0 (or ``inf``); rescaled, it is exact to rounding. The
  square root is of a number ≥ 1, so reverse-mode derivatives stay finite at ``x = 0``.

  Example:
    >>> import jax.numpy as jnp
    >>> from psgd_optax._src.normalize import norm
    >>> float(norm(jnp.array([3e-20, 4e-20]))), float(jnp.linalg.norm(jnp.array([3e-20, 4e-20])))
    (5e-20, 0.0)
  """
  peak = jnp.max(jnp.abs(x))
  positive = peak > 0
  safe_peak = jnp.where(positive, peak, 1.0)
  sum_squares = jnp.sum(jnp.square(x / safe_peak))
  return jnp.where(positive, safe_peak * jnp.sqrt(jnp.where(positive, sum_squares, 1.0)), 0.0)


def scale_pair(a: jax.Array, b: jax.Array, *others: jax.Array) -> tuple[jax.Array, ...]:
  """``(unit, a/m, b/m, *others/m)`` with ``m = max(max|a|, max|b|)`` and ``unit = m²``
  (``m = 1`` where that maximum is 0 or not finite).

  A fit by ``a = Qh`` and ``b = Q⁻ᵀv`` takes the same normalized step for a pair scaled
  jointly: its generator (``aaᵀ − bbᵀ`` and the like) and its Lipschitz bound both scale as
  ``m²``. Once ``Q`` has the pair's scale, ``a`` and ``b`` are of order ``√(|h|·|v|)``: for
  a loss scaled by 1e-20 their float32 squares (and higher powers) flush to zero, so the
  groups that fit by them divide the pair (and anything linear in it) by ``m`` first and
  keep their Lipschitz estimates in the pair's own units with :func:`lipschitz_step`.
  """
  peak = jnp.maximum(jnp.max(jnp.abs(a)), jnp.max(jnp.abs(b)))
  peak = jnp.where(jnp.isfinite(peak) & (peak > 0), peak, 1.0)
  return (peak * peak,) + tuple(x / peak for x in (a, b, *others))


def lipschitz_step(lr, previous: jax.Array, bound: jax.Array, decay, unit=1.0):
  """``(step, estimate)``: the moving estimate :func:`lipschitz_update` of a bound computed
  for a pair divided by ``√unit`` (see :func:`scale_pair`), kept in the pair's own units so
  that estimates of steps with different ``unit`` combine; and ``lr / L`` in the divided
  units, for a generator computed from the divided pair."""
  estimate = lipschitz_update(previous, unit * bound, decay)
  return safe_step(lr, estimate / unit), estimate


def spd_norm_lower_bound(matrix: jax.Array) -> jax.Array:
  """A cheap lower bound of the spectral norm of a symmetric positive semidefinite matrix.

  The reference code's estimate: the row ``x`` of largest norm (itself a lower bound),
  then ``‖A x‖ / ‖x‖`` (one power step, never below ``‖x‖``), without further power
  iteration: within about 0.6 of the norm on Wishart matrices of any rank, exact for rank
  one. Symmetry makes it cheap: the largest entry is on the diagonal, so the rescaling that
  keeps squares from over- or underflowing reads ``n`` entries, and the two vector norms
  are taken in one reduction. A fit's second moments ``Σ x xᵀ`` are such matrices; every
  reduction saved is a kernel fewer per dense factor for the compiler.

  Args:
    matrix: a symmetric positive semidefinite matrix.

  Returns:
    A scalar ``b`` with ``b ≤ ‖A‖₂`` (and ``b = 0`` iff ``A = 0``).

  Example:
    >>> import jax.numpy as jnp
    >>> from psgd_optax._src.normalize import spd_norm_lower_bound
    >>> x = jnp.array([1.0, 2.0, 2.0])
    >>> float(spd_norm_lower_bound(jnp.outer(x, x)))   # exact for rank one: ‖x‖²
    9.0
  """
  scale = jnp.max(jnp.diagonal(matrix))  # = max|Aᵢⱼ| for a PSD matrix
  safe_scale = jnp.where(scale > 0, scale, 1.0).astype(matrix.dtype)
  row_norms = jnp.sum(jnp.square(matrix / safe_scale), axis=1)
  largest_row = jnp.max(row_norms)
  x = ((row_norms == largest_row).astype(matrix.dtype) @ matrix) / safe_scale
  y = (matrix @ x) / safe_scale
  # Both within about [1/n, n²] for a nonzero matrix: plain sums of squares are safe.
  squares = jnp.sum(jnp.stack([x * x, y * y]), axis=1) + _tiny(matrix.dtype)
  bound = jnp.maximum(jnp.sqrt(squares[1] / squares[0]),
                      jnp.sqrt(jnp.where(largest_row > 0, largest_row, 1.0)))
  return jnp.where(scale > 0, safe_scale * bound, 0.0).astype(matrix.dtype)


def lipschitz_update(previous: jax.Array, bound: jax.Array, decay) -> jax.Array:
  r"""Moving Lipschitz estimate used to normalize preconditioner steps.

  .. math::
    L_t = \max\big(\beta L_{t-1} + (1 - \beta)\,\ell_t,\; \ell_t\big)

  where :math:`\ell_t` is the newest norm bound. The estimate reacts at once to a
  larger bound and forgets a large one slowly, which keeps ``μ / L`` safe.

  Args:
    previous: the estimate before this step (0 before the first step).
    bound: the newest bound :math:`\ell_t`.
    decay: :math:`\beta \in [0, 1)`.

  Returns:
    The updated estimate.

  Example:
    >>> from psgd_optax._src.normalize import lipschitz_update
    >>> float(lipschitz_update(0.0, 2.0, 0.9)), float(lipschitz_update(4.0, 2.0, 0.9))
    (2.0, 3.8)
  """
  previous = jnp.asarray(previous)
  decay = jnp.asarray(decay, previous.dtype)  # a float64 hyperparameter keeps float32 state
  return jnp.maximum(decay * previous + (1 - decay) * bound, bound)


def safe_step(lr, lipschitz: jax.Array) -> jax.Array:
  """``lr / L``, or 0 where ``L`` is 0 (an all-zero pair carries no information)."""
  positive = lipschitz > 0
  lr = jnp.asarray(lr, lipschitz.dtype)
  return jnp.where(positive, lr / jnp.where(positive, lipschitz, 1.0), 0.0)


def rms(x: jax.Array) -> jax.Array:
  """The RMS of ``x``, ``‖x‖ / √size`` with the scale-safe :func:`norm`."""
  return norm(x) / jnp.sqrt(jnp.asarray(x.size, x.dtype))


def bound_rms(x: jax.Array, bound: float | None) -> jax.Array:
  """``x`` scaled to RMS ``bound`` where its RMS exceeds it (``None``: unbounded)."""
  if bound is None:
    return x
  bound = jnp.asarray(bound, x.dtype)
  # bound / max(rms, bound): 1 up to the bound, bound / rms above it; never a division by 0.
  return x * (bound / jnp.maximum(rms(x), bound))
