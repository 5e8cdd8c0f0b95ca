"""Ready optimizers: a PSGD preconditioner + momentum + decoupled weight decay + step size.

Each is ``optax.chain(preconditioner, ema(momentum), clip_by_block_rms, add_decayed_weights,
scale_by_learning_rate)``. The preconditioner is fitted to the raw gradients (the papers'
whitening of ``g``) and the momentum averages the preconditioned directions; because the
preconditioned gradient is already normalized, the momentum is an exponential moving
average ``m ← β m + (1 − β) P g`` (bias-corrected), not a sum.

All are injectable: ``optax.inject_hyperparams(psgd.optimizers.kron)(learning_rate=...)``.
Extra ``update`` arguments (``value_fn=``, ``hvp=``, ``vector=``) reach the preconditioner
through ``optax.chain``. Each optimizer's signature is its own options followed by its
preconditioner's (so ``inspect.signature`` and ``inject_hyperparams`` see them all).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import optax

from psgd_optax._src.family import keyword, merged_signature_factory
from psgd_optax._src.groups.dense import dense as dense_preconditioner
from psgd_optax._src.groups.diag import diag as diag_preconditioner
from psgd_optax._src.groups.kron import kron as kron_preconditioner
from psgd_optax._src.validation import check_number

_OWN_OPTIONS = [
    inspect.Parameter("learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                      default=3e-4, annotation=optax.ScalarOrSchedule),
    keyword("momentum", 0.9, float),
    keyword("weight_decay", 0.0, float),
    keyword("mask", None, Any | Callable | None),
    keyword("max_update_rms", 1.1, float | None),
]

_ARGS_DOC = """
  Args:
    learning_rate: step size (float or schedule of the step count).
    momentum: EMA coefficient ``β`` of the preconditioned direction (0 disables).
    weight_decay: decoupled weight decay (``θ ← θ − lr·wd·θ``).
    mask: pytree of booleans (or a callable of the params) selecting the leaves to decay.
    max_update_rms: clip each leaf's update to this RMS before the step size
      (``optax.clip_by_block_rms``; ``None`` disables). ``Q`` follows a change of
      gradient scale only at the fit's normalized pace, so after a long stretch of tiny
      gradients one large gradient gives a huge ``P g``; without this clip a 2000-step
      CNN run on digits diverged (``BENCHMARKS.md``).
    **preconditioner_options: the options of {name} (``curvature``,
      ``update_probability``, ``precond_lr``, ``geometry``, ...).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
"""


def _ready_optimizer(preconditioner_factory, name: str, summary: str, example: str):
  """Builds ``name(learning_rate, *, momentum, ..., **preconditioner options)``."""

  def build(own, preconditioner_options):
    check_number("learning_rate", own["learning_rate"], low=0.0, allow_callable=True)
    check_number("momentum", own["momentum"], low=0.0, high=1.0, high_open=True)
    check_number("weight_decay", own["weight_decay"], low=0.0)
    check_number("max_update_rms", own["max_update_rms"], low=0.0, low_open=True,
                 allow_none=True)
    clip = (optax.clip_by_block_rms(own["max_update_rms"])
            if own["max_update_rms"] is not None else optax.identity())
    return optax.chain(
        preconditioner_factory(**preconditioner_options),
        optax.ema(own["momentum"], debias=True),
        clip,
        optax.add_decayed_weights(own["weight_decay"], own["mask"]),
        optax.scale_by_learning_rate(own["learning_rate"]),
    )

  return merged_signature_factory(
      name, "psgd_optax.optimizers", _OWN_OPTIONS,
      inspect.signature(preconditioner_factory).parameters.values(), build,
      summary + _ARGS_DOC.format(name=f":func:`psgd_optax.{name}`") + example)


kron = _ready_optimizer(kron_preconditioner, "kron", """PSGD-Kron optimizer: :func:`psgd_optax.kron` + momentum + weight decay.

  .. math::
    m_t = \\beta m_{t-1} + (1-\\beta) P_t g_t, \\qquad
    \\theta_{t+1} = \\theta_t - \\eta_t\\,(\\hat m_t + \\lambda_{wd}\\,\\theta_t)
""", """
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
""")

dense = _ready_optimizer(dense_preconditioner, "dense", """PSGD optimizer with a dense preconditioner per leaf (:func:`psgd_optax.dense`).
""", """
  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> tx = psgd.optimizers.dense(learning_rate=1e-2, momentum=0.0)
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([1.0, 2.0, 3.0]), state, params)
    >>> updates.shape
    (3,)
""")

diag = _ready_optimizer(diag_preconditioner, "diag", """PSGD optimizer with a diagonal preconditioner per leaf (:func:`psgd_optax.diag`).
""", """
  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> tx = psgd.optimizers.diag(learning_rate=1e-2)
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([1.0, 2.0, 3.0]), state, params)
    >>> updates.shape
    (3,)
""")
