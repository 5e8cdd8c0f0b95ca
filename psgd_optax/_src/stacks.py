"""The static plan: which preconditioned units share a stack.

A *unit* is what gets one ``Q``: a leaf, or one layer of a leaf marked ``stacked`` (a
``(L, *s)`` leaf gives ``L`` units of shape ``s``). Units of the same shape have the same
group, so the plan puts every unit of one shape into one *stack*, in params flatten order,
and the engine runs each stack through one ``vmap``ped fit and one batched ``P·g``: a model
of 32 identical blocks traces and compiles the fit once per distinct shape. Stacked layers
and same-shaped leaves are the same mechanism.

The plan depends only on the params' shapes and the ``stacked`` spec; the state holds one
group state per stack, in plan order, every array with a leading member axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Piece:
  """One leaf's members of a stack: ``count`` layers of a stacked leaf, or the leaf (1)."""

  leaf: int
  stacked: bool
  count: int


@dataclasses.dataclass(frozen=True)
class Stack:
  """Units of one shape: their pieces in params flatten order."""

  unit_shape: tuple[int, ...]
  pieces: tuple[Piece, ...]

  @property
  def size(self) -> int:
    """The number of members (units)."""
    return sum(piece.count for piece in self.pieces)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The stacks of a params tree with ``num_leaves`` leaves."""

  stacks: tuple[Stack, ...]
  num_leaves: int

  def gather(self, leaves: Sequence[jax.Array]) -> list[jax.Array]:
    """Per stack, its members' arrays stacked along a new leading axis."""
    stacks = []
    for stack in self.stacks:
      parts = [leaves[p.leaf] if p.stacked else leaves[p.leaf][None] for p in stack.pieces]
      stacks.append(parts[0] if len(parts) == 1 else jnp.concatenate(parts))
    return stacks

  def scatter(self, stacked: Sequence[jax.Array]) -> list[jax.Array | None]:
    """The inverse of :meth:`gather`: per leaf, its members cut out of their stack
    (``None`` for a leaf with no units: zero entries or zero layers)."""
    return self._cut(stacked, lambda take, values: take(values))

  def leaf_states(self, stack_states: Sequence[Any]) -> list[Any]:
    """Per leaf, its units' part of each stack's state (a pytree whose arrays lead with
    the member axis): the layers of a stacked leaf keep a leading layer axis."""
    return self._cut(stack_states, jax.tree.map)

  def _cut(self, per_stack: Sequence[Any], apply: Callable[[Callable, Any], Any]) -> list:
    """Per leaf, ``apply(take, stack's value)`` with ``take`` cutting that leaf's members
    out of an array of the stack (a stack of one leaf is that leaf: nothing to cut)."""
    leaves = [None] * self.num_leaves
    for stack, values in zip(self.stacks, per_stack):
      start = 0
      for piece in stack.pieces:
        if piece.stacked:
          whole = len(stack.pieces) == 1
          take = (lambda a: a) if whole else (lambda a, s=start, c=piece.count: a[s:s + c])
        else:
          take = lambda a, s=start: a[s]
        leaves[piece.leaf] = apply(take, values)
        start += piece.count
    return leaves


def stacked_flags(stacked: Any, tree: Any) -> list[bool]:
  """Per leaf of ``tree`` (flatten order): whether ``stacked`` marks it as a layer stack.

  ``stacked`` is ``None`` (no leaf), a pytree prefix of ``tree`` with booleans, or a
  callable ``(path, leaf) -> bool``.
  """
  if stacked is None:
    return [False] * len(jax.tree.leaves(tree))
  if callable(stacked):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    flags = [bool(stacked(path, leaf)) for path, leaf in flat]
  else:
    flags = jax.tree.leaves(jax.tree.map(
        lambda flag, subtree: jax.tree.map(lambda _: bool(flag), subtree), stacked, tree))
  for flag, leaf in zip(flags, jax.tree.leaves(tree)):
    if flag and len(np.shape(leaf)) < 1:
      raise ValueError(f"stacked marks a leaf of shape {tuple(np.shape(leaf))}; a stacked "
                       "leaf needs a leading layer axis.")
  return flags


def check_stacked_spec(stacked: Any) -> None:
  if stacked is None or callable(stacked):
    return
  bad = [flag for flag in jax.tree.leaves(stacked) if not isinstance(flag, (bool, np.bool_))]
  if bad:
    raise ValueError("stacked must be None, a callable (path, leaf) -> bool or a pytree of "
                     f"booleans, got {stacked!r}.")


