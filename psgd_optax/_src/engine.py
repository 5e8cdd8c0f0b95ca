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

import functools
import numbers
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from psgd_optax._src import curvature as curvature_lib
from psgd_optax._src import sharding as sharding_lib
from psgd_optax._src.groups.base import GroupForShape
from psgd_optax._src.schedules import update_probability_schedule
from psgd_optax._src.trees import all_finite, gather, rebuild, scatter, value_at
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


def _select_leading(flag: jax.Array, new, old):
  """``where(flag, new, old)`` over a state whose arrays lead with ``flag``'s axes (a
  bucket's or a stacked leaf's, or none)."""
  def select(a, b):
    return jnp.where(flag.reshape(flag.shape + (1,) * (a.ndim - flag.ndim)), a, b)
  return jax.tree.map(select, new, old)


STATE_LAYOUTS = ("per_leaf", "per_bucket")
_BUCKET_PREFIX = "leaves"


def bucket_dict(values, buckets) -> dict:
  """Per-bucket state entries keyed by their leaf indices: ``{"leaves_0_2_4": ...}``."""
  return {"_".join([_BUCKET_PREFIX, *map(str, indices)]): value
          for value, indices in zip(values, buckets)}


def _bucket_keys(entries) -> list:
  """A per-bucket entry's keys ordered by first leaf, the order buckets_of makes buckets in
  (a dict handed back by jax or nnx may hold them in another order)."""
  for key in entries:
    prefix, *numbers = str(key).split("_")
    if prefix != _BUCKET_PREFIX or not numbers or not all(n.isdigit() for n in numbers):
      raise ValueError(f"state_layout='per_bucket' state has an entry {key!r}; expected keys "
                       "like 'leaves_0_2_4'. Was the state built with another state_layout?")
  return sorted(entries, key=lambda key: int(str(key).split("_")[1]))


def bucket_indices(entries, count: int) -> list[list[int]]:
  """The buckets (leaf indices) of a per-bucket state entry, in ``bucket_values`` order."""
  buckets = [[int(n) for n in str(key).split("_")[1:]] for key in _bucket_keys(entries)]
  if sorted(i for indices in buckets for i in indices) != list(range(count)):
    raise ValueError(f"The per-bucket state covers leaves {buckets}, but the updates have "
                     f"{count} leaves: the state was built for other params.")
  return buckets


def bucket_values(entries) -> list:
  return [entries[key] for key in _bucket_keys(entries)]


def preconditioner_per_leaf(state: PSGDState, params) -> Any:
  """``state.preconditioner`` as a params-shaped tree of per-leaf group states.

  For a ``state_layout="per_bucket"`` state, each leaf's state is cut out of its bucket's
  stack; a ``"per_leaf"`` state is returned as it is.

  Args:
    state: a :class:`PSGDState` (the preconditioner's own state, not a chain's).
    params: the params (or gradients) the state was built for; only their structure is used.

  Returns:
    A tree with the structure of ``params`` whose entries are the leaves' group states.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> params = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((3, 4)), "c": jnp.zeros(5)}
    >>> state = psgd.kron(state_layout="per_bucket").init(params)
    >>> sorted(state.preconditioner)   # leaves 0 and 1 share a bucket
    ['leaves_0_1', 'leaves_2']
    >>> per_leaf = psgd.preconditioner_per_leaf(state, params)
    >>> [f.shape for f in per_leaf["b"].factors]
    [(3, 3), (4, 4)]
  """
  return entries_per_leaf(state.preconditioner, params)


def entries_per_leaf(entries, params) -> Any:
  """A per-bucket state field (``preconditioner`` or ``scale_set``) as a params-shaped tree;
  a per-leaf field is returned as it is."""
  leaves, treedef = jax.tree.flatten(params)
  if not isinstance(entries, dict) or not all(str(key).startswith(_BUCKET_PREFIX + "_")
                                              for key in entries):
    return entries
  return treedef.unflatten(scatter(bucket_values(entries), bucket_indices(entries, len(leaves)),
                                   len(leaves)))


