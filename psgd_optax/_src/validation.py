"""Construction-time checks of hyperparameters.

Values traced by ``optax.inject_hyperparams`` (or any ``jit``) cannot be inspected, so
they are passed through; every concrete Python or NumPy number is checked and a
``ValueError`` names the offending value.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_float(value: Any) -> float | None:
  """The value as a Python float, or ``None`` if it is traced (not inspectable)."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(np.asarray(value))
  except (TypeError, ValueError):
    return None


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_callable: bool = False,
    allow_none: bool = False,
) -> None:
  """Raises ``ValueError`` unless ``value`` is a finite number in the given range."""
  if value is None:
    if allow_none:
      return
    raise ValueError(f"{name} must be a number, got None.")
  if callable(value):
    if allow_callable:
      return
    raise ValueError(f"{name} must be a number, got the callable {value!r}.")
  if isinstance(value, (str, bytes)) or np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar number, got {value!r}.")
  if isinstance(value, (bool, np.bool_)) or (
      hasattr(value, "dtype") and jnp.dtype(value.dtype) == jnp.bool_):
    raise ValueError(f"{name} must be a number, got the boolean {value!r}.")
  number = concrete_float(value)
  if number is None:
    return
  if not math.isfinite(number):
    raise ValueError(f"{name} must be finite, got {value!r}.")
  if low is not None and (number < low or (low_open and number == low)):
    bound = ">" if low_open else ">="
    raise ValueError(f"{name} must be {bound} {low}, got {value!r}.")
  if high is not None and (number > high or (high_open and number == high)):
    bound = "<" if high_open else "<="
    raise ValueError(f"{name} must be {bound} {high}, got {value!r}.")


def check_choice(name: str, value: Any, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")


def check_integer(name: str, value: Any, *, low: float | None = None) -> None:
  """Like :func:`check_number`, and a concrete value must be a whole number."""
  check_number(name, value, low=low)
  number = concrete_float(value)
  if number is not None and int(number) != number:
    raise ValueError(f"{name} must be an integer, got {value!r}.")


_FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


def check_float_dtype(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` names one floating dtype JAX computes in.

  Accepted: the names in ``_FLOAT_DTYPES`` and the dtypes or scalar types they name
  (``jnp.float32``, ``np.dtype("float64")``). Generic spellings (``None``, ``float``,
  ``"float"``) are refused: NumPy reads them as float64, which JAX truncates to float32
  unless ``jax_enable_x64`` is on. ``float64`` itself needs ``jax_enable_x64`` where the
  state is built (see :func:`check_x64`).
  """
  if callable(value) and not isinstance(value, type):
    raise ValueError(
        f"{name} must be a dtype or its name, got {value!r} (with "
        f"optax.inject_hyperparams pass it by name, e.g. {name}='float64').")
  dtype = None
  if isinstance(value, str):
    dtype = jnp.dtype(value) if value in _FLOAT_DTYPES else None
  elif value is not None and value is not float:
    try:
      dtype = jnp.dtype(value)
    except TypeError:
      dtype = None
  if dtype is None or dtype.name not in _FLOAT_DTYPES:
    raise ValueError(f"{name} must be one of {_FLOAT_DTYPES} (or that dtype), got "
                     f"{value!r}.")


def check_x64(name: str, dtype) -> None:
  """Raises ``ValueError`` for a float64 state built while ``jax_enable_x64`` is off (JAX
  would store float32 arrays, with a warning)."""
  if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError(f"{name}='float64' needs jax_enable_x64 where the state is built "
                     "(jax.config.update('jax_enable_x64', True), or inside "
                     "jax.enable_x64(True)); without it JAX computes in float32.")


def check_mask(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is ``None``, a callable or a pytree of bools."""
  if value is None or callable(value):
    return
  leaves = jax.tree.leaves(value)
  if isinstance(value, (str, bytes)) or not leaves or not all(
      isinstance(leaf, (bool, np.bool_)) for leaf in leaves):
    raise ValueError(f"{name} must be None, a callable of the params or a pytree of "
                     f"booleans, got {value!r}.")


def as_dtype(value: Any, dtype) -> jax.Array:
  """A numeric hyperparameter (Python number, or array from ``inject_hyperparams``) in
  ``dtype``: a float64 hyperparameter must not promote float32 state (``jax_enable_x64``)."""
  return jnp.asarray(value, dtype)


def check_rank(name: str, rank) -> None:
  """``rank`` (or SPLU's ``order``) must be a whole number ≥ 1: a rank of 0 would store
  zero-size ``U``, ``V`` (which Orbax cannot checkpoint) for what ``psgd.diag(geometry="eq")``
  already is."""
  check_integer(name, rank, low=0.0)
  number = concrete_float(rank)
  if number is not None and number < 1:
    raise ValueError(f"{name} must be >= 1, got {rank!r}: with {name}=0 this preconditioner "
                     "is diagonal; use psgd.diag(geometry='eq').")
