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

from psgd_optax._src.family import (LIPSCHITZ_DECAY_DOC, LIPSCHITZ_DECAY_OPTION,
                                     check_lipschitz_decay, preconditioner_family)
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


def _group_for_options(input_kind):
  def group_for_options(*, lipschitz_decay):
    def group_for_shape(shape, state_leaves=None):
      del state_leaves  # the shape fixes the structure
      return affine_group(shape, input_kind, lipschitz_decay=lipschitz_decay)
    return group_for_shape
  return group_for_options


_OPTIONS = [LIPSCHITZ_DECAY_OPTION]
_LAYOUT = """
  Matrix leaves must be laid out as ``Θ = [weights; bias]`` of shape ``(in + 1, out)``:
  the last row multiplies the constant input 1. For Flax ``Dense`` layers wrap the
  transformation in :func:`psgd_optax.affine_pairs`, which joins each ``kernel``
  ``(in, out)`` with its ``bias`` ``(out,)`` (and splits the result back)."""

scan = preconditioner_family(
    "scan", __name__, _OPTIONS, _group_for_options("normalization"), check_lipschitz_decay,
    r"""PSGD with the scaling-and-normalization (SCAN) preconditioner for affine layers.

  .. math::
    Q = Q_{\mathrm{in}} \otimes \mathrm{diag}(q_{\mathrm{out}}), \qquad
    Q_{\mathrm{in}} = \begin{bmatrix} \mathrm{diag}(s) & m \\ 0 & s_n \end{bmatrix},

  so ``x′ = Q_in [x; 1] = s ⊙ x + m`` normalizes the inputs (the papers' Eq. 25) and
  ``q_out`` scales the outputs. ``O(in + out)`` memory per layer.
""" + _LAYOUT + """

  Args:
""" + LIPSCHITZ_DECAY_DOC + """
{engine_args}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` returning ``P g``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> params = {"theta": jnp.zeros((5, 3))}  # 4 inputs + bias, 3 outputs
    >>> state = psgd.scan().init(params)
    >>> [f.shape for f in psgd.preconditioner_per_leaf(state, params)["theta"].factors]
    [(2, 5), (3,)]

  References:
    Li, *Preconditioner on matrix Lie group for SGD*, ICLR 2019 (§5.3).
""")

scaw = preconditioner_family(
    "scaw", __name__, _OPTIONS, _group_for_options("triangular"), check_lipschitz_decay,
    r"""PSGD with the scaling-and-whitening preconditioner for affine layers.

  .. math::
    Q = Q_{\mathrm{in}} \otimes \mathrm{diag}(q_{\mathrm{out}}), \qquad
    Q_{\mathrm{in}}\ \text{upper triangular},

  so ``x′ = Q_in [x; 1]`` whitens the augmented inputs and ``q_out`` scales the outputs.
  ``O(in² + out)`` memory per layer.
""" + _LAYOUT + """

  Args:
""" + LIPSCHITZ_DECAY_DOC + """
{engine_args}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` returning ``P g``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> state = psgd.scaw().init(jnp.zeros((5, 3)))
    >>> [f.shape for f in state.preconditioner["leaves_0"].factors]
    [(5, 5), (3,)]

  References:
    Li, *Preconditioner on matrix Lie group for SGD*, ICLR 2019 (§5.4).
""")
