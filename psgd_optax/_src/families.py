r"""The public preconditioner families: one Lie group each, on the one engine.

Each factory takes its group's options, written out below, and the engine's options as
``**options`` (typed by :class:`~psgd_optax._src.options.EngineOptions`, so type checkers
and IDEs check every name). :func:`_family` adds the engine's options with their defaults to
the factory's ``inspect.signature`` (which ``optax.inject_hyperparams`` and ``help`` read)
and their ``Args`` entries to its docstring.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import optax

from psgd_optax._src import engine
from psgd_optax._src import options as options_lib
from psgd_optax._src.groups import affine as affine_lib
from psgd_optax._src.groups import flat as flat_lib
from psgd_optax._src.groups import kron as kron_lib
from psgd_optax._src.groups import lra as lra_lib
from psgd_optax._src.groups import splu as splu_lib
from psgd_optax._src.groups import xmat as xmat_lib
from psgd_optax._src.groups.geometry import GEOMETRIES
from psgd_optax._src.validation import check_choice, check_integer, check_number, check_rank

if TYPE_CHECKING:
  from typing_extensions import Unpack

  from psgd_optax._src.options import EngineOptions

ENGINE_PARAMETERS = [parameter for name, parameter
                     in inspect.signature(engine.preconditioner).parameters.items()
                     if name != "group_for_shape"]

_DOCS = {
    "{geometry_args}": """    geometry: how ``Q`` moves: ``"q0.5eq1.5"`` (default, inverse-free, ``Q`` kept SPD),
      ``"eq"`` (the papers' triangular rule) or ``"quad"``; their update rules are on
      the documentation's *Families and options* page.""",
    # The affine families' layout note, Args and Returns (expanded before the next entry).
    "{affine_layout_args_and_returns}": affine_lib.AFFINE_LAYOUT_DOC
                                        + "\n\n  Args:\n{shared_args_and_returns}",
    # Every family's last Args entries and its Returns section.
    "{shared_args_and_returns}": """    lipschitz_decay: decay of the running maximum of past step bounds that normalizes
      each fit step (``L ← max(βL + (1 − β)ℓ, ℓ)``). The default 0.9 steadies fits to
      noisy pairs; 0 normalizes each step by its own bound, as paper 000 does, which
      suits exact deterministic curvature (Newton type on a full-batch problem): on
      Rosenbrock with ``geometry="eq"`` and ``precond_lr=1`` it takes a median of 110
      iterations to f < 1e-10 against 441 at 0.9.
""" + options_lib.ARGS_DOC.rstrip("\n") + """

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` returning ``P g``; its ``update``
    takes ``(updates, state, params=None, *, value_fn=None, hvp=None, vector=None,
    **extra_args)``.""",
    "{lie_group_paper}": """Li, Xu and Demir, *Curvature-informed SGD via general purpose Lie-group
    preconditioners*, 2023""",
}


def _check_group_options(geometry, lipschitz_decay) -> None:
  """Validates the options every group built from factors shares."""
  check_choice("geometry", geometry, GEOMETRIES)
  _check_lipschitz_decay(lipschitz_decay)


def _check_lipschitz_decay(lipschitz_decay) -> None:
  check_number("lipschitz_decay", lipschitz_decay, low=0.0, high=1.0, high_open=True)


def _check_kron_options(*, max_size, max_skew, memory_save_mode, geometry,
                       lipschitz_decay) -> None:
  check_integer("max_size", max_size, low=1.0)
  check_number("max_skew", max_skew, low=0.0, low_open=True)
  check_choice("memory_save_mode", memory_save_mode, kron_lib.MEMORY_SAVE_MODES)
  _check_group_options(geometry, lipschitz_decay)


def _on_engine(group_for_options, lipschitz_decay, options):
  """The engine on the groups of a family whose only group option is ``lipschitz_decay``."""
  _check_lipschitz_decay(lipschitz_decay)
  return engine.preconditioner(group_for_options(lipschitz_decay=lipschitz_decay), **options)


def _flat(factor_kind, geometry, lipschitz_decay, options):
  """The engine on one factor of ``factor_kind`` over each flattened leaf."""
  _check_group_options(geometry, lipschitz_decay)
  return engine.preconditioner(flat_lib.flat_group_for_options(
      factor_kind, geometry=geometry, lipschitz_decay=lipschitz_decay), **options)


