r"""The dense group: one full ``n × n`` factor ``Q`` over the flattened leaf.

``P = QᵀQ`` can represent any SPD matrix, so the fit converges to ``|H|⁻¹`` exactly (Newton)
or to ``C^{-1/2}`` (whitening); it costs ``O(n²)`` memory and ``O(n³)`` per fit, so it suits
small leaves, or a whole small model through ``optax.flatten(psgd.dense())``.
"""

from __future__ import annotations

from psgd_optax._src.family import preconditioner_family
from psgd_optax._src.groups.kron import (GEOMETRY_ARGS_DOC, GEOMETRY_OPTIONS, KronGroup,
                                         check_group_options, flat_group,
                                         flat_group_for_options)


def dense_group(shape, *, geometry="q0.5eq1.5", lipschitz_decay=0.9) -> KronGroup:
  """The dense group over a leaf of ``shape`` (flattened to ``numel``)."""
  return flat_group("dense", shape, geometry=geometry, lipschitz_decay=lipschitz_decay)


dense = preconditioner_family(
    "dense", __name__, GEOMETRY_OPTIONS, flat_group_for_options("dense"),
    check_group_options,
    r"""PSGD with a dense preconditioner ``P = QᵀQ`` over each flattened leaf.

  .. math::
    Q \leftarrow Q - \frac{\mu}{L}\,(P h h^\top P - v v^\top)\,Q \quad
    (\text{default geometry}), \qquad P \to |H|^{-1}\ \text{or}\ C^{-1/2}.

  For a single preconditioner over the whole model, flatten first:
  ``optax.flatten(psgd.dense())`` (with ``curvature="newton"``, ``value_fn`` then receives
  the flat parameter vector; build it with ``jax.flatten_util.ravel_pytree``).

  Args:
""" + GEOMETRY_ARGS_DOC + """
{engine_args}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` returning ``P g``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import psgd_optax as psgd
    >>> hessian = jnp.diag(jnp.array([100.0, 1.0]))
    >>> loss = lambda x: 0.5 * x @ hessian @ x
    >>> x = jnp.array([1.0, 1.0])
    >>> tx = psgd.dense(curvature="newton", update_probability=1.0, precond_lr=0.5)
    >>> state = tx.init(x)
    >>> for _ in range(100):
    ...   direction, state = tx.update(jax.grad(loss)(x), state, x, value_fn=loss)
    ...   x = x - 0.5 * direction
    >>> bool(loss(x) < 1e-8)
    True

  References:
    Li, *Preconditioned stochastic gradient descent*, IEEE TNNLS 2018.
""")
