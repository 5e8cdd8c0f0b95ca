r"""Ready optimizers: a preconditioner + momentum + clipping + decoupled weight decay + step.

:func:`with_preconditioner` puts any preconditioner (a PSGD family, ``fop``, ``snr``, or a
chain of them) into the chain every ready optimizer uses; :func:`kron`, :func:`dense` and
:func:`diag` are that chain with their family's options in one signature. The
preconditioner is fitted to the raw gradients (the papers' whitening of ``g``) and the
momentum averages the preconditioned directions; because the preconditioned gradient is
already normalized, the momentum is an exponential moving average
``m ← β m + (1 − β) P g`` (bias-corrected), not a sum.

A step whose gradients are not all finite returns zero updates and leaves the state as it
was (every psgd_optax preconditioner keeps its own state then, but for the PSGD engine's
call count, from which its probes derive; the momentum, clip, decay and step-size states
are kept here), so one NaN batch does not poison the momentum.
All are injectable: ``optax.inject_hyperparams(psgd.optimizers.kron)(learning_rate=...)``.
Extra ``update`` arguments (``value_fn=``, ``hvp=``, ``vector=``) reach the preconditioner.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import optax

from psgd_optax._src import families
from psgd_optax._src.trees import all_finite
from psgd_optax._src.validation import check_mask, check_number

if TYPE_CHECKING:
  from typing_extensions import Unpack

  from psgd_optax._src.options import GeometryOptions, KronOptions

_ARGS_DOC = """    learning_rate: step size (float or schedule of the step count). The update has
      RMS at most ``max_update_rms`` per leaf, so this is about the RMS of each entry's
      step. The default 1e-2 was at or near the best peak rate of warmup/cosine sweeps on
      a digits CNN and on a byte-level GPT (``benchmarks/lm.py``, BENCHMARKS.md), where
      AdamW's best were 3e-2 and 3e-3: sweep around 1e-2 rather than from AdamW's rate.
    momentum: EMA coefficient ``β`` of the preconditioned direction (0 disables).
    weight_decay: decoupled weight decay (``θ ← θ − lr·wd·θ``). Its pull against the step
      ``lr·m̂`` does not depend on ``lr``: for the whitened direction (RMS about 1) AdamW's
      values fit; a Newton-type direction is far smaller (RMS about 1e-3 on a small GPT),
      so ``curvature="newton"`` needs ``wd`` about 1e-3 or less.
    mask: pytree of booleans (or a callable of the params) selecting the leaves to decay.
    max_update_rms: clip each leaf's update to this RMS before the step size
      (``optax.clip_by_block_rms``; ``None`` disables). The whitened direction has RMS
      about 1, so this bounds the step at ``1.1·learning_rate`` per entry on average."""


def with_preconditioner(
    preconditioner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule = 1e-2,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    max_update_rms: float | None = 1.1,
) -> optax.GradientTransformationExtraArgs:
  r"""A ready optimizer around ``preconditioner``: momentum, clipping, weight decay, step.

  .. math::
    m_t = \beta m_{t-1} + (1-\beta)\,P_t g_t, \qquad
    \theta_{t+1} = \theta_t - \eta_t\,\big(\mathrm{clip}(\hat m_t) + \lambda\,\theta_t\big)

  with ``P_t g_t`` the preconditioner's output, ``m̂`` the bias-corrected EMA and ``clip``
  the per-leaf RMS clip at ``max_update_rms``.

  Args:
    preconditioner: any transformation returning a direction (positive sign): a PSGD
      family (``psgd.lra(rank=10)``, ``psgd.xmat()``, ...), ``psgd.fop(...)``,
      ``optax.flatten(psgd.lra())``, a chain of them.
{args}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is the tuple
    ``(preconditioner state, momentum, clip, weight decay, step size)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import psgd_optax as psgd
    >>> params = jnp.array([1.0, -2.0, 0.5])
    >>> loss = lambda p: jnp.sum(jnp.array([10.0, 0.1, 1.0]) * p ** 2)
    >>> tx = psgd.optimizers.with_preconditioner(psgd.lra(rank=2), learning_rate=0.05)
    >>> state = tx.init(params)
    >>> for _ in range(300):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 1e-2)
    True
  """
  check_number("learning_rate", learning_rate, low=0.0, allow_callable=True)
  check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
  check_number("weight_decay", weight_decay, low=0.0)
  check_mask("mask", mask)
  check_number("max_update_rms", max_update_rms, low=0.0, low_open=True, allow_none=True)
  if not (hasattr(preconditioner, "init") and hasattr(preconditioner, "update")):
    raise ValueError("preconditioner must be an optax.GradientTransformation, got "
                     f"{preconditioner!r}.")
  preconditioner = optax.with_extra_args_support(preconditioner)
  tail = optax.chain(
      optax.ema(momentum, debias=True),
      optax.clip_by_block_rms(max_update_rms) if max_update_rms is not None
      else optax.identity(),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))

  def init_fn(params):
    return (preconditioner.init(params), *tail.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    finite = all_finite(updates)
    directions, preconditioner_state = preconditioner.update(updates, state[0], params,
                                                             **extra_args)
    outputs, tail_state = tail.update(directions, tuple(state[1:]), params, **extra_args)
    tail_state = optax.tree.where(finite, tail_state, tuple(state[1:]))
    outputs = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), outputs)
    return outputs, (preconditioner_state, *tail_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


with_preconditioner.__doc__ = with_preconditioner.__doc__.replace("{args}", _ARGS_DOC)


_OWN = [p for name, p in inspect.signature(with_preconditioner).parameters.items()
        if name != "preconditioner"]


def _ready(family):
  """Declares a ready optimizer: its signature is its own options then ``family``'s."""
  def declare(optimizer):
    optimizer.__signature__ = inspect.Signature(
        _OWN + list(inspect.signature(family).parameters.values()),
        return_annotation=optax.GradientTransformationExtraArgs)
    optimizer.__doc__ = optimizer.__doc__.replace("{args}", _ARGS_DOC)
    return optimizer
  return declare


