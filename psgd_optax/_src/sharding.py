"""Where the preconditioner's arrays live when the params are sharded over a mesh.

Three layouts meet in one ``update``:

* **params-shaped arrays** (the incoming gradients, the outgoing directions, curvature
  memory such as the secant's previous params) keep the params' sharding;
* **the group math** (fitting ``Q`` and computing ``P g``) runs on replicated copies of
  the gradient and of the curvature pair, because a factor couples every entry of its axis;
* **the stored preconditioner state** is replicated by default, or laid out by the user's
  ``preconditioner_sharding`` (e.g. the rows of big factors, or a stack of per-layer
  factors, spread over a mesh axis to divide the state's memory); it is gathered for the
  math and put back in that layout at the end of the step.

In JAX's explicit sharding mode (``jax.make_mesh`` axes default to ``AxisType.Explicit``)
shardings are part of the types, so these moves are ``jax.sharding.reshard`` calls and the
layouts are exact. In auto mode the compiler chooses layouts; the state is pinned with
``with_sharding_constraint`` when a mesh is known (a ``jax.set_mesh`` context, or the mesh
of a ``NamedSharding`` given as ``preconditioner_sharding``). Without a mesh (one device,
``pmap``, inside ``shard_map``) every function here is the identity.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def _type_sharding(x):
  """The sharding in ``x``'s type, or ``None`` outside explicit sharding mode."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
    return None
  return sharding


def _is_replicated(spec: PartitionSpec) -> bool:
  return all(axis is None for axis in spec)


def like(x: jax.Array, reference: jax.Array) -> jax.Array:
  """``x`` (same shape as ``reference``) laid out as ``reference`` in explicit mode."""
  target = _type_sharding(reference)
  if target is None:
    return x
  current = _type_sharding(x)
  if current is not None and current.spec == target.spec:
    return x
  return jax.sharding.reshard(x, target.spec)


def replicated(x: jax.Array) -> jax.Array:
  """``x`` replicated on every device of its mesh in explicit mode (identity elsewhere)."""
  current = _type_sharding(x)
  if current is None or _is_replicated(current.spec):
    return x
  return jax.sharding.reshard(x, PartitionSpec())


def _fitted_spec(spec: PartitionSpec, shape, axis_sizes) -> PartitionSpec:
  """``spec`` for an array of ``shape``: its leading entries where the array has those
  axes and they divide evenly; replicated where they do not."""
  entries = []
  for dim, axes in zip(shape, spec):
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    size = 1
    for name in names:
      size *= axis_sizes[name]
    entries.append(axes if names and dim % size == 0 else None)
  return PartitionSpec(*entries)


def check_preconditioner_sharding(value) -> None:
  if value is None or callable(value) or isinstance(value, (PartitionSpec, NamedSharding)):
    return
  raise ValueError(
      "preconditioner_sharding must be None (replicated), a jax.sharding.PartitionSpec, a "
      "jax.sharding.NamedSharding or a callable (shape) -> PartitionSpec | None, got "
      f"{value!r}.")


def state_layout(preconditioner_sharding: Any) -> Callable[[jax.Array], jax.Array]:
  """The function that puts one stored preconditioner array in its layout.

  ``preconditioner_sharding``: ``None`` (replicated), a ``PartitionSpec`` (applied to the
  leading axes of every array, the stack's member axis first; where that axis does not
  divide evenly, to the axes after it; dropped where an axis is missing or does not divide),
  a ``NamedSharding`` (the same with its own mesh) or a callable ``shape -> PartitionSpec |
  None``.
  """
  explicit_mesh = (preconditioner_sharding.mesh
                   if isinstance(preconditioner_sharding, NamedSharding) else None)

  def spec_for(x) -> PartitionSpec:
    value = preconditioner_sharding
    if isinstance(value, NamedSharding):
      value = value.spec
    if callable(value):
      value = value(tuple(x.shape))
    return PartitionSpec() if value is None else value

  def place(x: jax.Array) -> jax.Array:
    current = _type_sharding(x)
    mesh = current.mesh if current is not None else (
        explicit_mesh if explicit_mesh is not None else jax.sharding.get_abstract_mesh())
    if mesh is None or mesh.empty:
      return x
    axis_sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    requested = spec_for(x)
    spec = _fitted_spec(requested, x.shape, axis_sizes)
    if len(requested) and requested[0] is not None and spec[0] is None:
      # The member axis does not divide evenly (a stack of one leaf): the axes after it.
      spec = _fitted_spec(PartitionSpec(None, *requested), x.shape, axis_sizes)
    if current is not None:
      return x if current.spec == spec else jax.sharding.reshard(x, spec)
    if any(t == AxisType.Manual for t in tuple(mesh.axis_types)):
      return x  # inside shard_map: per-device values, nothing to lay out
    target = NamedSharding(explicit_mesh, spec) if explicit_mesh is not None else spec
    return jax.lax.with_sharding_constraint(x, target)

  return place

