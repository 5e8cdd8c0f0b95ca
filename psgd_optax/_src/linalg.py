"""Small matrix helpers for the preconditioners (``trace``: the normalized FOP uses it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def trace(matrix: jax.Array) -> jax.Array:
  """``tr(A)`` as the sum of the diagonal.

  ``jnp.trace`` masks the whole matrix first, and XLA keeps that mask as an ``n × n``
  temporary (1 MiB for a 512 × 512 float32 matrix) even when the matrix itself is already
  materialized; the diagonal is read in place.

  Example:
    >>> import jax.numpy as jnp
    >>> from psgd_optax._src.linalg import trace
    >>> float(trace(jnp.array([[1.0, 2.0], [3.0, 4.0]])))
    5.0
  """
  return jnp.sum(jnp.diagonal(matrix))
