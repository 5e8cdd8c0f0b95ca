"""Step-size normalizers for preconditioner fitting.

PSGD moves a factor of ``Q`` by ``μ / L · E`` where ``E`` is the relative gradient on the
group. ``L`` must upper-bound the local Lipschitz constant of the fitting criterion, which is
``‖T1 + T2‖`` for the second-moment terms ``T1, T2`` of a curvature pair. Computing that
spectral norm exactly costs an eigen-decomposition; a lower bound from a short power
iteration is tight enough in practice, and an exponential moving average of it (never
allowed to drop below the newest bound) keeps steps from jumping when a single pair is
unusually small.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _tiny(dtype) -> jax.Array:
  return jnp.asarray(jnp.finfo(dtype).tiny, dtype)


def spectral_norm_lower_bound(matrix: jax.Array, num_iters: int = 2) -> jax.Array:
  """A cheap lower bound of the spectral norm ``‖A‖₂`` of a square matrix.

  Starts from the row of largest norm (itself a lower bound) and runs ``num_iters``
  steps of power iteration on ``AᵀA``; ``‖A x‖ / ‖x‖`` never exceeds ``‖A‖₂``. The matrix
  is rescaled by its largest entry first so that squares neither overflow nor
  underflow.

  Args:
    matrix: a square matrix.
    num_iters: power-iteration steps.

  Returns:
    A scalar ``b`` with ``b ≤ ‖A‖₂`` (and ``b = 0`` iff ``A = 0``).

  Example:
    >>> import jax.numpy as jnp
    >>> from psgd_optax._src.normalize import spectral_norm_lower_bound
    >>> a = jnp.diag(jnp.array([3.0, 1.0, 0.5]))
    >>> float(spectral_norm_lower_bound(a))
    3.0
  """
  scale = jnp.max(jnp.abs(matrix))
  safe_scale = jnp.where(scale > 0, scale, 1.0).astype(matrix.dtype)
  # A = matrix / scale is applied as matrix @ (x / scale): the vector is rescaled, not the
  # matrix, so XLA keeps no rescaled copy of the matrix (every product stays ≤ n·‖x‖).
  scaled = lambda x: matrix @ (x / safe_scale)
  scaled_transpose = lambda y: matrix.T @ (y / safe_scale)
  row_norms = jnp.sum(jnp.square(matrix / safe_scale), axis=1)
  x = matrix[jnp.argmax(row_norms)] / safe_scale
  tiny = _tiny(matrix.dtype)
  for _ in range(num_iters):
    x = scaled_transpose(scaled(x))
    x = x / (jnp.linalg.norm(x) + tiny)
  bound = jnp.linalg.norm(scaled(x)) / (jnp.linalg.norm(x) + tiny)
  bound = jnp.maximum(bound, jnp.sqrt(jnp.max(row_norms)))
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
  return jnp.maximum(decay * previous + (1 - decay) * bound, bound)


def safe_step(lr, lipschitz: jax.Array) -> jax.Array:
  """``lr / L``, or 0 where ``L`` is 0 (an all-zero pair carries no information)."""
  positive = lipschitz > 0
  return jnp.where(positive, lr / jnp.where(positive, lipschitz, 1.0), 0.0)
