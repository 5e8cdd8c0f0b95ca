r"""Kronecker-product groups: ``Q = Q₁ ⊗ Q₂ ⊗ … ⊗ Q_k``, one factor per axis.

For a leaf ``G`` of shape ``(n₁, …, n_k)`` (size-1 axes squeezed away), ``P = QᵀQ`` acts as

.. math:: P\,G = G \times_1 Q_1^\top Q_1 \times_2 Q_2^\top Q_2 \cdots \times_k Q_k^\top Q_k,

where :math:`\times_i` multiplies along axis ``i``. Every factor is fitted from the partial
second moments of the transformed pair over the other axes,
``T1_i = tr_{j≠i}[x xᵀ]`` and ``T2_i = tr_{j≠i}[y yᵀ]`` (``x = P h, y = v`` for the
inverse-free geometries; ``x = Q h, y = Q⁻ᵀ v`` for ``"eq"``), and moves by
``μ/L_i·(T1_i − T2_i)`` in the chosen geometry. At the fixed point ``P H² P = I`` for a
Kronecker ``H``. Factor norms are balanced after every fit (their product is unchanged).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from psgd_optax._src.groups.factors import FACTOR_KINDS
from psgd_optax._src.groups.geometry import GEOMETRIES, Geometry, get_geometry
from psgd_optax._src.normalize import lipschitz_step, scale_pair
from psgd_optax._src.validation import check_choice

MEMORY_SAVE_MODES = (None, "one_diag", "all_diag")


class KronState(NamedTuple):
  """``Q``'s symmetric positive definite factors (``n×n`` matrices or length-``n``
  vectors; geometries ``"q0.5eq1.5"`` and ``"quad"``) and their Lipschitz estimates (one
  per factor). Flat leaves: ``[Q₁, …, Q_k, lipschitz]``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> state = psgd.kron().init({"w": jnp.zeros((4, 3))})
    >>> [factor.shape for factor in state.preconditioner[0].factors]  # a stack of one unit
    [(1, 4, 4), (1, 3, 3)]
  """

  factors: tuple
  lipschitz: jax.Array


class TriangularKronState(NamedTuple):
  """``Q``'s upper-triangular factors (geometry ``"eq"``) and their Lipschitz estimates.

  A field name of its own, so that a checkpoint of SPD factors is not restored as
  triangular ones (Orbax refuses a target whose field it does not hold); ``factors``
  reads them as :class:`KronState` does.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> state = psgd.kron(geometry="eq").init({"w": jnp.zeros((4, 3))})
    >>> [factor.shape for factor in state.preconditioner[0].triangular_factors]
    [(1, 4, 4), (1, 3, 3)]
  """

  triangular_factors: tuple
  lipschitz: jax.Array

  @property
  def factors(self) -> tuple:
    return self.triangular_factors


@dataclasses.dataclass(frozen=True)
class KronGroup:
  """A product of per-axis factors over a leaf reshaped to ``core_shape``.

  ``dense`` and ``diag`` are this group with one factor over the flattened leaf.

  Attributes:
    shape: the leaf's shape.
    factors: one factor per axis of the core shape (``factor.size`` each).
    geometry: how the factors move.
    lipschitz_decay: decay of the step normalizer's moving estimate.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> group = psgd.kron_group((4, 3))
    >>> q = group.init(2.0, jnp.float32)  # Q = 2·I, so P = QᵀQ = 4·I
    >>> bool(jnp.allclose(group.materialize(q), 4.0 * jnp.eye(12)))
    True
  """

  shape: tuple[int, ...]
  factors: tuple[Any, ...]
  geometry: Geometry
  lipschitz_decay: Any = 0.9

  @property
  def core_shape(self) -> tuple[int, ...]:
    return tuple(f.size for f in self.factors)

  @property
  def state_type(self) -> type:
    return TriangularKronState if self.geometry.keeps_triangular else KronState

  def init(self, scale, dtype) -> KronState | TriangularKronState:
    per_factor = jnp.asarray(scale, dtype) ** (1.0 / len(self.factors))
    return self.state_type(tuple(f.identity(per_factor, dtype) for f in self.factors),
                           jnp.zeros((len(self.factors),), dtype))

  def _apply_q(self, q: KronState, x, transpose=False):
    for axis, (factor, matrix) in enumerate(zip(self.factors, q.factors)):
      x = factor.apply(matrix, x, axis, transpose=transpose)
    return x

  def _precondition_core(self, q: KronState, x):
    # P = ⊗ QᵢᵀQᵢ, so each axis takes its own QᵢᵀQᵢ (products along other axes commute).
    for axis, (factor, matrix) in enumerate(zip(self.factors, q.factors)):
      x = factor.precondition(matrix, x, axis)
    return x

  def precondition(self, q: KronState, g):
    return self._precondition_core(q, g.reshape(self.core_shape)).reshape(g.shape)

  def update(self, q: KronState, v, h, lr, *, integrate_probe: bool) -> KronState:
    h = h.reshape(self.core_shape)
    v = v.reshape(self.core_shape)
    numel = math.prod(self.core_shape)
    if self.geometry.uses_inverse:
      fitted = self._apply_q(q, h)
      probe = v
      for axis, (factor, matrix) in enumerate(zip(self.factors, q.factors)):
        probe = factor.solve_transpose(matrix, probe, axis)
      unit, fitted, probe = scale_pair(fitted, probe)
      probe_moments = [f.second_moment(probe, i) for i, f in enumerate(self.factors)]
    else:
      unit = 1.0
      fitted = self._precondition_core(q, h)
      if integrate_probe:
        probe_moments = [jnp.asarray(numel / f.size, h.dtype) for f in self.factors]
      else:
        probe_moments = [f.second_moment(v, i) for i, f in enumerate(self.factors)]

    new_factors, new_lipschitz = [], []
    for axis, factor in enumerate(self.factors):
      t1 = factor.second_moment(fitted, axis)
      t2 = probe_moments[axis]
      step, lipschitz = lipschitz_step(lr, q.lipschitz[axis], factor.norm_bound(t1, t2),
                                       self.lipschitz_decay, unit)
      new_factors.append(factor.step(q.factors[axis], t1, t2, step, self.geometry))
      new_lipschitz.append(lipschitz)
    return self.state_type(tuple(self._balance(new_factors)), jnp.stack(new_lipschitz))

  def _balance(self, matrices):
    """Rescales factors to equal max-abs (their product is unchanged)."""
    if len(matrices) < 2:
      return matrices
    norms = jnp.stack([f.max_abs(m) for f, m in zip(self.factors, matrices)])
    ok = jnp.all(norms > 0)
    safe = jnp.where(ok, norms, 1.0)
    target = jnp.exp(jnp.mean(jnp.log(safe)))
    return [m * jnp.where(ok, target / n, 1.0) for m, n in zip(matrices, safe)]

  def materialize(self, q: KronState) -> jax.Array:
    blocks = [f.matrix(m).T @ f.matrix(m) for f, m in zip(self.factors, q.factors)]
    return functools.reduce(jnp.kron, blocks)


def factor_kinds(shape: Sequence[int], *, max_size=8192, max_skew=4.0,
                 memory_save_mode=None) -> tuple[str, ...]:
  """Which factor each (squeezed) axis of a leaf gets.

  An axis of size ``n`` gets a ``"dense"`` factor when ``1 < n ≤ max_size`` and
  ``n² ≤ max_skew · numel`` (the factor costs at most ``max_skew`` times the leaf's own
  memory); otherwise ``"diagonal"``. ``memory_save_mode="one_diag"`` makes the largest
  axis diagonal, ``"all_diag"`` every axis. Size-1 axes are squeezed; a leaf with no
  axis left (a scalar) gets one diagonal factor of size 1.

  Example:
    >>> from psgd_optax._src.groups.kron import factor_kinds
    >>> factor_kinds((512, 1024)), factor_kinds((512, 10)), factor_kinds((300,))
    (('dense', 'dense'), ('diagonal', 'dense'), ('diagonal',))
  """
  core = [n for n in shape if n > 1] or [1]
  numel = math.prod(core)
  kinds = ["dense" if 1 < n <= max_size and n * n <= max_skew * numel else "diagonal"
           for n in core]
  if memory_save_mode == "all_diag":
    kinds = ["diagonal"] * len(core)
  elif memory_save_mode == "one_diag":
    kinds[max(range(len(core)), key=lambda i: core[i])] = "diagonal"
  return tuple(kinds)


def kron_group(shape, *, max_size=8192, max_skew=4.0, memory_save_mode=None,
               geometry="q0.5eq1.5", lipschitz_decay=0.9, kinds=None) -> KronGroup:
  """The Kronecker group for a leaf of ``shape`` (``kinds`` overrides the factor choice).

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> group = psgd.kron_group((2, 3))
    >>> q = group.init(2.0, jnp.float32)          # Q = 2·I, so P = QᵀQ = 4·I
    >>> group.precondition(q, jnp.ones((2, 3)))[0]
    Array([4., 4., 4.], dtype=float32)
    >>> group.materialize(q).shape
    (6, 6)
  """
  core = [n for n in shape if n > 1] or [1]
  if kinds is None:
    kinds = factor_kinds(shape, max_size=max_size, max_skew=max_skew,
                         memory_save_mode=memory_save_mode)
  if len(kinds) != len(core):
    raise ValueError(f"need one factor kind per axis of size > 1 of {tuple(shape)}, "
                     f"got {tuple(kinds)}.")
  for kind in kinds:
    check_choice("factor kind", kind, tuple(FACTOR_KINDS))
  factors = tuple(FACTOR_KINDS[k](n) for k, n in zip(kinds, core))
  return KronGroup(tuple(shape), factors, get_geometry(geometry), lipschitz_decay)


def state_factor_kinds(state_leaves) -> tuple[str, ...]:
  """The factor kinds in a :class:`KronState`'s leaves ``[Q₁, …, Q_k, lipschitz]``:
  matrices are dense factors, vectors diagonal ones."""
  return tuple("dense" if jnp.ndim(f) == 2 else "diagonal" for f in state_leaves[:-1])


def kron_group_for_options(*, max_size, max_skew, memory_save_mode, geometry,
                           lipschitz_decay):
  """``group_for_shape`` of ``psgd.kron``: in ``update`` the factor kinds are read from the
  stored state (``max_size``, ``max_skew`` may be traced by ``inject_hyperparams``)."""
  def group_for_shape(shape, state_leaves=None):
    kinds = None if state_leaves is None else state_factor_kinds(state_leaves)
    return kron_group(shape, max_size=max_size, max_skew=max_skew,
                      memory_save_mode=memory_save_mode, geometry=geometry,
                      lipschitz_decay=lipschitz_decay, kinds=kinds)
  return group_for_shape