@_ready(families.kron)
def kron(learning_rate: optax.ScalarOrSchedule = 1e-2, *, momentum: float = 0.9,
         weight_decay: float = 0.0, mask: Any | Callable[[optax.Params], Any] | None = None,
         max_update_rms: float | None = 1.1,
         **options: Unpack[KronOptions]) -> optax.GradientTransformationExtraArgs:
  r"""PSGD-Kron optimizer: :func:`psgd_optax.kron` + momentum + clip + weight decay.

  .. math::
    m_t = \beta m_{t-1} + (1-\beta) P_t g_t, \qquad
    \theta_{t+1} = \theta_t - \eta_t\,(\mathrm{clip}(\hat m_t) + \lambda\,\theta_t)

  Args:
{args}
    **options: the options of :func:`psgd_optax.kron` (``curvature``,
      ``update_probability``, ``precond_lr``, ``geometry``, ``max_size``, ...).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`
    (:func:`psgd_optax.optimizers.with_preconditioner` of :func:`psgd_optax.kron`).

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
  return with_preconditioner(families.kron(**options), learning_rate, momentum=momentum,
                             weight_decay=weight_decay, mask=mask,
                             max_update_rms=max_update_rms)


@_ready(families.dense)
def dense(learning_rate: optax.ScalarOrSchedule = 1e-2, *, momentum: float = 0.9,
          weight_decay: float = 0.0, mask: Any | Callable[[optax.Params], Any] | None = None,
          max_update_rms: float | None = 1.1,
          **options: Unpack[GeometryOptions]) -> optax.GradientTransformationExtraArgs:
  r"""PSGD optimizer with a dense preconditioner per leaf (:func:`psgd_optax.dense`).

  .. math::
    m_t = \beta m_{t-1} + (1-\beta) P_t g_t, \qquad
    \theta_{t+1} = \theta_t - \eta_t\,(\mathrm{clip}(\hat m_t) + \lambda\,\theta_t)

  Args:
{args}
    **options: the options of :func:`psgd_optax.dense`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> tx = psgd.optimizers.dense(learning_rate=1e-2, momentum=0.0)
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([1.0, 2.0, 3.0]), state, params)
    >>> bool(jnp.all(updates < 0))   # a descent step
    True
  """
  return with_preconditioner(families.dense(**options), learning_rate, momentum=momentum,
                             weight_decay=weight_decay, mask=mask,
                             max_update_rms=max_update_rms)


@_ready(families.diag)
def diag(learning_rate: optax.ScalarOrSchedule = 1e-2, *, momentum: float = 0.9,
         weight_decay: float = 0.0, mask: Any | Callable[[optax.Params], Any] | None = None,
         max_update_rms: float | None = 1.1,
         **options: Unpack[GeometryOptions]) -> optax.GradientTransformationExtraArgs:
  r"""PSGD optimizer with a diagonal preconditioner per leaf (:func:`psgd_optax.diag`).

  .. math::
    m_t = \beta m_{t-1} + (1-\beta) P_t g_t, \qquad
    \theta_{t+1} = \theta_t - \eta_t\,(\mathrm{clip}(\hat m_t) + \lambda\,\theta_t)

  Args:
{args}
    **options: the options of :func:`psgd_optax.diag`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> tx = psgd.optimizers.diag(learning_rate=1e-2)
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([1.0, 2.0, 3.0]), state, params)
    >>> updates.shape
    (3,)
  """
  return with_preconditioner(families.diag(**options), learning_rate, momentum=momentum,
                             weight_decay=weight_decay, mask=mask,
                             max_update_rms=max_update_rms)
