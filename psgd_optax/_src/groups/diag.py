r"""The diagonal group: ``Q = diag(d)`` with ``d > 0`` of the leaf's size.

The cheapest PSGD preconditioner (``O(n)`` memory and work). For whitening pairs
``P → diag(E[g²])^{-1/2}`` (an Adam-like scaling with a fitted, not averaged, estimate);
for Newton pairs ``P`` fits ``|H|⁻¹`` on the diagonal group.
"""

from __future__ import annotations

from psgd_optax._src.family import preconditioner_family
from psgd_optax._src.groups.kron import (GEOMETRY_ARGS_DOC, GEOMETRY_OPTIONS, KronGroup,
                                         check_group_options, flat_group,
                                         flat_group_for_options)


def diag_group(shape, *, geometry="q0.5eq1.5", lipschitz_decay=0.9) -> KronGroup:
  """The diagonal group over a leaf of ``shape``."""
  return flat_group("diagonal", shape, geometry=geometry, lipschitz_decay=lipschitz_decay)


diag = preconditioner_family(
    "diag", __name__, GEOMETRY_OPTIONS, flat_group_for_options("diagonal"),
    check_group_options,
    r"""PSGD with a diagonal preconditioner per leaf.

  .. math::
    d \leftarrow d - \frac{\mu}{L}\big((P h)^2 - v^2\big)\, d, \qquad
    P = \mathrm{diag}(d)^2,\quad L \approx \max\big((Ph)^2 + v^2\big).

  Args:
""" + GEOMETRY_ARGS_DOC + """
{engine_args}

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
""")
