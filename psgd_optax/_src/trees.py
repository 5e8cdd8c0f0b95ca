"""Small helpers shared by the engine, the curvature sources and the first-order
transformations."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def value_at(schedule_or_value, count):
  """A hyperparameter at step ``count``: a schedule is called, a number is returned."""
  return schedule_or_value(count) if callable(schedule_or_value) else schedule_or_value


def all_finite(tree) -> jax.Array:
  """One boolean: every element of every leaf is finite (``True`` for an empty tree)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def rebuild(make_state, state_leaves):
  """The state ``make_state()`` would build, holding the given leaves: frameworks such as
  flax.nnx hand NamedTuple states back in their own containers."""
  structure = jax.tree.structure(jax.eval_shape(make_state))
  return jax.tree.unflatten(structure, state_leaves)


def gather(column, indices):
  """One bucket's entries of a per-leaf list: the leaf itself, or a stack of them."""
  if len(indices) == 1:
    return column[indices[0]]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[column[i] for i in indices])


def scatter(values, buckets, count):
  """The inverse of ``gather`` over all buckets: back to a per-leaf list."""
  leaves = [None] * count
  for value, indices in zip(values, buckets):
    if len(indices) == 1:
      leaves[indices[0]] = value
      continue
    for position, i in enumerate(indices):
      leaves[i] = jax.tree.map(lambda x, position=position: x[position], value)
  return leaves
