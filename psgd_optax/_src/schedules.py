"""Schedules for how often the preconditioner is fitted."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from psgd_optax._src.validation import check_number


def update_probability_schedule(
    max_prob: float = 1.0,
    min_prob: float = 0.03,
    decay: float = 0.001,
    flat_start: int = 250,
) -> Callable[[jax.Array], jax.Array]:
  r"""The default preconditioner update-probability schedule.

  Fits ``Q`` on every step while it is far from its target, then anneals towards a
  small floor so that the average step costs about one gradient:

  .. math::
    p(t) = \mathrm{clip}\big(p_{\max}\, e^{-\kappa\,\max(t - t_0, 0)},\;
            p_{\min},\; p_{\max}\big)

  With the defaults, ``p`` is 1 for 250 steps, 0.37 at step 1250, 0.1 at step
  ~2550 and reaches 0.03 after ~3760 steps. ``benchmarks/update_probability.py`` measures
  the choice against constant probabilities.

  Args:
    max_prob: :math:`p_{\max}`, in (0, 1].
    min_prob: :math:`p_{\min}`, in [0, max_prob].
    decay: :math:`\kappa \ge 0`, per step.
    flat_start: :math:`t_0 \ge 0`, steps at ``max_prob``.

  Returns:
    A callable mapping the step count to a probability.

  Example:
    >>> import psgd_optax as psgd
    >>> schedule = psgd.update_probability_schedule()
    >>> [round(float(schedule(t)), 3) for t in (0, 250, 1250, 10_000)]
    [1.0, 1.0, 0.368, 0.03]
  """
  check_number("max_prob", max_prob, low=0.0, high=1.0, low_open=True)
  check_number("min_prob", min_prob, low=0.0, high=1.0)
  check_number("decay", decay, low=0.0)
  check_number("flat_start", flat_start, low=0.0)

  def schedule(count):
    elapsed = jnp.maximum(jnp.asarray(count, jnp.float32) - flat_start, 0.0)
    prob = max_prob * jnp.exp(-decay * elapsed)
    return jnp.clip(prob, min_prob, max_prob)

  return schedule
