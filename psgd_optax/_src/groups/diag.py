r"""The diagonal group: ``Q = diag(d)`` with ``d > 0`` of the leaf's size.

The cheapest PSGD preconditioner (``O(n)`` memory and work). For whitening pairs
``P → diag(E[g²])^{-1/2}`` (an Adam-like scaling with a fitted, not averaged, estimate);
for Newton pairs ``P`` fits ``|H|⁻¹`` on the diagonal group.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import optax

from psgd_optax._src import engine
from psgd_optax._src.groups.factors import DiagonalFactor
from psgd_optax._src.groups.geometry import get_geometry
from psgd_optax._src.groups.kron import KronGroup, check_group_options


def diag_group(shape, *, geometry="q0.5eq1.5", lipschitz_decay=0.9) -> KronGroup:
  """The diagonal group over a leaf of ``shape``."""
  return KronGroup(tuple(shape), (DiagonalFactor(math.prod(shape)),),
                   get_geometry(geometry), lipschitz_decay)


def diag(
    *,
    geometry: str = "q0.5eq1.5",
    curvature: str = "whitening",
    update_probability: engine.ScalarOrSchedule | None = None,
    precond_lr: engine.ScalarOrSchedule = 0.1,
    init_scale: float | None = None,
    damping: float | None = None,
    lipschitz_decay: float = 0.9,
    precond_dtype: Any = "float32",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""PSGD with a diagonal preconditioner per leaf.

  .. math::
    d \leftarrow d - \frac{\mu}{L}\big((P h)^2 - v^2\big)\, d, \qquad
    P = \mathrm{diag}(d)^2,\quad L \approx \max\big((Ph)^2 + v^2\big).

  Args:
    geometry: ``"q0.5eq1.5"`` (default), ``"eq"`` or ``"quad"`` (equal to first order).
    curvature: ``"whitening"`` or ``"newton"``.
    update_probability: float or schedule; ``None`` for the default annealing schedule.
    precond_lr: normalized fit step size (float or schedule).
    init_scale: initial scale of ``Q``; ``None`` sets it from the first pair.
    damping: relative damping; ``None`` gives 1e-6 (whitening) or 0 (Newton).
    lipschitz_decay: decay of the step normalizer's estimate.
    precond_dtype: dtype of ``Q`` (default float32).
    seed: seed for probes and the update coin.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` returning ``P g``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> tx = psgd.diag()
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> updates, state = tx.update({"w": jnp.array([1e-3, 1.0, 1e3])}, state)
    >>> updates["w"].dtype
    dtype('float32')

  References:
    Li, *Preconditioned stochastic gradient descent*, IEEE TNNLS 2018.
  """
  check_group_options(geometry, lipschitz_decay)

  def group_for_shape(shape, state_leaves=None):
    del state_leaves  # one factor over the flattened leaf: the shape fixes the structure
    return diag_group(shape, geometry=geometry, lipschitz_decay=lipschitz_decay)

  return engine.preconditioner(
      group_for_shape, curvature=curvature, update_probability=update_probability,
      precond_lr=precond_lr, init_scale=init_scale, damping=damping,
      precond_dtype=precond_dtype, seed=seed)
