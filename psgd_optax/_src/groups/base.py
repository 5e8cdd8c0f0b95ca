"""The protocol every Lie group implements; the engine knows groups only through it."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax

QState = Any  # a pytree of arrays


class Group(Protocol):
  """A matrix Lie group for the factor ``Q`` of ``P = QᵀQ`` over one leaf.

  Implementations are small frozen dataclasses built from the leaf's (static) shape.
  """

  def init(self, scale, dtype) -> QState:
    """``Q = scale · I`` (``scale`` may be traced); works on abstract shapes."""

  def precondition(self, q: QState, g: jax.Array) -> jax.Array:
    """``P g = QᵀQ g`` for a leaf-shaped ``g``."""

  def update(self, q: QState, v: jax.Array, h: jax.Array, lr, *,
             integrate_probe: bool) -> QState:
    """One normalized relative-gradient step of ``Q`` towards fitting the pair ``(v, h)``.

    ``integrate_probe`` says the ``vvᵀ`` term may be replaced by its expectation.
    """

  def materialize(self, q: QState) -> jax.Array:
    """The dense ``P`` (``numel × numel``, row-major flattening); for tests and plots."""

  # Optional: ``init_from_unset(q, scale)`` returns ``init(scale, dtype)`` given the state
  # ``q`` of a unit whose scale is not set yet (``init`` at some other scale). The engine
  # starts each unit's first fit from ``init`` at a scale read from the first usable pair,
  # on every fitting step (a select, not a branch); a group whose ``init`` is costly (LRA
  # draws random ``U``, ``V``) implements this so that the engine rescales instead.


# (shape, state_leaves=None) -> Group. ``init`` passes no state; ``update`` passes the
# flat leaves of the leaf's state (jax.tree.leaves order) so that structure (e.g. which
# Kron axes are dense) is read from the state itself, whatever containers hold it.
GroupForShape = Callable[..., Group]
