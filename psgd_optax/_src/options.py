"""The options every PSGD family shares: their types, their documentation and their checks.

:func:`psgd_optax.preconditioner` (the engine) declares them with their defaults; each
family in :mod:`psgd_optax._src.families` takes them as ``**options`` typed by
:class:`EngineOptions`, so type checkers and IDEs see every name and type, and its
``inspect.signature`` lists them with their defaults (what ``optax.inject_hyperparams``
reads).
"""

from __future__ import annotations

from typing import Any, Callable, TypedDict, Union

import jax

from psgd_optax._src import curvature as curvature_lib
from psgd_optax._src.sharding import check_preconditioner_sharding
from psgd_optax._src.stacks import check_stacked_spec
from psgd_optax._src.validation import check_choice, check_float_dtype, check_integer, check_number

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


class EngineOptions(TypedDict, total=False):
  """The engine's keyword options, as every family's ``**options`` (see ``ARGS_DOC``).

  Example:
    >>> import psgd_optax as psgd
    >>> options: psgd.EngineOptions = {"curvature": "newton", "update_probability": 0.5}
    >>> tx = psgd.kron(**options)  # type checkers see every key and its type
  """

  curvature: str
  update_probability: ScalarOrSchedule | None
  precond_lr: ScalarOrSchedule | None
  init_scale: float | None
  damping: float | None
  damping_type: str
  precond_dtype: Any
  seed: int
  axis_name: Any
  stacked: Any
  preconditioner_sharding: Any


class KronOptions(EngineOptions, total=False):
  """:func:`psgd_optax.kron`'s options (for the ready optimizer's ``**options``)."""

  max_size: int
  max_skew: float
  memory_save_mode: str | None
  geometry: str
  lipschitz_decay: float


class GeometryOptions(EngineOptions, total=False):
  """:func:`psgd_optax.dense`'s and :func:`psgd_optax.diag`'s options."""

  geometry: str
  lipschitz_decay: float


ARGS_DOC = """    curvature: ``"whitening"`` (fit to gradients), ``"newton"`` (fit to
      Hessian-vector products from ``value_fn=`` or ``hvp=``/``vector=`` extra args),
      ``"finite_difference"`` (gradient differences from ``value_fn=``) or
      ``"secant"`` (differences of successive params and gradients).
    update_probability: probability of fitting ``Q`` on a step, a float or a schedule of
      the step count (a schedule returning 0 or 1, such as
      :func:`psgd_optax.periodic_schedule`, skips updates deterministically). ``None``
      uses :func:`psgd_optax.update_probability_schedule`.
    precond_lr: normalized step size of the fit, in (0, 1]; float or schedule. ``None``
      gives 0.5 for whitening, which tracks a training run's changing gradient statistics
      (a transformer's) much faster than 0.1, and 0.1 for the other curvatures, whose
      pairs are noisier and settle more precisely with the smaller step.
    init_scale: ``Q``'s initial scale; ``None`` sets it from the first curvature pair.
    damping: damping strength ``λ`` of the pair; ``None`` gives 1e-6 for whitening and 0
      for the other curvatures.
    damping_type: ``"relative"`` (``h + λ·rms(h)·v``), ``"traditional"`` (``h + λv``)
      or ``"nonconvex"`` (``h + λv′`` with an independent ``v′``: ``P ≤ I/λ`` even
      for indefinite ``H``).
    precond_dtype: dtype (or its name) of ``Q`` and of the fit (``"float32"`` by default,
      whatever the params' dtype).
    seed: seed of the probes and of the update coin (an int).
    axis_name: for data parallelism under ``pmap``/``shard_map``: the mapped axis (or
      tuple of axes) to average over. Probes and the update coin are the same on every
      replica; before ``Q`` moves, the gradients it is fitted to and the curvature products
      (e.g. each replica's HVP of its own batch) are averaged over the axis, so ``Q`` stays
      identical on every replica and equals a single-device fit on the whole batch. The
      preconditioned output uses the ``updates`` as given: average the gradients yourself
      (``lax.pmean``) if every replica should take the same step.
    stacked: which leaves carry a leading layer axis (``nnx.scan``/``lax.scan`` models):
      ``None`` (none), a pytree prefix of the params with booleans, or a callable
      ``(path, leaf) -> bool``. A stacked leaf of shape ``(L, *s)`` gets ``L`` independent
      preconditioners of shape ``s`` (own factors, initial scale and fit), equal to ``L``
      separate leaves. With ``optax.inject_hyperparams`` pass it in ``static_args``.
    preconditioner_sharding: layout of the stored preconditioner state on a mesh (params
      sharded with ``jax.jit`` and ``NamedSharding``): ``None`` keeps every factor
      replicated; a ``jax.sharding.PartitionSpec`` such as ``P("x")`` shards each state
      array's member axis (the units of a stack) where it divides evenly, and otherwise
      the axes after it (the rows of a big factor), dividing the state's memory over the
      devices; a ``NamedSharding`` does the same on its own mesh; a callable ``shape ->
      PartitionSpec | None`` decides per array (``shape`` leads with the member axis). The
      factors are gathered for the step's math and stored back in this layout.
      Params-shaped state keeps the params' sharding and the output has the incoming
      updates' sharding. With ``optax.inject_hyperparams`` pass a callable in
      ``static_args``.
"""


def check(*, curvature, update_probability, precond_lr, init_scale, damping, damping_type,
          precond_dtype, seed, axis_name, stacked, preconditioner_sharding) -> None:
  """Raises ``ValueError`` naming the first invalid engine option."""
  check_choice("curvature", curvature, curvature_lib.CURVATURES)
  check_choice("damping_type", damping_type, curvature_lib.DAMPING_TYPES)
  check_number("update_probability", update_probability, low=0.0, high=1.0,
               allow_callable=True, allow_none=True)
  check_number("precond_lr", precond_lr, low=0.0, low_open=True, allow_callable=True,
               allow_none=True)
  check_number("init_scale", init_scale, low=0.0, low_open=True, allow_none=True)
  check_number("damping", damping, low=0.0, allow_none=True)
  check_integer("seed", seed)
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  if axis_name is not None and not all(isinstance(n, str) and n for n in names):
    raise ValueError(f"axis_name must be None, an axis name or a tuple of them, got "
                     f"{axis_name!r}.")
  check_float_dtype("precond_dtype", precond_dtype)
  check_stacked_spec(stacked)
  check_preconditioner_sharding(preconditioner_sharding)
