"""The state every PSGD preconditioner keeps (the engine's; the groups' own states are in
their modules)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class PSGDState(NamedTuple):
  """State of a PSGD preconditioner; its structure depends only on the params' shapes,
  the ``stacked`` spec and the group options.

  Attributes:
    count: number of ``update`` calls so far (int32); the probes and the update coin
      derive from it and ``seed``.
    preconditioner: one group state per stack of same-shaped units, in plan order (see
      :mod:`psgd_optax._src.stacks`), in ``precond_dtype``; every array leads with the
      stack's member axis. :func:`psgd_optax.preconditioner_per_leaf` cuts out each leaf's.
    scale_set: per stack, a boolean per member: whether that unit's ``Q`` has had its
      scale set (from ``init_scale`` or from its first usable curvature pair).
    curvature: what the curvature source remembers between steps: ``()`` for
      whitening, Newton and finite differences; for ``"secant"`` a
      ``SecantMemory(params, grads, has_previous)`` of the last finite step.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> state = psgd.kron().init({"b": jnp.zeros(4), "w": jnp.zeros((4, 3))})
    >>> type(state).__name__, int(state.count), len(state.preconditioner)  # two stacks
    ('PSGDState', 0, 2)
  """

  count: jax.Array
  preconditioner: Any
  scale_set: Any
  curvature: Any = ()
