"""Signal-to-noise preconditioning (paper 004, Hilton 2019).

For a stochastic gradient ``g_s = g_t + ε`` with true gradient ``g_t`` and zero-mean noise of
variance ``σ²``, the best diagonal rescaling of ``g_s`` (for a first-order or a Newton step) is

.. math::
  T = \\frac{\\operatorname{diag}(g_t g_t^\\top)}{\\operatorname{diag}(E[g_s g_s^\\top])}
    = \\frac{S}{1 + S}, \\qquad S = \\frac{g_t^2}{\\sigma^2}.

The estimator (per coordinate, from the incoming updates ``u``):

- ``m`` = EMA of ``u`` with decay ``b1``, ``v`` = EMA of ``u²`` with decay ``b2``, both
  divided by ``1 − b^t`` (Adam's correction for the zero start).
- ``v̂`` estimates ``E[g_s²] = g_t² + σ²`` without bias while ``g_t`` and ``σ`` are steady.
- ``m̂²`` is biased upwards: ``E[m̂²] = g_t² + c_t σ²`` with
  ``c_t = (1 − b1)(1 + b1^t) / ((1 + b1)(1 − b1^t))``, the share of one sample's noise
  variance left in the average (1 after one step, ``(1 − b1)/(1 + b1)`` in the long run).
  Since ``E[v̂ − m̂²] = (1 − c_t) σ²``, the numerator ``(m̂² − c_t v̂) / (1 − c_t)`` has
  expectation ``g_t²`` exactly: that bias is corrected.
- What is not corrected: ``T̂`` is a ratio of estimates (Jensen's bias, small once ``v̂``
  averages many steps), and it is clipped to ``[0, 1]``, the range of ``S/(1 + S)``, which
  biases ``T̂`` upwards where the noisy numerator would go negative (low signal). The EMAs
  lag a drifting ``g_t``: ``b1`` trades noise in ``m̂`` for lag.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from psgd_optax._src.sharding import like
from psgd_optax._src.trees import rebuild
from psgd_optax._src.validation import check_float_dtype, check_number


class SNRState(NamedTuple):
  """State of :func:`snr`.

  Attributes:
    count: number of ``update`` calls (``int32``).
    mean: EMA of the incoming updates (not bias-corrected), in ``precond_dtype``.
    second_moment: EMA of their squares (not bias-corrected), in ``precond_dtype``.
  """
  count: jax.Array
  mean: Any
  second_moment: Any


def snr_ratio(state: SNRState, b1, b2) -> Any:
  """The estimate ``T̂ ∈ [0, 1]`` of ``S/(1+S)`` per coordinate held by an :class:`SNRState`.

  ``T̂ = 1`` before any update and on the first (there is no noise estimate yet).
  """

  def ratio(mean, second_moment):
    dtype = mean.dtype
    count = state.count.astype(dtype)
    # The same float ops whether b1, b2 are Python floats or traced (inject_hyperparams).
    decay1, decay2 = jnp.asarray(b1, dtype), jnp.asarray(b2, dtype)
    b1_t, b2_t = decay1 ** count, decay2 ** count
    tiny = jnp.finfo(dtype).tiny
    mean_hat = mean / jnp.maximum(1 - b1_t, tiny)
    second_hat = second_moment / jnp.maximum(1 - b2_t, tiny)
    remaining = (1 - decay1) * (1 + b1_t) / jnp.maximum((1 + decay1) * (1 - b1_t), tiny)
    signal = (mean_hat ** 2 - remaining * second_hat) / jnp.maximum(1 - remaining, tiny)
    estimate = jnp.clip(signal / jnp.maximum(second_hat, tiny), 0.0, 1.0)
    # Zero gradients carry no evidence of noise; neither does a single sample.
    informative = (count >= 2) & (second_hat > 0) & (remaining < 1)
    return jnp.where(informative, estimate, 1.0).astype(dtype)

  return jax.tree.map(ratio, state.mean, state.second_moment)


def snr(
    b1: float = 0.99,
    b2: float = 0.999,
    *,
    precond_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
  r"""Signal-to-noise preconditioning: scales each coordinate by ``T = S/(1+S)``.

  .. math::
    d_t = \hat T_t \odot u_t, \qquad
    \hat T_t = \operatorname{clip}\Big(\frac{(\hat m_t^2 - c_t \hat v_t)/(1 - c_t)}
        {\hat v_t}, 0, 1\Big)

  with ``m̂``, ``v̂`` the bias-corrected EMAs of ``u`` and ``u²`` and ``c_t`` the noise
  share left in ``m̂²`` (module docs: the estimator and its biases). ``u`` is whatever
  reaches this transformation, so it composes with a curvature preconditioner in either
  order (Hilton shows both are optimal in their own sense):

  - ``optax.chain(psgd.kron(), psgd.snr(), optax.scale(-lr))``: curvature, then SNR of the
    preconditioned gradient ``P g``.
  - ``optax.chain(psgd.snr(), psgd.kron(curvature="newton"), optax.scale(-lr))``: SNR of the
    raw gradient, then curvature ``H⁻¹ (T ⊙ g)``. Use a Newton-type (or secant) preconditioner
    here: a whitening-type one fits ``P`` to the very ``T ⊙ g`` it receives and normalizes
    the SNR scaling away (on a noisy quadratic this order with whitening ``kron`` diverged
    after ~650 steps; with Newton ``kron`` it converges, ``tests/test_fop_snr.py``).

  ``T̂`` damps coordinates whose gradient is mostly noise and leaves clean ones alone
  (``T → 1``); it never exceeds 1, so it shortens steps and never lengthens them.

  Args:
    b1: decay of the mean's EMA. Closer to 1: less noise in ``m̂``, more lag.
    b2: decay of the second moment's EMA.
    precond_dtype: dtype of the EMAs (``"float32"`` by default).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with :class:`SNRState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import psgd_optax as psgd
    >>> tx = psgd.snr(b1=0.999, b2=0.999)
    >>> state = tx.init(jnp.zeros(2))
    >>> update = jax.jit(tx.update)
    >>> key = jax.random.key(0)
    >>> for t in range(3000):  # coordinate 0: signal 1, noise 0.1; coordinate 1: pure noise
    ...   noise = jax.random.normal(jax.random.fold_in(key, t), (2,)) * jnp.array([0.1, 1.0])
    ...   updates, state = update(jnp.array([1.0, 0.0]) + noise, state)
    >>> ratio = psgd.snr_ratio(state, 0.999, 0.999)
    >>> bool(ratio[0] > 0.95), bool(ratio[1] < 0.1)
    (True, True)

  References:
    Hilton, *Preconditioning for stochastic gradient descent*, 2019.
  """
  check_number("b1", b1, low=0.0, high=1.0, high_open=True)
  check_number("b2", b2, low=0.0, high=1.0, high_open=True)
  check_float_dtype("precond_dtype", precond_dtype)
  dtype = jnp.dtype(precond_dtype)

  def init_fn(params):
    zeros = lambda p: like(jnp.zeros(p.shape, dtype), p)
    return SNRState(count=jnp.zeros([], jnp.int32), mean=jax.tree.map(zeros, params),
                    second_moment=jax.tree.map(zeros, params))

  # Jitted so that eager callers (notebooks, doctests) run one compiled step, not op by op.
  @jax.jit
  def compiled_update(updates, state):
    if not isinstance(state, SNRState):  # e.g. flax.nnx's own state containers
      state = rebuild(lambda: init_fn(updates), jax.tree.leaves(state))
    values = jax.tree.map(lambda u: u.astype(dtype), updates)

    def accumulate(mean, second_moment, u):
      # A leaf whose gradient is not finite, or whose square overflows the state's dtype,
      # keeps its statistics as they were.
      decay1, decay2 = jnp.asarray(b1, u.dtype), jnp.asarray(b2, u.dtype)
      new_mean = decay1 * mean + (1 - decay1) * u
      new_second = decay2 * second_moment + (1 - decay2) * u * u
      ok = jnp.all(jnp.isfinite(new_mean)) & jnp.all(jnp.isfinite(new_second))
      return jnp.where(ok, new_mean, mean), jnp.where(ok, new_second, second_moment)

    pairs = jax.tree.map(accumulate, state.mean, state.second_moment, values)
    is_pair = lambda x: isinstance(x, tuple)
    mean = jax.tree.map(lambda pair: pair[0], pairs, is_leaf=is_pair)
    second = jax.tree.map(lambda pair: pair[1], pairs, is_leaf=is_pair)
    new_state = SNRState(count=optax.safe_increment(state.count), mean=mean,
                         second_moment=second)
    ratios = snr_ratio(new_state, b1, b2)
    scaled = jax.tree.map(lambda t, u: (t * u.astype(dtype)).astype(u.dtype), ratios, updates)
    return scaled, new_state

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return compiled_update(updates, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
