"""Ready optimizers: a PSGD preconditioner + momentum + decoupled weight decay + step size.

Each is ``optax.chain(preconditioner, ema(momentum), [clip], add_decayed_weights,
scale_by_learning_rate)``. The preconditioner is fitted to the raw gradients (the papers'
whitening of ``g``) and the momentum averages the preconditioned directions; because the
preconditioned gradient is already normalized, the momentum is an exponential moving
average ``m ← β m + (1 − β) P g`` (bias-corrected), not a sum.

All are injectable: ``optax.inject_hyperparams(psgd.optimizers.kron)(learning_rate=...)``.
Extra ``update`` arguments (``value_fn=``, ``hvp=``, ``vector=``) reach the preconditioner
through ``optax.chain``.
"""

from __future__ import annotations

from typing import Any, Callable

import optax

from psgd_optax._src.groups.dense import dense as dense_preconditioner
from psgd_optax._src.groups.diag import diag as diag_preconditioner
from psgd_optax._src.groups.kron import kron as kron_preconditioner
from psgd_optax._src.validation import check_number


def _chain(preconditioner, learning_rate, momentum, weight_decay, mask, max_update_rms):
  check_number("learning_rate", learning_rate, low=0.0, allow_callable=True)
  check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
  check_number("weight_decay", weight_decay, low=0.0)
  check_number("max_update_rms", max_update_rms, low=0.0, low_open=True, allow_none=True)
  return optax.chain(
      preconditioner,
      optax.ema(momentum, debias=True),
      optax.clip_by_block_rms(max_update_rms) if max_update_rms is not None
      else optax.identity(),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


_ARGS_DOC = """
  Args:
    learning_rate: step size (float or schedule of the step count).
    momentum: EMA coefficient ``β`` of the preconditioned direction (0 disables).
    weight_decay: decoupled weight decay (``θ ← θ − lr·wd·θ``).
    mask: pytree of booleans (or a callable of the params) selecting the leaves to decay.
    max_update_rms: if set, clip each leaf's update to this RMS before the step size
      (``optax.clip_by_block_rms``); guards against an early, badly fitted ``P``.
    **preconditioner_options: passed to the preconditioner ({name}); e.g.
      ``curvature="newton"``, ``update_probability``, ``precond_lr``, ``geometry``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
"""


def kron(learning_rate: optax.ScalarOrSchedule = 3e-4, momentum: float = 0.9,
         weight_decay: float = 0.0, mask: Any | Callable | None = None,
         max_update_rms: float | None = None,
         **preconditioner_options) -> optax.GradientTransformationExtraArgs:
  return _chain(kron_preconditioner(**preconditioner_options), learning_rate, momentum,
                weight_decay, mask, max_update_rms)


def dense(learning_rate: optax.ScalarOrSchedule = 3e-4, momentum: float = 0.9,
          weight_decay: float = 0.0, mask: Any | Callable | None = None,
          max_update_rms: float | None = None,
          **preconditioner_options) -> optax.GradientTransformationExtraArgs:
  return _chain(dense_preconditioner(**preconditioner_options), learning_rate, momentum,
                weight_decay, mask, max_update_rms)


def diag(learning_rate: optax.ScalarOrSchedule = 3e-4, momentum: float = 0.9,
         weight_decay: float = 0.0, mask: Any | Callable | None = None,
         max_update_rms: float | None = None,
         **preconditioner_options) -> optax.GradientTransformationExtraArgs:
  return _chain(diag_preconditioner(**preconditioner_options), learning_rate, momentum,
                weight_decay, mask, max_update_rms)


kron.__doc__ = """PSGD-Kron optimizer: :func:`psgd_optax.kron` + momentum + weight decay.

  .. math::
    m_t = \\beta m_{t-1} + (1-\\beta) P_t g_t, \\qquad
    \\theta_{t+1} = \\theta_t - \\eta_t\\,(\\hat m_t + \\lambda_{wd}\\,\\theta_t)
""" + _ARGS_DOC.format(name=":func:`psgd_optax.kron`") + """
  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import psgd_optax as psgd
    >>> params = jnp.array([1.0, -2.0])
    >>> loss = lambda p: jnp.sum(jnp.array([10.0, 0.1]) * p ** 2)
    >>> tx = psgd.optimizers.kron(learning_rate=0.05, weight_decay=1e-4)
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 1e-2)
    True
"""

dense.__doc__ = """PSGD optimizer with a dense preconditioner per leaf (:func:`psgd_optax.dense`).
""" + _ARGS_DOC.format(name=":func:`psgd_optax.dense`") + """
  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> tx = psgd.optimizers.dense(learning_rate=1e-2, momentum=0.0)
    >>> state = tx.init(jnp.zeros(3))
    >>> updates, state = tx.update(jnp.array([1.0, 2.0, 3.0]), state)
    >>> updates.shape
    (3,)
"""

diag.__doc__ = """PSGD optimizer with a diagonal preconditioner per leaf (:func:`psgd_optax.diag`).
""" + _ARGS_DOC.format(name=":func:`psgd_optax.diag`") + """
  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> tx = psgd.optimizers.diag(learning_rate=1e-2)
    >>> state = tx.init(jnp.zeros(3))
    >>> updates, state = tx.update(jnp.array([1.0, 2.0, 3.0]), state)
    >>> updates.shape
    (3,)
"""