def _family(factory):
  """Declares ``factory`` a family: the engine's options join its signature and docs."""
  own = [parameter for parameter in inspect.signature(factory).parameters.values()
         if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
  factory.__signature__ = inspect.Signature(
      own + ENGINE_PARAMETERS, return_annotation=optax.GradientTransformationExtraArgs)
  for placeholder, text in _DOCS.items():
    factory.__doc__ = factory.__doc__.replace(placeholder, text)
  return factory


@_family
def kron(*, max_size: int = 8192, max_skew: float = 4.0, memory_save_mode: str | None = None,
         geometry: str = "q0.5eq1.5", lipschitz_decay: float = 0.9,
         **options: Unpack[EngineOptions]) -> optax.GradientTransformationExtraArgs:
  r"""PSGD with a Kronecker-product preconditioner per leaf.

  For a leaf of shape ``(n₁, …, n_k)``, ``Q = Q₁ ⊗ … ⊗ Q_k`` with a dense or diagonal
  factor per axis, fitted online so that

  .. math::
    P = Q^\top Q \;\to\; \arg\min_P\; \mathbb{E}[h^\top P h + v^\top P^{-1} v],
    \qquad P\,\mathbb{E}[h h^\top]\,P = \mathbb{E}[v v^\top],

  i.e. ``P → |H|⁻¹`` for Newton pairs ``h = Hv`` and ``P → C^{-1/2}`` for whitening
  pairs ``h = g`` with ``C = E[ggᵀ]``. Returns ``P g`` (chain with
  ``optax.scale(-learning_rate)``, or use :func:`psgd_optax.optimizers.kron`).

  Args:
    max_size: axes longer than this get a diagonal factor.
    max_skew: an axis of size ``n`` gets a dense factor only if ``n² ≤ max_skew·numel``.
    memory_save_mode: ``None``, ``"one_diag"`` (largest axis diagonal) or ``"all_diag"``.
{geometry_args}
{shared_args_and_returns}

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import psgd_optax as psgd
    >>> params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    >>> loss = lambda p: jnp.sum((p["w"] @ jnp.ones(4) - 1.0) ** 2) + jnp.sum(p["b"] ** 2)
    >>> tx = optax.chain(psgd.kron(), optax.scale(-0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params)
    >>> jax.tree.map(jnp.shape, updates)
    {'b': (4,), 'w': (3, 4)}
    >>> [f.shape for f in psgd.preconditioner_per_leaf(state[0], params)["w"].factors]
    [(3, 3), (4, 4)]

  References:
    Li, *Preconditioned stochastic gradient descent*, IEEE TNNLS 2018.
    Li, *Preconditioner on matrix Lie group for SGD*, ICLR 2019.
  """
  _check_kron_options(max_size=max_size, max_skew=max_skew,
                              memory_save_mode=memory_save_mode, geometry=geometry,
                              lipschitz_decay=lipschitz_decay)
  return engine.preconditioner(kron_lib.kron_group_for_options(
      max_size=max_size, max_skew=max_skew, memory_save_mode=memory_save_mode,
      geometry=geometry, lipschitz_decay=lipschitz_decay), **options)


@_family
def dense(*, geometry: str = "q0.5eq1.5", lipschitz_decay: float = 0.9,
          **options: Unpack[EngineOptions]) -> optax.GradientTransformationExtraArgs:
  r"""PSGD with a dense preconditioner ``P = QᵀQ`` over each flattened leaf.

  .. math::
    Q \leftarrow Q - \frac{\mu}{L}\,(P h h^\top P - v v^\top)\,Q \quad
    (\text{default geometry}), \qquad P \to |H|^{-1}\ \text{or}\ C^{-1/2}.

  ``O(n²)`` memory and ``O(n³)`` per fit: for small leaves, or a whole small model as one
  vector, ``optax.flatten(psgd.dense())`` (with ``curvature="newton"``, ``value_fn`` then
  receives the flat parameter vector; build it with ``jax.flatten_util.ravel_pytree``).

  Args:
{geometry_args}
{shared_args_and_returns}

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
  """
  return _flat("dense", geometry, lipschitz_decay, options)


@_family
def diag(*, geometry: str = "q0.5eq1.5", lipschitz_decay: float = 0.9,
         **options: Unpack[EngineOptions]) -> optax.GradientTransformationExtraArgs:
  r"""PSGD with a diagonal preconditioner per leaf.

  .. math::
    d \leftarrow d - \frac{\mu}{L}\big((P h)^2 - v^2\big)\, d, \qquad
    P = \mathrm{diag}(d)^2,\quad L \approx \max\big((Ph)^2 + v^2\big).

  The cheapest PSGD preconditioner (``O(n)``): for whitening pairs
  ``P → diag(E[g²])^{-1/2}``, an Adam-like scaling with a fitted, not averaged, estimate.

  Args:
{geometry_args}
{shared_args_and_returns}

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
  return _flat("diagonal", geometry, lipschitz_decay, options)


@_family
def lra(*, rank: int = 10, lipschitz_decay: float = 0.9,
        **options: Unpack[EngineOptions]) -> optax.GradientTransformationExtraArgs:
  r"""PSGD with a low-rank-plus-diagonal preconditioner ``Q = diag(d)(I + UVᵀ)`` per leaf.

  .. math::
    P = (I + VU^\top)\,\mathrm{diag}(d)^2\,(I + UV^\top), \qquad
    U, V \in \mathbb{R}^{n \times r},

  fitted on the diagonal group and on the groups :math:`A_V(U)` and :math:`A_U(V)` (the
  steps are on the documentation's *Families and options* page). Memory ``(2r + 1)n`` and
  ``O(rn)`` work per fit, so it suits large leaves and whole models:
  ``optax.flatten(psgd.lra(rank=10))``.

  Args:
    rank: ``r ≥ 1``, the number of columns of ``U`` and ``V`` (capped at the leaf size).
      Rank 0 would be ``psgd.diag(geometry="eq")``: use that.
{shared_args_and_returns}

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import psgd_optax as psgd
    >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> tx = optax.flatten(psgd.lra(rank=2, curvature="newton"))
    >>> state = tx.init(params)
    >>> state.preconditioner[0].u.shape   # one stack of one LRA over all 15 parameters
    (1, 15, 2)

  References:
    {lie_group_paper} (Section 3.2, Appendices C–D).
  """
  check_rank("rank", rank)
  _check_lipschitz_decay(lipschitz_decay)
  return engine.preconditioner(
      lra_lib.lra_group_for_options(rank=rank, lipschitz_decay=lipschitz_decay), **options)


@_family
def xmat(*, lipschitz_decay: float = 0.9,
         **options: Unpack[EngineOptions]) -> optax.GradientTransformationExtraArgs:
  r"""PSGD with an X-shape preconditioner per leaf: ``Q = diag(a) + diag(b)·J``.

  ``J`` reverses the flattened leaf, so ``Q`` has nonzeros on its diagonal and
  anti-diagonal: each parameter is coupled with its mirror image, at ``O(n)`` cost.

  .. math::
    Q \leftarrow Q - \frac{\mu}{L}\,\Pi_X\!\big(a a^\top - b b^\top\big)\,Q,
    \qquad a = Q h,\; b = Q^{-\top} v,

  where :math:`\Pi_X` keeps the diagonal and anti-diagonal. For the whole model as one
  vector use ``optax.flatten(psgd.xmat())``.

  Args:
{shared_args_and_returns}

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> params = jnp.zeros(4)
    >>> state = psgd.xmat().init(params)
    >>> q = psgd.preconditioner_per_leaf(state, params)
    >>> q.diagonal.shape, q.anti_diagonal.shape
    ((4,), (4,))

  References:
    {lie_group_paper} (Theorem 3.1, Example 2).
  """
  return _on_engine(xmat_lib.involution_group_for_options("flip"), lipschitz_decay, options)


@_family
def butterfly(*, lipschitz_decay: float = 0.9,
              **options: Unpack[EngineOptions]) -> optax.GradientTransformationExtraArgs:
  r"""PSGD with a butterfly preconditioner per leaf: ``Q = diag(a) + diag(b)·S``.

  ``S`` swaps the two halves of the flattened leaf (a circular shift by ``n/2``; for odd
  ``n`` the last entry stays on the diagonal), so each parameter is coupled with the one
  half a leaf away. Same fit and cost as :func:`psgd_optax.xmat`:

  .. math::
    Q \leftarrow Q - \frac{\mu}{L}\,\Pi_S\!\big(a a^\top - b b^\top\big)\,Q,
    \qquad a = Q h,\; b = Q^{-\top} v.

  Args:
{shared_args_and_returns}

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> params = {"w": jnp.zeros((3, 3))}
    >>> state = psgd.butterfly().init(params)
    >>> psgd.preconditioner_per_leaf(state, params)["w"].half_swap.shape
    (9,)

  References:
    {lie_group_paper} (Theorem 3.1, Example 3).
  """
  return _on_engine(xmat_lib.involution_group_for_options("half_swap"), lipschitz_decay, options)


@_family
def splu(*, order: int = 10, lipschitz_decay: float = 0.9,
         **options: Unpack[EngineOptions]) -> optax.GradientTransformationExtraArgs:
  r"""PSGD with a sparse-LU preconditioner ``Q = LU`` of order ``r`` per leaf.

  ``L`` (``U``) is lower (upper) triangular with nonzeros only on the diagonal and in its
  first ``r`` columns (rows): the first ``r`` parameters of a leaf are coupled densely with
  all others, the rest only through the diagonal. ``O(rn)`` memory and work.

  .. math::
    L \leftarrow L - \frac{\mu}{L_L}\,\Pi_L\big[aa^\top - bb^\top\big] L,\quad
    U \leftarrow U - \frac{\mu}{L_U}\,U\,\Pi_U\big[(Ph)h^\top - v(P^{-1}v)^\top\big],

  with ``a = Qh``, ``b = Q⁻ᵀv`` (the documentation's *Families and options* page has the
  steps).

  Args:
    order: ``r ≥ 1`` (capped at the leaf size); the paper used 10.
{shared_args_and_returns}

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> params = jnp.zeros(5)
    >>> q = psgd.preconditioner_per_leaf(psgd.splu(order=2).init(params), params)
    >>> q.l_columns.shape, q.u_rows.shape
    ((5, 2), (2, 5))

  References:
    Li, *Preconditioned stochastic gradient descent*, IEEE TNNLS 2018 (Appendix A).
  """
  check_rank("order", order)
  _check_lipschitz_decay(lipschitz_decay)
  return engine.preconditioner(
      splu_lib.splu_group_for_options(order=order, lipschitz_decay=lipschitz_decay),
      **options)


@_family
def scan(*, lipschitz_decay: float = 0.9,
         **options: Unpack[EngineOptions]) -> optax.GradientTransformationExtraArgs:
  r"""PSGD with the scaling-and-normalization (SCAN) preconditioner for affine layers.

  .. math::
    Q = Q_{\mathrm{in}} \otimes \mathrm{diag}(q_{\mathrm{out}}), \qquad
    Q_{\mathrm{in}} = \begin{bmatrix} \mathrm{diag}(s) & m \\ 0 & s_n \end{bmatrix},

  so ``x′ = Q_in [x; 1] = s ⊙ x + m`` normalizes the inputs (the paper's Eq. 25) and
  ``q_out`` scales the outputs. ``O(in + out)`` memory per layer.
{affine_layout_args_and_returns}

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> params = {"theta": jnp.zeros((5, 3))}  # 4 inputs + bias, 3 outputs
    >>> state = psgd.scan().init(params)
    >>> [f.shape for f in psgd.preconditioner_per_leaf(state, params)["theta"].factors]
    [(2, 5), (3,)]

  References:
    Li, *Preconditioner on matrix Lie group for SGD*, ICLR 2019 (§5.3).
  """
  return _on_engine(affine_lib.affine_group_for_options("normalization"), lipschitz_decay, options)


@_family
def scaw(*, lipschitz_decay: float = 0.9,
         **options: Unpack[EngineOptions]) -> optax.GradientTransformationExtraArgs:
  r"""PSGD with the scaling-and-whitening preconditioner for affine layers.

  .. math::
    Q = Q_{\mathrm{in}} \otimes \mathrm{diag}(q_{\mathrm{out}}), \qquad
    Q_{\mathrm{in}}\ \text{upper triangular},

  so ``x′ = Q_in [x; 1]`` whitens the augmented inputs and ``q_out`` scales the outputs.
  ``O(in² + out)`` memory per layer.
{affine_layout_args_and_returns}

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> params = jnp.zeros((5, 3))
    >>> q = psgd.preconditioner_per_leaf(psgd.scaw().init(params), params)
    >>> [f.shape for f in q.factors]
    [(5, 5), (3,)]

  References:
    Li, *Preconditioner on matrix Lie group for SGD*, ICLR 2019 (§5.4).
  """
  return _on_engine(affine_lib.affine_group_for_options("triangular"), lipschitz_decay, options)
