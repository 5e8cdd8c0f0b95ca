r"""Affine-layer groups (Li 2019 §5.3–5.4): Kronecker products for ``Θ = [W; b]``.

An affine layer ``y = xW + b`` (Flax ``Dense``: ``kernel`` of shape ``(in, out)``, ``bias``
of shape ``(out,)``) is one matrix ``Θ = [kernel; bias]`` of shape ``(in + 1, out)`` acting
on the augmented input ``[x, 1]``. PSGD on ``Θ`` with ``Q = Q_in ⊗ Q_out`` is SGD on
transformed features ``x′ = Q_in [x; 1]`` and outputs scaled by ``Q_out``:

``scan`` (scaling-and-normalization)
  ``Q_in`` is a :class:`~psgd_optax._src.groups.factors.NormalizationFactor` (diagonal +
  last column, acting on the constant 1 to remove feature means) and ``Q_out`` is
  diagonal: a learned, curvature-aware batch normalization of the inputs, ``O(in + out)``
  memory.
``scaw`` (scaling-and-whitening)
  ``Q_in`` is upper triangular (a learned whitening of the augmented inputs) and
  ``Q_out`` diagonal.

Both use the papers' triangular rule (``geometry="eq"``). Leaves that are not matrices
(biases kept separate, scalars, conv kernels) get a diagonal preconditioner. Use
:func:`psgd_optax.affine_pairs` to present a Flax ``kernel``/``bias`` pair as one ``Θ``.
"""

from __future__ import annotations

import math

from psgd_optax._src.groups.factors import DiagonalFactor, FACTOR_KINDS
from psgd_optax._src.groups.geometry import get_geometry
from psgd_optax._src.groups.kron import KronGroup


def affine_group(shape, input_kind: str, *, lipschitz_decay=0.9) -> KronGroup:
  """``Q_in ⊗ diag`` for a ``(in + 1, out)`` leaf; a diagonal group for other leaves.

  Args:
    shape: the leaf's shape; a matrix's first axis is ``[inputs; 1]``.
    input_kind: ``"normalization"`` (SCAN) or ``"triangular"`` (scaling-and-whitening).
    lipschitz_decay: decay of the fit's Lipschitz estimates.

  Example:
    >>> import psgd_optax as psgd
    >>> [f.kind for f in psgd.affine_group((5, 3), "normalization").factors]
    ['normalization', 'diagonal']
    >>> [f.kind for f in psgd.affine_group((3,), "normalization").factors]  # a bias
    ['diagonal']
  """
  shape = tuple(shape)
  geometry = get_geometry("eq")
  if len(shape) != 2 or shape[0] < 2:
    return KronGroup(shape, (DiagonalFactor(max(math.prod(shape), 1)),), geometry,
                     lipschitz_decay)
  factors = [FACTOR_KINDS[input_kind](shape[0])]
  if shape[1] > 1:
    factors.append(DiagonalFactor(shape[1]))
  return KronGroup(shape, tuple(factors), geometry, lipschitz_decay)


def affine_group_for_options(input_kind: str):
  """``group_for_options`` of ``scan`` (``"normalization"``) or ``scaw`` (``"triangular"``)."""
  def group_for_options(*, lipschitz_decay):
    def group_for_shape(shape, state_leaves=None):
      del state_leaves  # the shape fixes the structure
      return affine_group(shape, input_kind, lipschitz_decay=lipschitz_decay)
    return group_for_shape
  return group_for_options


AFFINE_LAYOUT_DOC = """
  Matrix leaves must be laid out as ``Θ = [weights; bias]`` of shape ``(in + 1, out)``:
  the last row multiplies the constant input 1. For Flax ``Dense`` layers wrap the
  transformation in :func:`psgd_optax.affine_pairs`, which joins each ``kernel``
  ``(in, out)`` with its ``bias`` ``(out,)`` (and splits the result back)."""