def check_stacked_spec(stacked) -> None:
  if stacked is None or callable(stacked):
    return
  bad = [flag for flag in jax.tree.leaves(stacked) if not isinstance(flag, (bool, np.bool_))]
  if bad:
    raise ValueError("stacked must be None, a callable (path, leaf) -> bool or a pytree of "
                     f"booleans, got {stacked!r}.")


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
    stacked: which leaves carry a leading layer axis (``nnx.scan``/``lax.scan`` models):
      ``None`` (none), a pytree prefix of the params with booleans, or a callable
      ``(path, leaf) -> bool``. A stacked leaf of shape ``(L, *s)`` gets ``L`` independent
      preconditioners of shape ``s`` (own factors, initial scale and fit), equal to ``L``
      separate leaves; its state has the leading ``L`` axis. With
      ``optax.inject_hyperparams`` pass it in ``static_args``.
    preconditioner_sharding: layout of the stored preconditioner state on a mesh (params
      sharded with ``jax.jit`` and ``NamedSharding``): ``None`` keeps every factor
      replicated; a ``jax.sharding.PartitionSpec`` such as ``P("x")`` shards the leading
      axes of each state array where they divide evenly (the rows of big factors, the layer
      axis of stacked factors), dividing the state's memory over the devices; a
      ``NamedSharding`` does the same on its own mesh; a callable ``shape ->
      PartitionSpec | None`` decides per array. The factors are gathered for the step's
      math and stored back in this layout. Params-shaped state keeps the params' sharding
      and the output has the incoming updates' sharding. With ``optax.inject_hyperparams``
      pass a callable in ``static_args``.
    bucketing: run leaves of the same shape and group structure as one stack through one
      ``vmap``ped fit, so a model of many identical blocks traces (and compiles) the fit
      once per distinct shape rather than once per leaf. Results are the same as leaf by
      leaf up to the rounding of a batched product against separate ones.
    state_layout: ``"per_bucket"`` (default): ``state.preconditioner`` and
      ``state.scale_set`` are dicts keyed ``"leaves_i_j_..."`` by each bucket's leaf
      indices in params flatten order, holding the bucket's states stacked (with
      ``bucketing=False`` every leaf is a bucket of one);
      :func:`psgd_optax.preconditioner_per_leaf` gives the params-shaped view. A bucket is
      preconditioned as one batched product. ``"per_leaf"``: both are params-shaped, one
      group state per leaf, and each leaf is preconditioned on its own; a fitting step
      then stacks each bucket's states inside the fit and cuts each leaf's state out after
      it, and on XLA each cut is its own kernel to compile, so 32 identical blocks compile
      in 1.7–2.0× the time of 4 against 1.2–1.6× per bucket (``benchmarks/scale.py``).
      ``flax.nnx.Optimizer`` also hands a per-leaf state's group NamedTuples back as its own
      containers, so a jitted nnx step compiles twice; a per-bucket state keeps its
      structure. Same states in both layouts (bit for bit on CPU in the tests); updates
      equal up to the rounding of a batched product against separate ones.
    bucket_batch_size: how many of a bucket's leaves are computed at once. ``None``
      (default): the whole bucket as one batched (``vmap``) product. An int ``k``: a loop
      (``lax.map``) over the bucket, ``k`` leaves per trip, still traced and compiled once.
      Smaller ``k`` keeps fewer leaves' working arrays live at once, but the loop holds the
      bucket's stacked inputs and outputs besides, so it need not lower the peak: the MLP
      step of ``benchmarks/scale.py --versus`` (four 512×512 leaves in one bucket) has
      38.2 MB of XLA temporaries at ``k = 1`` against 29.5 MB vmapped, and on CPU runs
      1.2× slower. On an H100 the loop was the faster layout at update probability 0.1
      (``BENCHMARKS.md``). With ``optax.inject_hyperparams`` pass it in ``static_args``.
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
    stacked: Any = None,
    preconditioner_sharding: Any = None,
    bucketing: bool = True,
    state_layout: str = "per_bucket",
    bucket_batch_size: int | None = None,
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
    >>> [q.shape for q in state.preconditioner["leaves_0"].factors]  # the one leaf's bucket
    [(50,), (8, 8)]
  """
  check_engine_options(curvature=curvature, update_probability=update_probability,
                       precond_lr=precond_lr, init_scale=init_scale, damping=damping,
                       damping_type=damping_type, precond_dtype=precond_dtype, seed=seed,
                       axis_name=axis_name)
  check_stacked_spec(stacked)
  sharding_lib.check_preconditioner_sharding(preconditioner_sharding)
  place = sharding_lib.state_layout(preconditioner_sharding)
  if not isinstance(bucketing, bool):
    raise ValueError(f"bucketing must be a bool, got {bucketing!r}.")
  if state_layout not in STATE_LAYOUTS:
    raise ValueError(f"state_layout must be one of {STATE_LAYOUTS}, got {state_layout!r}.")
  per_bucket = state_layout == "per_bucket"
  if bucket_batch_size is not None and (isinstance(bucket_batch_size, bool) or not isinstance(
      bucket_batch_size, numbers.Integral) or bucket_batch_size < 1):
    raise ValueError("bucket_batch_size must be None or an int ≥ 1 (it is structural: with "
                     f"optax.inject_hyperparams pass it in static_args), got "
                     f"{bucket_batch_size!r}.")
  if update_probability is None:
    update_probability = update_probability_schedule()
  source = curvature_lib.make_curvature(curvature, damping, damping_type)
  dtype = jnp.dtype(precond_dtype)

  def average(tree):
    """The mean over the data-parallel axis (identity without one)."""
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

  def stacked_flags(tree) -> list[bool]:
    """Per leaf of ``tree`` (flattened order): whether it carries a layer axis."""
    if stacked is None:
      return [False] * len(jax.tree.leaves(tree))
    if callable(stacked):
      flat = jax.tree_util.tree_flatten_with_path(tree)[0]
      flags = [bool(stacked(path, leaf)) for path, leaf in flat]
    else:
      flags = jax.tree.leaves(jax.tree.map(
          lambda flag, subtree: jax.tree.map(lambda _: bool(flag), subtree), stacked, tree))
    for flag, leaf in zip(flags, jax.tree.leaves(tree)):
      if flag and len(leaf.shape) < 1:
        raise ValueError(f"stacked marks a leaf of shape {tuple(leaf.shape)}; a stacked "
                         "leaf needs a leading layer axis.")
    return flags

  def per_layer(fn, is_stacked, in_axes=0):
    """``fn`` over the layer axis of a stacked leaf; ``fn`` itself otherwise."""
    return jax.vmap(fn, in_axes=in_axes) if is_stacked else fn

  def buckets_of(groups, flags, *columns) -> list[list[int]]:
    """Leaf indices grouped into buckets: with bucketing, leaves with equal group, layer
    flag and state/argument shapes share one; otherwise every leaf is its own."""
    buckets = {}
    for i, group in enumerate(groups):
      args = [column[i] for column in columns]
      try:
        hash(group)
        group_key = group
      except TypeError:  # a group that is not hashable is a bucket of its own
        group_key = id(group)
      signature = tuple((tuple(a.shape), jnp.dtype(a.dtype)) for a in jax.tree.leaves(args))
      key = (group_key, flags[i], jax.tree.structure(args), signature) if bucketing else i
      buckets.setdefault(key, []).append(i)
    return list(buckets.values())

  def bucket_fn(fn, groups, flags, indices):
    """``fn(group, ...)`` for one bucket: over layers if stacked, over leaves if bucketed."""
    leaf_fn = per_layer(functools.partial(fn, groups[indices[0]]), flags[indices[0]])
    if len(indices) == 1:
      return leaf_fn
    if bucket_batch_size is None or bucket_batch_size >= len(indices):
      return jax.vmap(leaf_fn)
    # A loop over the bucket still traces and compiles fn once; each trip runs unbatched
    # (batch_size=1) or a vmapped slice, and only its temporaries are live at a time.
    batch_size = None if bucket_batch_size == 1 else int(bucket_batch_size)
    return lambda *args: jax.lax.map(lambda leaf_args: leaf_fn(*leaf_args), args,
                                     batch_size=batch_size)

  def init_fn(params):
    def init_leaf(leaf, is_stacked):
      shape = tuple(leaf.shape)
      layers, shape = (shape[0], shape[1:]) if is_stacked else (None, shape)
      group = group_for_shape(shape)
      scale = 1.0 if init_scale is None else init_scale
      q = group.init(scale, dtype)
      scale_set = jnp.asarray(init_scale is not None)
      if is_stacked:
        q = jax.tree.map(lambda a: jnp.broadcast_to(a, (layers, *a.shape)), q)
        scale_set = jnp.broadcast_to(scale_set, (layers,))
      return q, scale_set

    leaves, treedef = jax.tree.flatten(params)
    flags = stacked_flags(params)
    built = [init_leaf(leaf, flag) for leaf, flag in zip(leaves, flags)]
    q_leaves, set_leaves = [q for q, _ in built], [scale_set for _, scale_set in built]
    if per_bucket:
      groups = [group_for_shape(tuple(leaf.shape)[1 if flag else 0:])
                for leaf, flag in zip(leaves, flags)]
      # The same grouping update_fn's per-leaf layout uses (gradients arrive in dtype).
      grad_specs = [jax.ShapeDtypeStruct(leaf.shape, dtype) for leaf in leaves]
      buckets = buckets_of(groups, flags, q_leaves, set_leaves, grad_specs)
      preconditioner = bucket_dict([gather(q_leaves, indices) for indices in buckets], buckets)
      scale_set = bucket_dict([gather(set_leaves, indices) for indices in buckets], buckets)
    else:
      preconditioner, scale_set = treedef.unflatten(q_leaves), treedef.unflatten(set_leaves)
    return PSGDState(
        count=jnp.zeros([], jnp.int32),
        preconditioner=jax.tree.map(place, preconditioner),
        scale_set=scale_set,
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
    # Curvature sources see the gradients in the params' layout; the group math sees
    # replicated copies (see _src/sharding.py; both are the same off a mesh).
    source_grads = [leaf.astype(dtype) for leaf in leaves]
    grads = [sharding_lib.replicated(g) for g in source_grads]
    # Each group's structure is read from its state's leaves (so structural options that
    # inject_hyperparams traces are only used in init), and the state is rebuilt in the
    # group's own containers: frameworks such as flax.nnx hand states back re-containered.
    flags = stacked_flags(updates)
    # A stacked leaf's group is that of one layer, read from one layer's state; a bucket's
    # stored stack is read as one member's state. (Structure is the same, arrays longer.)
    unstacked = lambda q, is_stacked: ([jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in q]
                                       if is_stacked else q)
    # Stored arrays back in the group's own containers (stacked or not: same structure).
    restore = lambda group, q: rebuild(lambda: group.init(1.0, dtype),
                                       [sharding_lib.replicated(a) for a in q])
    if per_bucket:
      buckets = bucket_indices(state.preconditioner, len(leaves))
      stored = [jax.tree.leaves(q) for q in bucket_values(state.preconditioner)]
      groups = [None] * len(leaves)
      for indices, q in zip(buckets, stored):
        member = unstacked(q, len(indices) > 1)
        for i in indices:
          groups[i] = group_for_shape(tuple(leaves[i].shape)[1 if flags[i] else 0:],
                                      unstacked(member, flags[i]))
      q_buckets = [restore(groups[indices[0]], q) for indices, q in zip(buckets, stored)]
      set_buckets = bucket_values(state.scale_set)
    else:
      stored = [jax.tree.leaves(q) for q in treedef.flatten_up_to(state.preconditioner)]
      groups = [group_for_shape(tuple(leaf.shape)[1 if flag else 0:], unstacked(q, flag))
                for leaf, q, flag in zip(leaves, stored, flags)]
      q_leaves = [restore(group, q) for group, q in zip(groups, stored)]
      set_leaves = treedef.flatten_up_to(state.scale_set)
      buckets = buckets_of(groups, flags, q_leaves, set_leaves, grads)
    memory = rebuild(lambda: source.init(updates, dtype), jax.tree.leaves(state.curvature))

    key = jax.random.fold_in(jax.random.key(seed), state.count)
    coin_key, probe_key = jax.random.split(key)
    probability = value_at(update_probability, state.count)
    fit_now = (state.count == 0) | (jax.random.uniform(coin_key) < probability)
    lr = jnp.asarray(value_at(precond_lr, state.count), dtype)

    # A per-bucket state is preconditioned per bucket stack, so its gradients are stacked
    # once, here, for the fit and the preconditioning alike; a per-leaf state is
    # preconditioned leaf by leaf, so its gradients are stacked on fitting steps only.
    stacked_grads = ([gather(grads, indices) for indices in buckets] if per_bucket
                     else None)

    def fit(carry):
      held_q, held_set = carry
      if per_bucket:
        q_old, scale_set = held_q, held_set
      else:  # stacked inside the fit, so that a step that does not fit copies nothing
        q_old = [gather(held_q, indices) for indices in buckets]
        scale_set = [gather(held_set, indices) for indices in buckets]
      grad_buckets = (stacked_grads if per_bucket
                      else [gather(grads, indices) for indices in buckets])
      pair = source.pair(probe_key, average(source_grads), params, treedef, dtype,
                         curvature_args, memory, buckets=buckets)
      vectors = [sharding_lib.replicated(v) for v in pair.vectors]
      v_buckets = [gather(vectors, indices) for indices in buckets]
      if pair.products is None:
        # h is the gradient: the bucket stacks already made, not a second copy of each.
        h_buckets = average(grad_buckets)
      else:
        products = [sharding_lib.replicated(h) for h in average(pair.products)]
        h_buckets = [gather(products, indices) for indices in buckets]
      # Checked per bucket stack, not per leaf: one reduction per distinct shape. Averaged
      # products are non-finite on every replica at once; a gradient may be non-finite on
      # one replica only, so its flag is shared.
      grads_finite = all_finite(grad_buckets)
      if axis_name is not None:
        grads_finite = average(grads_finite.astype(dtype)) == 1
      finite = grads_finite & all_finite([v_buckets, h_buckets]) & pair.valid
      # "nonconvex" damping adds an independent probe v′, drawn per bucket stack.
      damping_key = jax.random.fold_in(probe_key, 1 << 20)
      independent = [jax.random.normal(jax.random.fold_in(damping_key, number), h.shape, dtype)
                     if source.damping.kind == "nonconvex" else None
                     for number, h in enumerate(h_buckets)]

      def fit_leaf(group, q, was_set, v, h, v_independent):
        h = source.damping.leaf(v, h, v_independent)
        scale = _initial_scale(v, h, pair.integrate_probe)
        scale_ok = jnp.isfinite(scale) & (scale > 0)
        usable = finite & jnp.any(h != 0) & (was_set | scale_ok)
        safe_scale = jnp.where(scale_ok, scale, 1.0)
        # An unset leaf's stored state is init(1.0), by init_fn; see Group.init_from_unit.
        init_from_unit = getattr(group, "init_from_unit", None)
        initial = (group.init(safe_scale, dtype) if init_from_unit is None
                   else init_from_unit(q, safe_scale))
        q_start = optax.tree.where(was_set, q, initial)
        q_moved = group.update(q_start, v, h, lr, integrate_probe=pair.integrate_probe)
        moved_ok = usable & all_finite(q_moved)
        # Q is replaced by the moved state or, on a first usable fit whose move was not
        # finite, by the initial one. The caller selects against the Q it holds, so the
        # fit's own copy (a per-leaf state's stack) need not stay live to the end.
        replaced = moved_ok | (usable & ~was_set)
        return optax.tree.where(moved_ok, q_moved, initial), replaced, was_set | usable

      fitted = [bucket_fn(fit_leaf, groups, flags, indices)(q, was_set, v, h, v_independent)
                for indices, q, was_set, v, h, v_independent
                in zip(buckets, q_old, scale_set, v_buckets, h_buckets, independent)]
      candidates, replaced, set_new = (list(column) for column in zip(*fitted))
      if not per_bucket:  # back to the layout of the Q held
        candidates, replaced, set_new = (scatter(column, buckets, len(leaves))
                                         for column in (candidates, replaced, set_new))
      return [_select_leading(flag, new, old)
              for flag, new, old in zip(replaced, candidates, held_q)], set_new

    # Per bucket stack or per leaf, in the layout of the state.
    held_q, held_set = jax.lax.cond(
        fit_now, fit, lambda carry: carry,
        (q_buckets, set_buckets) if per_bucket else (q_leaves, set_leaves))
    if per_bucket:
      # Preconditioned per bucket stack: cutting each leaf's Q out of its stack would be a
      # kernel per leaf and factor; this way only each leaf's direction is cut.
      precondition = lambda group, q, g: group.precondition(q, g)
      directions = scatter([bucket_fn(precondition, groups, flags, indices)(q, g)
                            for indices, q, g in zip(buckets, held_q, stacked_grads)],
                           buckets, len(leaves))
    else:
      # Preconditioned leaf by leaf: the products are few to trace, and on CPU a batched
      # (vmapped) product of a bucket ran slower than its separate products.
      directions = [per_layer(group.precondition, flag)(q, g)
                    for group, flag, q, g in zip(groups, flags, held_q, grads)]
    preconditioned = [sharding_lib.like(direction.astype(leaf.dtype), leaf)
                      for direction, leaf in zip(directions, leaves)]
    if per_bucket:
      preconditioner = bucket_dict(held_q, buckets)
      scale_set = bucket_dict(held_set, buckets)
    else:
      preconditioner = treedef.unflatten(held_q)
      scale_set = treedef.unflatten(held_set)
    new_state = PSGDState(
        count=optax.safe_increment(state.count),
        preconditioner=jax.tree.map(place, preconditioner),
        scale_set=scale_set,
        # A source with memory (secant pairs) keeps the averaged gradients, so the state
        # stays the same on every replica; the others pay no extra all-reduce.
        curvature=source.remember(
            memory, average(source_grads) if jax.tree.leaves(memory) else source_grads,
            params, treedef, dtype),
    )
    return treedef.unflatten(preconditioned), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


preconditioner.__doc__ = preconditioner.__doc__.replace("  {engine_args}\n",
                                                        ENGINE_ARGS_DOC + "\n")
