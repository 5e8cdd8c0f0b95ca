"""The one gradient transformation every PSGD family is built on.

Per step, for a params-shaped tree of gradients:

1. Draw the update coin and probes from ``fold_in(key(seed), count)`` (identical on every
   replica). The first step always fits, so ``Q`` starts at the data's scale.
2. On fitting steps only (inside ``lax.cond``): get the curvature pair ``(v, h)`` of every
   leaf from the curvature source (computing Hessian-vector products there, if asked),
   set ``Q``'s scale from the first usable pair when ``init_scale=None``, and move each
   leaf's ``Q`` one normalized step on its group.
3. Return ``P g`` for every leaf, in the dtype the gradient came in.

A step whose gradients or pair are not all finite leaves every ``Q`` unchanged, as does a
step that would make a ``Q`` non-finite; ``Q`` never holds NaN/Inf. The engine knows
groups only through :class:`~psgd_optax._src.groups.base.Group`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from psgd_optax._src import curvature as curvature_lib
from psgd_optax._src.groups.base import GroupForShape
from psgd_optax._src.schedules import update_probability_schedule
from psgd_optax._src.trees import all_finite, rebuild, value_at
from psgd_optax._src.validation import check_float_dtype, check_number

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


class PSGDState(NamedTuple):
  """State of a PSGD preconditioner.

  Attributes:
    count: number of ``update`` calls so far (int32).
    preconditioner: a params-shaped tree; each leaf's entry is its group's state (for
      ``kron``/``dense``/``diag`` a :class:`KronState` of factors and Lipschitz
      estimates), in ``precond_dtype``.
    scale_set: a params-shaped tree of booleans: whether that leaf's ``Q`` has had its
      scale set (from ``init_scale`` or from the first usable curvature pair).
    curvature: what the curvature source remembers between steps: ``()`` for
      whitening, Newton and finite differences; for ``"secant"`` a
      ``SecantMemory(params, grads, has_previous)`` of the previous step.
  """

  count: jax.Array
  preconditioner: Any
  scale_set: Any
  curvature: Any = ()


def _initial_scale(v: jax.Array, h: jax.Array, integrate_probe: bool) -> jax.Array:
  """``mean(v²)^{1/4} · mean(h⁴)^{-1/8}``: makes ``P`` match ``|v| / |h|`` at once.

  Computed after dividing ``h`` by its largest entry, so gradients of 1e-30 or 1e30
  give a finite scale in float32.
  """
  peak = jnp.max(jnp.abs(h))
  safe_peak = jnp.where(peak > 0, peak, 1.0)
  fourth = jnp.mean((h / safe_peak) ** 4)
  scale = fourth ** (-0.125) / jnp.sqrt(safe_peak)
  if not integrate_probe:
    scale = scale * jnp.mean(v * v) ** 0.25
  return jnp.where(peak > 0, scale, jnp.inf)


def check_engine_options(*, curvature, update_probability, precond_lr, init_scale,
                         damping, damping_type, precond_dtype, seed,
                         axis_name=None) -> None:
  if curvature not in curvature_lib.CURVATURES:
    raise ValueError(f"curvature must be one of {curvature_lib.CURVATURES}, "
                     f"got {curvature!r}.")
  if damping_type not in curvature_lib.DAMPING_TYPES:
    raise ValueError(f"damping_type must be one of {curvature_lib.DAMPING_TYPES}, "
                     f"got {damping_type!r}.")
  check_number("update_probability", update_probability, low=0.0, high=1.0,
               allow_callable=True, allow_none=True)
  check_number("precond_lr", precond_lr, low=0.0, low_open=True, allow_callable=True)
  check_number("init_scale", init_scale, low=0.0, low_open=True, allow_none=True)
  check_number("damping", damping, low=0.0, allow_none=True)
  check_number("seed", seed)
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  if axis_name is not None and not all(isinstance(n, str) and n for n in names):
    raise ValueError(f"axis_name must be None, an axis name or a tuple of them, got "
                     f"{axis_name!r}.")
  check_float_dtype("precond_dtype", precond_dtype)


ENGINE_ARGS_DOC = """    curvature: ``"whitening"`` (fit to gradients), ``"newton"`` (fit to
      Hessian-vector products from ``value_fn=`` or ``hvp=``/``vector=`` extra args),
      ``"finite_difference"`` (gradient differences from ``value_fn=``) or
      ``"secant"`` (differences of successive params and gradients).
    update_probability: probability of fitting ``Q`` on a step, a float or a schedule of
      the step count (a schedule returning 0 or 1, such as
      :func:`psgd_optax.periodic_schedule`, skips updates deterministically). ``None``
      uses :func:`psgd_optax.update_probability_schedule`.
    precond_lr: normalized step size of the fit, in (0, 1] typically; float or schedule.
    init_scale: ``Q``'s initial scale; ``None`` sets it from the first curvature pair.
    damping: damping strength ``λ`` of the pair; ``None`` gives 1e-6 for whitening and 0
      for the other curvatures.
    damping_type: ``"relative"`` (``h + λ·rms(h)·v``), ``"traditional"`` (``h + λv``)
      or ``"nonconvex"`` (``h + λv′`` with an independent ``v′``: ``P ≤ I/λ`` even
      for indefinite ``H``); see :mod:`psgd_optax._src.curvature`.
    precond_dtype: dtype (or its name) of ``Q`` and of the fit (``"float32"`` by default,
      whatever the params' dtype).
    seed: seed of the probes and of the update coin.
    axis_name: for data parallelism under ``pmap``/``shard_map``: the mapped axis (or
      tuple of axes) to average over. Probes and the update coin are the same on every
      replica; before ``Q`` moves, the gradients it is fitted to and the curvature products
      (e.g. each replica's HVP of its own batch) are averaged over the axis, so ``Q`` stays
      identical on every replica and equals a single-device fit on the whole batch. The
      preconditioned output uses the ``updates`` as given: average the gradients yourself
      (``lax.pmean``) if every replica should take the same step.
"""


def preconditioner(
    group_for_shape: GroupForShape,
    *,
    curvature: str = "whitening",
    update_probability: ScalarOrSchedule | None = None,
    precond_lr: ScalarOrSchedule = 0.1,
    init_scale: float | None = None,
    damping: float | None = None,
    damping_type: str = "relative",
    precond_dtype: Any = "float32",
    seed: int = 0,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """A PSGD preconditioner on the groups given by ``group_for_shape``.

  This is the engine behind :func:`psgd_optax.kron`, :func:`psgd_optax.dense` and
  :func:`psgd_optax.diag`; use it directly to plug in a group of your own. It returns the
  preconditioned gradient ``P g`` (a direction, positive sign): chain it with
  ``optax.scale(-learning_rate)`` or use :mod:`psgd_optax.optimizers`.

  Args:
    group_for_shape: ``(shape, state_leaves=None) -> Group``: the group of a leaf; in
      ``update`` it also gets the flat leaves of the leaf's group state, from which it
      should read its structure.
  {engine_args}
  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
    ``(updates, state, params=None, *, value_fn=None, hvp=None, vector=None,
    **extra_args)``.

  Example:
    A Kronecker preconditioner whose leading axis is always diagonal:

    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> def group_for_shape(shape, state_leaves=None):
    ...   kinds = ("diagonal",) + ("dense",) * (len(shape) - 1)
    ...   return psgd.kron_group(shape, kinds=kinds)
    >>> tx = psgd.preconditioner(group_for_shape)
    >>> state = tx.init(jnp.zeros((50, 8)))
    >>> [q.shape for q in state.preconditioner.factors]
    [(50,), (8, 8)]
  """
  check_engine_options(curvature=curvature, update_probability=update_probability,
                       precond_lr=precond_lr, init_scale=init_scale, damping=damping,
                       damping_type=damping_type, precond_dtype=precond_dtype, seed=seed,
                       axis_name=axis_name)
  if update_probability is None:
    update_probability = update_probability_schedule()
  source = curvature_lib.make_curvature(curvature, damping, damping_type)
  dtype = jnp.dtype(precond_dtype)

  def average(tree):
    """The mean over the data-parallel axis (identity without one)."""
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

  def init_fn(params):
    def init_leaf(leaf):
      group = group_for_shape(tuple(leaf.shape))
      return group.init(1.0 if init_scale is None else init_scale, dtype)

    return PSGDState(
        count=jnp.zeros([], jnp.int32),
        preconditioner=jax.tree.map(init_leaf, params),
        scale_set=jax.tree.map(lambda _: jnp.asarray(init_scale is not None), params),
        curvature=source.init(params, dtype),
    )

  def update_fn(updates, state, params=None, *, value_fn=None, hvp=None, vector=None,
                **extra_args):
    del extra_args  # other transformations' arguments
    source.check_args(params, {"value_fn": value_fn, "hvp": hvp, "vector": vector})
    return compiled_update(updates, state, params, value_fn=value_fn, hvp=hvp,
                           vector=vector)

  # Jitted so that eager callers (notebooks, doctests) compile the lax.cond once rather
  # than on every call; inside a caller's jit it is inlined. value_fn is static (it is
  # a function), so a new closure per eager step recompiles, as any eager JAX code does.
  @functools.partial(jax.jit, static_argnames=("value_fn",))
  def compiled_update(updates, state, params, *, value_fn, hvp, vector):
    curvature_args = {"value_fn": value_fn, "hvp": hvp, "vector": vector}
    leaves, treedef = jax.tree.flatten(updates)
    grads = [leaf.astype(dtype) for leaf in leaves]
    # Each group's structure is read from its state's leaves (so structural options that
    # inject_hyperparams traces are only used in init), and the state is rebuilt in the
    # group's own containers: frameworks such as flax.nnx hand states back re-containered.
    stored = [jax.tree.leaves(q) for q in treedef.flatten_up_to(state.preconditioner)]
    groups = [group_for_shape(tuple(leaf.shape), q) for leaf, q in zip(leaves, stored)]
    q_leaves = [rebuild(lambda g=group: g.init(1.0, dtype), q)
                for group, q in zip(groups, stored)]
    set_leaves = treedef.flatten_up_to(state.scale_set)
    memory = rebuild(lambda: source.init(updates, dtype), jax.tree.leaves(state.curvature))

    key = jax.random.fold_in(jax.random.key(seed), state.count)
    coin_key, probe_key = jax.random.split(key)
    probability = value_at(update_probability, state.count)
    fit_now = (state.count == 0) | (jax.random.uniform(coin_key) < probability)
    lr = jnp.asarray(value_at(precond_lr, state.count), dtype)

    def fit(carry):
      q_old, scale_set = carry
      fit_grads = average(grads)
      pair = source.pair(probe_key, fit_grads, params, treedef, dtype, curvature_args, memory)
      pair = dataclasses.replace(pair, products=average(pair.products))
      finite = all_finite([fit_grads, pair.vectors, pair.products]) & pair.valid
      q_new, set_new = [], []
      for group, q, was_set, v, h in zip(groups, q_old, scale_set, pair.vectors,
                                         pair.products):
        scale = _initial_scale(v, h, pair.integrate_probe)
        scale_ok = jnp.isfinite(scale) & (scale > 0)
        usable = finite & jnp.any(h != 0) & (was_set | scale_ok)
        safe_scale = jnp.where(scale_ok, scale, 1.0)
        q_start = optax.tree.where(was_set, q, group.init(safe_scale, dtype))
        q_moved = group.update(q_start, v, h, lr, integrate_probe=pair.integrate_probe)
        moved_ok = usable & all_finite(q_moved)
        q_new.append(optax.tree.where(
            moved_ok, q_moved, optax.tree.where(usable, q_start, q)))
        set_new.append(was_set | usable)
      return q_new, set_new

    q_leaves, set_leaves = jax.lax.cond(fit_now, fit, lambda carry: carry,
                                        (q_leaves, set_leaves))
    preconditioned = [
        group.precondition(q, g).astype(leaf.dtype)
        for group, q, g, leaf in zip(groups, q_leaves, grads, leaves)
    ]
    new_state = PSGDState(
        count=optax.safe_increment(state.count),
        preconditioner=treedef.unflatten(q_leaves),
        scale_set=treedef.unflatten(set_leaves),
        # A source with memory (secant pairs) keeps the averaged gradients, so the state
        # stays the same on every replica; the others pay no extra all-reduce.
        curvature=source.remember(memory, average(grads) if jax.tree.leaves(memory) else grads,
                                  params, treedef, dtype),
    )
    return treedef.unflatten(preconditioned), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


preconditioner.__doc__ = preconditioner.__doc__.replace("  {engine_args}\n",
                                                        ENGINE_ARGS_DOC + "\n")
