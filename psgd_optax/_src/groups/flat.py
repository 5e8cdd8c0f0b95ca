"""The single-factor groups: ``Q`` is one dense (``psgd.dense``) or diagonal
(``psgd.diag``) factor over the flattened leaf, a Kronecker group of one factor."""

from __future__ import annotations

import math

from psgd_optax._src.groups.factors import FACTOR_KINDS
from psgd_optax._src.groups.geometry import get_geometry
from psgd_optax._src.groups.kron import KronGroup


def flat_group(factor_kind: str, shape, *, geometry="q0.5eq1.5",
               lipschitz_decay=0.9) -> KronGroup:
  """One factor of ``factor_kind`` over the flattened leaf (the dense and diag groups)."""
  return KronGroup(tuple(shape), (FACTOR_KINDS[factor_kind](math.prod(shape)),),
                   get_geometry(geometry), lipschitz_decay)


def dense_group(shape, *, geometry="q0.5eq1.5", lipschitz_decay=0.9) -> KronGroup:
  """The dense group over a leaf of ``shape`` (flattened to ``numel``): one ``n × n`` ``Q``,
  which can represent any SPD ``P`` (``O(n²)`` memory, ``O(n³)`` per fit).

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> group = psgd.dense_group((2, 3))
    >>> group.init(1.0, jnp.float32).factors[0].shape
    (6, 6)
  """
  return flat_group("dense", shape, geometry=geometry, lipschitz_decay=lipschitz_decay)


def diag_group(shape, *, geometry="q0.5eq1.5", lipschitz_decay=0.9) -> KronGroup:
  """The diagonal group over a leaf of ``shape``: ``Q = diag(d)`` with ``d > 0`` (for
  whitening pairs ``P → diag(E[g²])^{-1/2}``, an Adam-like scaling, fitted).

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> psgd.diag_group((2, 3)).init(1.0, jnp.float32).factors[0].shape
    (6,)
  """
  return flat_group("diagonal", shape, geometry=geometry, lipschitz_decay=lipschitz_decay)


def flat_group_for_options(factor_kind: str, *, geometry, lipschitz_decay):
  """``group_for_shape`` of ``psgd.dense`` / ``psgd.diag``: the shape fixes the structure."""
  def group_for_shape(shape, state_leaves=None):
    del state_leaves
    return flat_group(factor_kind, shape, geometry=geometry, lipschitz_decay=lipschitz_decay)
  return group_for_shape

