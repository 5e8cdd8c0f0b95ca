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


def check_float_dtype(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is a floating dtype or the name of one."""
  if callable(value) and not isinstance(value, type):
    raise ValueError(
        f"{name} must be a dtype or its name, got {value!r} (with "
        f"optax.inject_hyperparams pass it by name, e.g. {name}='float64').")
  try:
    dtype = np.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating dtype, got {value!r}.")