def make_plan(shapes: Sequence[tuple[int, ...]], flags: Sequence[bool]) -> Plan:
  """Groups the units of leaves with ``shapes`` (``flags``: which lead with a layer axis)
  by unit shape, stacks in order of first appearance."""
  by_shape: dict[tuple[int, ...], list[Piece]] = {}
  for index, (shape, is_stacked) in enumerate(zip(shapes, flags)):
    shape = tuple(int(n) for n in shape)
    unit = shape[1:] if is_stacked else shape
    count = shape[0] if is_stacked else 1
    if count and math.prod(unit):  # zero layers or zero entries: nothing to precondition
      by_shape.setdefault(unit, []).append(Piece(index, bool(is_stacked), count))
  return Plan(tuple(Stack(unit, tuple(pieces)) for unit, pieces in by_shape.items()),
              len(shapes))


def plan_for(tree: Any, stacked: Any) -> Plan:
  """The plan of a params-shaped ``tree`` (arrays or ``ShapeDtypeStruct``s)."""
  leaves = jax.tree.leaves(tree)
  return make_plan([np.shape(leaf) for leaf in leaves], stacked_flags(stacked, tree))


def per_member(fn: Callable[..., Any], size: int) -> Callable[..., Any]:
  """``fn`` over the leading member axis of its arguments and results: ``vmap``ped, or for
  a stack of one member called on that member alone (the unbatched program)."""
  if size > 1:
    return jax.vmap(fn)

  def single(*args):
    result = fn(*jax.tree.map(lambda a: a[0], args))
    return jax.tree.map(lambda a: a[None], result)

  return single


def state_error(plan: Plan, found: str) -> ValueError:
  """The one error for a state that does not fit the params' plan."""
  shapes = [(stack.unit_shape, stack.size) for stack in plan.stacks]
  return ValueError(
      f"This PSGD state does not fit these params and options: found {found}. The params "
      f"need {len(shapes)} stacks of (unit shape, members) {shapes}. Was the state built "
      "for other params, with other options (group, geometry, stacked), or by psgd_optax "
      "0.1 (whose state was a dict keyed 'leaves_…')? Build it with this transformation's "
      "init.")


def preconditioner_per_leaf(state, params, *, stacked: Any = None) -> Any:
  """Each leaf's preconditioner state, cut out of its stack.

  Args:
    state: a :class:`PSGDState` (the preconditioner's own state, not a chain's).
    params: the params (or gradients) the state was built for; only their shapes are used.
    stacked: the ``stacked`` spec the transformation was built with (a stacked leaf's
      state keeps its leading layer axis).

  Returns:
    A tree with the structure of ``params`` whose entries are the leaves' group states
    (``None`` for a leaf with no entries).

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> params = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((3, 4)), "c": jnp.zeros(5)}
    >>> state = psgd.kron().init(params)
    >>> [f.shape for f in state.preconditioner[0].factors]  # a and b share a stack
    [(2, 3, 3), (2, 4, 4)]
    >>> per_leaf = psgd.preconditioner_per_leaf(state, params)
    >>> [f.shape for f in per_leaf["b"].factors]
    [(3, 3), (4, 4)]
  """
  return _per_leaf(state.preconditioner, params, stacked)


def scale_set_per_leaf(state, params, *, stacked: Any = None) -> Any:
  """``state.scale_set`` as a params-shaped tree of booleans (one per layer of a stacked
  leaf): whether each ``Q`` has had its scale set from data or ``init_scale``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    >>> tx = psgd.kron()
    >>> state = tx.init(params)
    >>> bool(psgd.scale_set_per_leaf(state, params)["w"])   # no pair seen yet
    False
    >>> _, state = tx.update({"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, state)
    >>> bool(psgd.scale_set_per_leaf(state, params)["w"])
    True
  """
  return _per_leaf(state.scale_set, params, stacked)


def _per_leaf(stack_values, params, stacked):
  plan = plan_for(params, stacked)
  fits = isinstance(stack_values, (tuple, list)) and len(stack_values) == len(plan.stacks)
  if plan.stacks and (not fits or any(
      np.shape(a)[:1] != (stack.size,)
      for stack, values in zip(plan.stacks, stack_values) for a in jax.tree.leaves(values))):
    raise state_error(plan, f"{jax.tree.map(np.shape, stack_values)} (pass the stacked "
                       "spec the transformation was built with)")
  values = plan.leaf_states(stack_values) if plan.stacks else [None] * plan.num_leaves
  return jax.tree.structure(params).unflatten(values)
