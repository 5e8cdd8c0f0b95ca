"""The one gradient transformation every PSGD family is built on.

Per step, for a params-shaped tree of gradients:

1. Group the units (leaves, or layers of stacked leaves) into stacks of one shape
   (:mod:`psgd_optax._src.stacks`); each stack has one group state whose arrays lead with
   the member axis.
2. Draw the update coin and one block of probes per stack from ``fold_in(key(seed),
   count)``, identical on every replica. The first step always fits.
3. On fitting steps only (inside ``lax.cond``): get the curvature pair ``(v, h)`` from the
   curvature source (computing Hessian-vector products there, if asked), set each unit's
   scale from its first usable pair when ``init_scale=None``, and move every ``Q`` one
   normalized step on its group, ``vmap``ped over each stack's members.
4. Return ``P g`` for every leaf, one batched product per stack, in the dtype the gradient
   came in; whitening-type ``P g`` is bounded in RMS per unit (see ``curvature.Whitening``).

A step whose gradients are not all finite returns zeros and leaves the state as it was but
for the count; a non-finite pair, or a move that would make a ``Q`` non-finite, leaves that
``Q`` as it was.
A unit whose ``Q`` has no scale yet (no usable pair so far) takes the gradient's scale, so
its ``P g`` is never the raw gradient. The engine knows groups only through
:class:`~psgd_optax._src.groups.base.Group` and curvature only through its sources.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from psgd_optax._src import curvature as curvature_lib
from psgd_optax._src import options as options_lib
from psgd_optax._src import sharding as sharding_lib
from psgd_optax._src import stacks as stacks_lib
from psgd_optax._src.groups.base import GroupForShape
from psgd_optax._src.normalize import bound_rms
from psgd_optax._src.schedules import update_probability_schedule
from psgd_optax._src.state import PSGDState
from psgd_optax._src.trees import all_finite, check_real, empty_entry, rebuild, value_at
from psgd_optax._src.validation import as_dtype, check_x64

ScalarOrSchedule = options_lib.ScalarOrSchedule


@dataclasses.dataclass(frozen=True)
class _Config:
  group_for_shape: GroupForShape
  source: Any
  damping: curvature_lib.Damping
  update_probability: Any
  precond_lr: Any
  init_scale: Any
  dtype: Any
  seed: Any
  axis_name: Any
  stacked: Any
  place: Callable[[jax.Array], jax.Array]

  def average(self, tree):
    """The mean over the data-parallel axis (identity without one)."""
    return tree if self.axis_name is None else jax.lax.pmean(tree, self.axis_name)


def preconditioner(
    group_for_shape: GroupForShape,
    *,
    curvature: str = "whitening",
    update_probability: ScalarOrSchedule | None = None,
    precond_lr: ScalarOrSchedule | None = None,
    init_scale: float | None = None,
    damping: float | None = None,
    damping_type: str = "relative",
    precond_dtype: Any = "float32",
    seed: int = 0,
    axis_name: Any = None,
    stacked: Any = None,
    preconditioner_sharding: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """A PSGD preconditioner on the groups given by ``group_for_shape``.

  This is the engine behind every family (:func:`psgd_optax.kron`, ...); use it directly
  to plug in a group of your own. It returns the preconditioned gradient ``P g`` (a
  direction, positive sign): chain it with ``optax.scale(-learning_rate)`` or use
  :func:`psgd_optax.optimizers.with_preconditioner`.

  .. math::
    P = Q^\\top Q, \\qquad Q \\leftarrow \\text{one normalized step towards }
    \\arg\\min_Q\\, \\mathbb{E}[h^\\top P h + v^\\top P^{-1} v]

  Args:
    group_for_shape: ``(shape, state_leaves=None) -> Group``: the group of a unit of
      ``shape``; in ``update`` it also gets the flat leaves of one unit's stored state,
      from which it should read its structure.
  {engine_args}
  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
    ``(updates, state, params=None, *, value_fn=None, hvp=None, vector=None,
    **extra_args)``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> tx = psgd.preconditioner(lambda shape, leaves=None: psgd.diag_group(shape))
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> updates, state = tx.update({"w": jnp.array([1e-3, 1.0, 1e3])}, state)
    >>> bool(jnp.all(jnp.abs(updates["w"]) < 2.0))   # P g is whitened
    True
  """
  options_lib.check(
      curvature=curvature, update_probability=update_probability, precond_lr=precond_lr,
      init_scale=init_scale, damping=damping, damping_type=damping_type,
      precond_dtype=precond_dtype, seed=seed, axis_name=axis_name, stacked=stacked,
      preconditioner_sharding=preconditioner_sharding)
  source = curvature_lib.make_curvature(curvature)
  config = _Config(
      group_for_shape=group_for_shape, source=source,
      damping=curvature_lib.make_damping(curvature, damping, damping_type),
      update_probability=(update_probability_schedule() if update_probability is None
                          else update_probability),
      precond_lr=curvature_lib.default_precond_lr(curvature, precond_lr),
      init_scale=init_scale, dtype=jnp.dtype(precond_dtype), seed=seed,
      axis_name=axis_name, stacked=stacked,
      place=sharding_lib.state_layout(preconditioner_sharding))
  # Jitted so that eager callers (notebooks, doctests) compile the lax.cond once rather
  # than on every call; inside a caller's jit it is inlined. value_fn is static (it is a
  # function), so a new closure per eager step recompiles, as any eager JAX code does.
  compiled_update = jax.jit(functools.partial(_update, config),
                            static_argnames=("value_fn",))

  def update_fn(updates, state, params=None, *, value_fn=None, hvp=None, vector=None,
                **extra_args):
    del extra_args  # other transformations' arguments
    source.check_args(params, {"value_fn": value_fn, "hvp": hvp, "vector": vector})
    return compiled_update(updates, state, params, value_fn=value_fn, hvp=hvp,
                           vector=vector)

  return optax.GradientTransformationExtraArgs(functools.partial(_init, config), update_fn)


preconditioner.__doc__ = preconditioner.__doc__.replace("  {engine_args}\n",
                                                        options_lib.ARGS_DOC)


def _init(config: _Config, params) -> PSGDState:
  check_real(params)
  check_x64("precond_dtype", config.dtype)
  plan = stacks_lib.plan_for(params, config.stacked)
  q, scale_set = [], []
  for stack in plan.stacks:
    unit = config.group_for_shape(stack.unit_shape).init(
        1.0 if config.init_scale is None else config.init_scale, config.dtype)
    q.append(jax.tree.map(lambda a, n=stack.size: jnp.broadcast_to(a, (n, *a.shape)), unit))
    scale_set.append(jnp.full((stack.size,), config.init_scale is not None))
  return PSGDState(
      count=jnp.zeros([], jnp.int32),
      preconditioner=tuple(jax.tree.map(config.place, q)) if q else empty_entry(),
      scale_set=tuple(scale_set) if q else empty_entry(),
      curvature=config.source.init(params, config.dtype))


def _read_state(config: _Config, plan: stacks_lib.Plan, state):
  """Each stack's group and stored ``Q`` (in the group's own containers, replicated for
  the math), after checking that the state was built for this plan and these groups."""
  if not plan.stacks:
    return [], []
  stored, flags = state.preconditioner, state.scale_set
  if not (isinstance(stored, (tuple, list)) and isinstance(flags, (tuple, list))
          and len(stored) == len(flags) == len(plan.stacks)):
    entries = f" with {len(stored)} entries" if hasattr(stored, "__len__") else ""
    raise stacks_lib.state_error(
        plan, f"a state.preconditioner of type {type(stored).__name__}{entries}")
  groups, held = [], []
  for index, (stack, q, flag) in enumerate(zip(plan.stacks, stored, flags)):
    leaves = jax.tree.leaves(q)
    member = [jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype) for a in leaves]
    group = config.group_for_shape(stack.unit_shape, member)
    expected = jax.eval_shape(lambda g=group: g.init(1.0, config.dtype))
    if (jax.tree.structure(q) != jax.tree.structure(expected)
        or [np.shape(a) for a in leaves]
        != [(stack.size, *a.shape) for a in jax.tree.leaves(expected)]
        or np.shape(flag) != (stack.size,)):
      raise stacks_lib.state_error(
          plan, f"stack {index} (units of shape {stack.unit_shape}) holding "
          f"{jax.tree.map(np.shape, q)}; this group's state for it is "
          f"{jax.tree.map(lambda a, n=stack.size: (n, *a.shape), expected)}")
    groups.append(group)
    held.append(rebuild(lambda g=group: g.init(1.0, config.dtype),
                        [sharding_lib.replicated(a) for a in leaves]))
  return groups, held


def _update(config: _Config, updates, state, params, *, value_fn, hvp, vector):
  dtype = config.dtype
  leaves, treedef = jax.tree.flatten(updates)
  plan = stacks_lib.plan_for(updates, config.stacked)
  groups, held_q = _read_state(config, plan, state)
  held_set = [jnp.asarray(flag) for flag in state.scale_set] if plan.stacks else []
  memory = rebuild(lambda: config.source.init(updates, dtype),
                   jax.tree.leaves(state.curvature))
  # Sources see the gradients in the params' layout; the group math sees replicated stacks.
  source_grads = [leaf.astype(dtype) for leaf in leaves]
  finite = all_finite(source_grads)
  if config.axis_name is not None:  # one replica's bad gradient stops every replica's fit
    finite = config.average(finite.astype(dtype)) == 1
  # A bad step's gradients are zeroed as they are stacked (the fit does not run then), so
  # its P·g is 0 without a select in every leaf's output.
  grad_stacks = [jnp.where(finite, g, 0) for g in
                 plan.gather([sharding_lib.replicated(g) for g in source_grads])]

  key = jax.random.fold_in(jax.random.key(config.seed), state.count)
  coin_key, probe_key, damping_key = jax.random.split(key, 3)
  probability = as_dtype(value_at(config.update_probability, state.count), jnp.float32)
  fit_now = finite & ((state.count == 0) | (jax.random.uniform(coin_key) < probability))

  def fit(carry):
    held_q, held_set = carry
    # One draw, cut into stacks: one random-bit pipeline in the program, not one per stack.
    sizes = [s.size * math.prod(s.unit_shape) for s in plan.stacks]
    flat = jax.random.normal(probe_key, (sum(sizes),), dtype)
    probes = [part.reshape(s.size, *s.unit_shape) for part, s in
              zip(jnp.split(flat, np.cumsum(sizes)[:-1].tolist()), plan.stacks)]

    def probe_leaves():  # the probes in the params' layout, for sources that need them
      return [jnp.zeros(leaf.shape, dtype) if p is None else sharding_lib.like(p, leaf)
              for p, leaf in zip(plan.scatter(probes), leaves)]

    pair = config.source.pair(probe_leaves, config.average(source_grads), params, treedef,
                              {"value_fn": value_fn, "hvp": hvp, "vector": vector}, memory,
                              dtype)
    replicate = lambda xs: [sharding_lib.replicated(x) for x in xs]
    v_stacks = probes if pair.vectors is None else plan.gather(replicate(pair.vectors))
    h_stacks = (config.average(grad_stacks) if pair.products is None
                else plan.gather(replicate(config.average(pair.products))))
    # The probes are finite and the gradients were checked: only a source's own vectors
    # and products can still be bad.
    pair_ok = all_finite([pair.vectors, pair.products]) & pair.valid
    lr = as_dtype(value_at(config.precond_lr, state.count), dtype)
    fit_unit = functools.partial(_fit_unit, config, pair.integrate_probe,
                                 pair.products is None, lr, pair_ok)
    new_q, new_set = [], []
    for i, (stack, group, q, was_set, v, h, g) in enumerate(
        zip(plan.stacks, groups, held_q, held_set, v_stacks, h_stacks, grad_stacks)):
      keys = (jax.random.split(jax.random.fold_in(damping_key, i), stack.size)
              if config.damping.kind == "nonconvex" else None)
      candidate, replaced, now_set = stacks_lib.per_member(
          functools.partial(fit_unit, group), stack.size)(q, was_set, v, h, g, keys)
      # Selected against the Q held, so the fit's own copies need not stay live to the end.
      new_q.append(jax.tree.map(
          lambda a, b: jnp.where(replaced.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
          candidate, q))
      new_set.append(now_set)
    return new_q, new_set

  held_q, held_set = jax.lax.cond(fit_now, fit, lambda carry: carry, (held_q, held_set))
  bound = config.source.output_rms_bound
  precondition = lambda group, q, g: bound_rms(group.precondition(q, g), bound)
  directions = plan.scatter([
      stacks_lib.per_member(functools.partial(precondition, group), stack.size)(q, g)
      for stack, group, q, g in zip(plan.stacks, groups, held_q, grad_stacks)])
  outputs = [sharding_lib.like(d.astype(leaf.dtype), leaf) if d is not None
             else jnp.zeros_like(leaf) for d, leaf in zip(directions, leaves)]
  new_state = PSGDState(
      # Advanced on every call, so that the probes and the update coin never depend on the
      # data (a count shared by vmapped runs stays unbatched, its lax.cond a branch).
      count=optax.safe_increment(state.count),
      preconditioner=(tuple(jax.tree.map(config.place, held_q)) if plan.stacks
                      else state.preconditioner),
      scale_set=tuple(held_set) if plan.stacks else state.scale_set,
      # A source with memory (secant pairs) keeps the averaged gradients, so the state
      # stays the same on every replica; the others pay no extra all-reduce.
      curvature=config.source.remember(
          memory, config.average(source_grads) if jax.tree.leaves(memory) else source_grads,
          params, treedef, dtype))
  return treedef.unflatten(outputs), new_state


def _fit_unit(config: _Config, integrate_probe, h_is_gradient, lr, pair_ok, group, q,
              was_set, v, h, g, key):
  """One unit's fit: ``(candidate Q, whether it replaces the Q held, scale now set)``."""
  h = config.damping.apply(v, h, key)
  h_scale = _initial_scale(h)  # inf for h = 0
  scale = h_scale if integrate_probe else h_scale * _probe_scale(v)
  from_pair = pair_ok & jnp.isfinite(scale) & (scale > 0)
  usable = pair_ok & (h_scale < jnp.inf) & (was_set | from_pair)
  # Until a usable pair sets it, Q takes the gradient's scale (P g then has about unit
  # RMS): never the raw gradient, whose scale may be anything (e.g. secant's first step).
  # Whitening's h is the (damped) gradient: its scale is reused, one reduction fewer.
  from_gradient = h_scale if h_is_gradient else _initial_scale(g)
  gradient_ok = jnp.isfinite(from_gradient) & (from_gradient > 0)
  start = jnp.where(from_pair, scale, jnp.where(gradient_ok, from_gradient, 1.0))
  # An unset unit's stored state is init at some scale; see Group.init_from_unset.
  init_from_unset = getattr(group, "init_from_unset", None)
  initial = (group.init(start, config.dtype) if init_from_unset is None
             else init_from_unset(q, start))
  q_start = optax.tree.where(was_set, q, initial)
  q_moved = group.update(q_start, v, h, lr, integrate_probe=integrate_probe)
  moved_ok = usable & all_finite(q_moved)
  return (optax.tree.where(moved_ok, q_moved, initial), moved_ok | ~was_set,
          was_set | usable)


def _initial_scale(h: jax.Array) -> jax.Array:
  """``mean(h⁴)^{-1/8}``, which times :func:`_probe_scale` ``(v)`` makes ``P`` match
  ``|v| / |h|`` at once; ``inf`` for ``h = 0``.

  Computed after dividing ``h`` by its largest entry, so gradients of 1e-30 or 1e30 give a
  finite scale in float32; every root is of a positive number, so reverse-mode
  derivatives stay finite.
  """
  peak = jnp.max(jnp.abs(h))
  positive = peak > 0
  safe_peak = jnp.where(positive, peak, 1.0)
  fourth = jnp.mean((h / safe_peak) ** 4)
  scale = jnp.where(positive, fourth, 1.0) ** (-0.125) / jnp.sqrt(safe_peak)
  return jnp.where(positive, scale, jnp.inf)


def _probe_scale(v: jax.Array) -> jax.Array:
  """``mean(v²)^{1/4}`` (0 for ``v = 0``, with a finite derivative there)."""
  second = jnp.mean(v * v)
  return jnp.where(second > 0, second, 1.0) ** 0.25 * (second > 0)
