"""Schedules for how often the preconditioner is fitted."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from psgd_optax._src.validation import check_integer, check_number


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


def log10_skip_schedule() -> Callable[[jax.Array], jax.Array]:
  r"""The skipped-update rule of Li (2018): fit at step ``t`` iff ``t mod k(t) = 0``.

  .. math:: k(t) = \max(\lfloor \log_{10} t \rfloor, 1)

  so ``Q`` is fitted on every step up to 99, every 2nd up to 999, every 3rd up to 9999,
  and so on (step 0 always fits). Returns 1.0 on fitting steps and 0.0 otherwise, for
  ``update_probability=``.

  Example:
    >>> import psgd_optax as psgd
    >>> schedule = psgd.log10_skip_schedule()
    >>> [int(schedule(t)) for t in (0, 9, 99, 100, 101, 1000, 1001, 1002, 1003)]
    [1, 1, 1, 1, 0, 0, 0, 1, 0]
  """

  def schedule(count):
    count = jnp.asarray(count, jnp.int32)
    # floor(log10 t) by comparison with powers of ten: exact, unlike a float log.
    powers = jnp.asarray([10 ** k for k in range(1, 10)], jnp.int32)
    digits = jnp.sum(count >= powers)
    period = jnp.maximum(digits, 1).astype(jnp.int32)
    return (count % period == 0).astype(jnp.float32)

  return schedule


def periodic_schedule(period: int, offset: int = 0) -> Callable[[jax.Array], jax.Array]:
  """Fits ``Q`` every ``period`` steps (at ``t ≡ offset mod period``); 1.0 or 0.0.

  Example:
    >>> import psgd_optax as psgd
    >>> schedule = psgd.periodic_schedule(3)
    >>> [int(schedule(t)) for t in range(7)]
    [1, 0, 0, 1, 0, 0, 1]
  """
  check_integer("period", period, low=1.0)
  check_integer("offset", offset, low=0.0)

  def schedule(count):
    count = jnp.asarray(count, jnp.int32)
    return ((count - offset) % int(period) == 0).astype(jnp.float32)

  return schedule


def bernoulli_schedule(probability: float) -> Callable[[jax.Array], jax.Array]:
  """Fits ``Q`` with a constant probability on every step (the engine's coin); the same as
  passing the float itself as ``update_probability``.

  Example:
    >>> import psgd_optax as psgd
    >>> float(psgd.bernoulli_schedule(0.1)(1234))
    0.10000000149011612
  """
  check_number("probability", probability, low=0.0, high=1.0)

  def schedule(count):
    return jnp.full(jnp.shape(count), probability, jnp.float32)

  return schedule
