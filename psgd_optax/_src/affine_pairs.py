"""Presents each ``kernel``/``bias`` pair of a params tree as one affine matrix ``[kernel; bias]``.

The affine-layer preconditioners (:func:`psgd_optax.scan`, :func:`psgd_optax.scaw`) fit
``Q`` on ``Θ = [W; b]`` of shape ``(in + 1, out)``; Flax keeps ``W`` and ``b`` as separate
leaves. This wrapper joins them before the inner transformation and splits its output,
so the rest of an ``optax.chain`` never sees the joined layout. A convolution is an affine
map of its input patches, so a kernel ``(*window, in, out)`` is flattened to
``(prod(window)·in, out)`` first (Li 2019 §5.3 treats convolutions this way).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from psgd_optax._src.trees import empty_entry


class AffinePairsState(NamedTuple):
  """State of :func:`affine_pairs`: the inner transformation's state (on joined params).

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
    >>> state = psgd.affine_pairs(psgd.scan()).init(params)
    >>> type(state).__name__, type(state.inner_state).__name__
    ('AffinePairsState', 'PSGDState')
  """

  inner_state: Any


def _key_name(entry):
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return getattr(entry, attribute)
  return entry


def _layer_path(path):
  """The path without trailing ``value`` entries (Flax nnx variables), as names."""
  names = [_key_name(entry) for entry in path]
  while names and names[-1] == "value":
    names.pop()
  return tuple(names)


def _plan(tree, kernel_name, bias_name):
  """``(pairs, others, treedef)``: leaf indices of joined pairs and of the other leaves."""
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [_layer_path(path) for path, _ in with_paths]
  leaves = [leaf for _, leaf in with_paths]
  index = {path: i for i, path in enumerate(paths)}
  pairs = []
  for i, path in enumerate(paths):
    if not path or path[-1] != kernel_name or jnp.ndim(leaves[i]) < 2:
      continue
    j = index.get(path[:-1] + (bias_name,))
    if j is not None and tuple(jnp.shape(leaves[j])) == (jnp.shape(leaves[i])[-1],):
      pairs.append((i, j))
  paired = {i for pair in pairs for i in pair}
  others = [i for i in range(len(leaves)) if i not in paired]
  return pairs, others, treedef


def _join(tree, plan):
  pairs, others, treedef = plan
  leaves = treedef.flatten_up_to(tree)
  joined = [jnp.concatenate([jnp.reshape(leaves[i], (-1, jnp.shape(leaves[i])[-1])),
                             leaves[j][None].astype(leaves[i].dtype)], axis=0)
            for i, j in pairs]
  return {"affine": joined, "other": [leaves[i] for i in others]}


def _split(joined, plan, like):
  pairs, others, treedef = plan
  leaves = list(treedef.flatten_up_to(like))
  for (i, j), theta in zip(pairs, joined["affine"]):
    leaves[i] = jnp.reshape(theta[:-1], jnp.shape(leaves[i]))
    leaves[j] = theta[-1].astype(leaves[j].dtype)
  for i, leaf in zip(others, joined["other"]):
    leaves[i] = leaf
  return treedef.unflatten(leaves)


def affine_pairs(inner: optax.GradientTransformation, *, kernel_name: str = "kernel",
                 bias_name: str = "bias") -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on params where each ``kernel``/``bias`` pair is one ``[kernel; bias]``.

  A leaf named ``kernel_name`` of shape ``(in, out)`` whose sibling ``bias_name`` has
  shape ``(out,)`` becomes one ``(in + 1, out)`` leaf for ``inner`` (the bias is the last
  row, multiplying the constant input 1); a convolution kernel ``(*window, in, out)``
  becomes ``(prod(window)·in + 1, out)``; other leaves pass through unchanged. Updates
  come back in the original structure. The extra arguments ``value_fn``, ``hvp`` and
  ``vector`` are translated to the joined layout; others are forwarded as they are.

  Args:
    inner: the transformation to run on the joined params, e.g. :func:`psgd_optax.scan`.
    kernel_name: the name of weight matrices (Flax: ``"kernel"``).
    bias_name: the name of their biases (Flax: ``"bias"``).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> tx = psgd.affine_pairs(psgd.scan())
    >>> state = tx.init(params)
    >>> [f.shape for f in state.inner_state.preconditioner[0].factors]  # [kernel; bias]
    [(1, 2, 5), (1, 3)]
    >>> updates, state = tx.update({"dense": {"kernel": jnp.ones((4, 3)),
    ...                                       "bias": jnp.ones(3)}}, state, params)
    >>> updates["dense"]["kernel"].shape, updates["dense"]["bias"].shape
    ((4, 3), (3,))
    >>> conv = {"kernel": jnp.ones((3, 3, 2, 8)), "bias": jnp.zeros(8)}  # 3×3 window, 2 → 8
    >>> [f.shape for f in tx.init(conv).inner_state.preconditioner[0].factors]
    [(1, 2, 19), (1, 8)]
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if not jax.tree.leaves(params):  # nothing in the joined layout is params-shaped
      return AffinePairsState(empty_entry())
    plan = _plan(params, kernel_name, bias_name)
    return AffinePairsState(inner.init(_join(params, plan)))

  def update_fn(updates, state, params=None, **extra_args):
    plan = _plan(updates, kernel_name, bias_name)
    joined_params = None if params is None else _join(params, plan)
    value_fn = extra_args.get("value_fn")
    if value_fn is not None:
      extra_args["value_fn"] = lambda joined: value_fn(_split(joined, plan, updates))
    for name in ("hvp", "vector"):
      if extra_args.get(name) is not None:
        extra_args[name] = _join(extra_args[name], plan)
    joined_updates, inner_state = inner.update(_join(updates, plan), state.inner_state,
                                               joined_params, **extra_args)
    return _split(joined_updates, plan, updates), AffinePairsState(inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
