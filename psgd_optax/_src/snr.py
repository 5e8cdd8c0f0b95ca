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
from psgd_optax._src.trees import all_finite, check_real, rebuild
from psgd_optax._src.validation import as_dtype, check_float_dtype, check_number, check_x64


class SNRState(NamedTuple):
  """State of :func:`snr`.

  Attributes:
    count: number of ``update`` calls (``int32``).
    mean: EMA of the incoming updates (not bias-corrected), in ``precond_dtype``.
    second_moment: EMA of their squares (not bias-corrected), in ``precond_dtype``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> state = psgd.snr().init({"w": jnp.zeros(3)})
    >>> int(state.count), state.mean["w"].shape
    (0, (3,))
  """
  count: jax.Array
  mean: Any
  second_moment: Any


def snr_ratio(state: SNRState, b1, b2) -> Any:
  """The estimate ``T̂ ∈ [0, 1]`` of ``S/(1+S)`` per coordinate held by an :class:`SNRState`.

  ``T̂ = 1`` before any update and on the first (there is no noise estimate yet).

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> tx = psgd.snr()
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> for g in ([1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [1.0, -1.0, 1.0]):
    ...   _, state = tx.update({"w": jnp.array(g)}, state)
    >>> psgd.snr_ratio(state, 0.99, 0.999)["w"]  # the middle entry flips sign: noise
    Array([1., 0., 1.], dtype=float32)
  """

  def ratio(mean, second_moment):
    dtype = mean.dtype
    count = state.count.astype(dtype)
    # The same float ops whether b1, b2 are Python floats or traced (inject_hyperparams).
    decay1, decay2 = as_dtype(b1, dtype), as_dtype(b2, dtype)
    b1_t, b2_t = decay1 ** count, decay2 ** count
    tiny = jnp.finfo(dtype).tiny
    mean_hat = mean / jnp.maximum(1 - b1_t, tiny)
    second_hat = second_moment / jnp.maximum(1 - b2_t, tiny)
    remaining = (1 - decay1) * (1 + b1_t) / jnp.maximum((1 + decay1) * (1 - b1_t), tiny)
    # Zero gradients carry no evidence of noise; neither does a single sample.
    informative = (count >= 2) & (second_hat > 0) & (remaining < 1)
    # T = (m̂² − c v̂) / ((1 − c) v̂), formed from m̂/√v̂ so that gradients of 1e19 (whose
    # squares overflow float32) give a ratio, not inf/inf; every division is guarded
    # where the estimate is not used, so reverse-mode derivatives stay finite.
    root = jnp.sqrt(jnp.where(informative, second_hat, 1.0))
    normalized = mean / (jnp.maximum(1 - b1_t, tiny) * root)
    signal = (normalized ** 2 - remaining) / jnp.where(informative, 1 - remaining, 1.0)
    return jnp.where(informative, jnp.clip(signal, 0.0, 1.0), 1.0).astype(dtype)

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
    check_real(params)
    check_x64("precond_dtype", dtype)
    zeros = lambda p: like(jnp.zeros(p.shape, dtype), p)
    return SNRState(count=jnp.zeros([], jnp.int32), mean=jax.tree.map(zeros, params),
                    second_moment=jax.tree.map(zeros, params))

  # Jitted so that eager callers (notebooks, doctests) run one compiled step, not op by op.
  @jax.jit
  def compiled_update(updates, state):
    if not isinstance(state, SNRState):  # e.g. flax.nnx's own state containers
      state = rebuild(lambda: init_fn(updates), jax.tree.leaves(state))
    values = jax.tree.map(lambda u: u.astype(dtype), updates)
    decay1, decay2 = as_dtype(b1, dtype), as_dtype(b2, dtype)
    new_mean = jax.tree.map(lambda m, u: decay1 * m + (1 - decay1) * u, state.mean, values)
    new_second = jax.tree.map(lambda s, u: decay2 * s + (1 - decay2) * u * u,
                              state.second_moment, values)
    # A step with a non-finite gradient changes nothing; a leaf whose square overflows the
    # state's dtype (finite gradients of ~1e20) keeps its statistics.
    finite = all_finite(values)
    keep = jax.tree.map(lambda m, s: finite & jnp.all(jnp.isfinite(m)) & jnp.all(jnp.isfinite(s)),
                        new_mean, new_second)
    select = lambda ok, new, old: jnp.where(ok, new, old)
    new_state = SNRState(
        count=jnp.where(finite, optax.safe_increment(state.count), state.count),
        mean=jax.tree.map(select, keep, new_mean, state.mean),
        second_moment=jax.tree.map(select, keep, new_second, state.second_moment))
    ratios = snr_ratio(new_state, b1, b2)
    scaled = jax.tree.map(lambda t, u: jnp.where(finite, t * u.astype(dtype), 0).astype(u.dtype),
                          ratios, updates)
    return scaled, new_state

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return compiled_update(updates, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
