"""Small pytree helpers shared by the engine, the curvature sources and the first-order
transformations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def value_at(schedule_or_value, count):
  """A hyperparameter at step ``count``: a schedule is called, a number is returned."""
  return schedule_or_value(count) if callable(schedule_or_value) else schedule_or_value


# Elements per packed check in all_finite: the temporary it may cost (64 MiB in float32).
_PACK_SIZE = 1 << 24


def all_finite(tree) -> jax.Array:
  """One boolean: every element of every leaf is finite (``True`` for an empty tree).

  Small leaves are checked together, raveled into chunks of at most ``_PACK_SIZE``
  elements: one reduction per chunk rather than per leaf. A model's many biases and norm
  scales otherwise each cost the compiler a kernel of its own (on a small GPT the per-leaf
  checks were a third of the optimizer's compile time); the chunk bounds the temporary.
  Leaves split over a mesh axis (explicit sharding) are checked on their own.
  """
  chunks, current, filled = [], [], 0
  for leaf in jax.tree.leaves(tree):
    size = int(np.size(leaf))
    if size >= _PACK_SIZE or _explicitly_sharded(leaf):  # checked on its own
      chunks.append(leaf)
      continue
    if filled + size > _PACK_SIZE:
      chunks.append(current)
      current, filled = [], 0
    current.append(leaf)
    filled += size
  if current:
    chunks.append(current)
  flags = [jnp.all(jnp.isfinite(_packed(chunk) if isinstance(chunk, list) else chunk))
           for chunk in chunks]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def _packed(leaves) -> jax.Array:
  """The leaves raveled into one vector of their common dtype."""
  dtype = jnp.result_type(*leaves)
  return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])


def _explicitly_sharded(x) -> bool:
  """Whether ``x`` is split over a mesh axis in JAX's explicit-sharding mode, where a
  ravel would need an output sharding (``jnp.all`` of it needs none)."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec is not None and any(axis is not None for axis in spec)


def rebuild(make_state, state_leaves):
  """The state ``make_state()`` would build, holding the given leaves: frameworks such as
  flax.nnx hand NamedTuple states back in their own containers."""
  structure = jax.tree.structure(jax.eval_shape(make_state))
  return jax.tree.unflatten(structure, state_leaves)


def empty_entry() -> jax.Array:
  """What a state stores, in place of per-leaf entries that are not params-shaped, for a
  params tree with no leaves: a scalar, not ``()``. ``optax.tree.map_params`` calls
  ``init`` on a placeholder tree with no leaves and maps over the states' common prefix,
  so such an entry must be one leaf there for the real state's entries to fall under it
  (and stay untouched, as the non-params state they are)."""
  return jnp.zeros([], jnp.int8)


def check_real(params) -> None:
  """Raises ``ValueError`` for a complex leaf: the preconditioners are fitted on real
  Lie groups (``P = QᵀQ``), and casting would drop the imaginary part silently."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
      raise ValueError(
          f"psgd_optax preconditioners take real parameters; the leaf at "
          f"{jax.tree_util.keystr(path) or 'the root'} is {jnp.dtype(dtype).name}. Keep "
          "complex parameters as real pairs (e.g. jnp.stack([z.real, z.imag])) and "
          "rebuild z = x[0] + 1j * x[1] in the model.")
