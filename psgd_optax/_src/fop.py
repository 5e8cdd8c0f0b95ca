"""First-order preconditioning (FOP) and hypergradient learning rates (paper 003).

All three transformations here learn a preconditioner ``P(m)`` of the update direction by
hypergradient descent: the parameters ``m`` of ``P`` are moved by an optax optimizer along

.. math::
  \\nabla_m J(\\theta_t) = \\frac{\\partial}{\\partial m}\\,
      J\\big(\\theta_{t-1} - \\epsilon_{t-1} P(m)\\,g_{t-1}\\big)
  = -\\epsilon_{t-1}\\,\\frac{\\partial}{\\partial m}\\big\\langle g_t,\\; P(m)\\,g_{t-1}\\big\\rangle,

the derivative of this step's loss with respect to the preconditioner that made the last step
(``g_{t-1}`` is cached in the state). For FOP, ``P = M Mᵀ`` and this is the paper's
``−ε (g_t g_{t−1}ᵀ + g_{t−1} g_tᵀ) M``. The derivative is taken by autodiff of the linear map
``m ↦ ⟨g_t, P(m) g_{t−1}⟩``, so it is exact for every variant (low rank, normalized, spatial)
at the cost of one extra application of ``P``.

The order within a step follows Baydin et al. (2017): first ``m`` moves with the hypergradient
of the step just taken, then the new ``P`` preconditions ``g_t``. The outer learning rate ``ε``
is part of the hypergradient, so these transformations take it as ``learning_rate``: it must
be the step size that the chain applies after them (``optax.scale(-ε)``, ``optax.sgd(ε)``).
With momentum in the chain the hypergradient ignores the velocity, as in the paper (§2.4).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from psgd_optax._src.linalg import trace
from psgd_optax._src.sharding import like, replicated
from psgd_optax._src.trees import all_finite, check_real, empty_entry, rebuild, value_at
from psgd_optax._src.validation import (as_dtype, check_float_dtype, check_integer, check_number,
                                        check_x64)


class HypergradientState(NamedTuple):
  """State of :func:`fop`, :func:`scalar_hypergradient` and :func:`per_parameter_hypergradient`.

  Attributes:
    count: number of ``update`` calls (``int32``).
    preconditioner: per leaf, the learned parameters ``m`` of ``P`` (``M`` for FOP, an
      scalar 0 for a leaf FOP leaves alone, the learning-rate multiplier for
      the hypergradient baselines), in ``precond_dtype``.
    previous_updates: the previous step's incoming updates ``g_{t−1}``, in ``precond_dtype``.
    has_previous: whether ``previous_updates`` holds a gradient (the last finite one).
    hyper_state: the state of the optimizer that moves ``preconditioner``.

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> state = psgd.fop(0.1).init({"w": jnp.zeros((3, 2))})
    >>> state.preconditioner["w"].shape, bool(state.has_previous)  # M over the 3 inputs
    ((3, 3), False)
  """
  count: jax.Array
  preconditioner: Any
  previous_updates: Any
  has_previous: jax.Array
  hyper_state: optax.OptState


class _Parametrization(NamedTuple):
  """How one leaf's ``P(m)`` is built: ``init(shape, key) -> m`` and ``apply(m, g) -> P g``."""
  init: Any
  apply: Any


def _hypergradient_transformation(parametrization_for_shape, learning_rate, hyper_optimizer,
                                  precond_dtype, seed) -> optax.GradientTransformationExtraArgs:
  """The shared hypergradient loop; ``parametrization_for_shape(shape, m=None)`` picks the
  parametrization of a leaf from its shape (and, in ``update``, from its stored ``m``)."""
  dtype = jnp.dtype(precond_dtype)
  hyper_optimizer = optax.with_extra_args_support(hyper_optimizer)

  def make_state(params):
    check_real(params)
    check_x64("precond_dtype", dtype)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    ms = [parametrization_for_shape(leaf.shape).init(leaf.shape, key).astype(dtype)
          for leaf, key in zip(leaves, keys)]
    # The learned ms are per leaf but not params-shaped (see trees.empty_entry).
    preconditioner = jax.tree.unflatten(treedef, ms) if leaves else empty_entry()
    return HypergradientState(
        count=jnp.zeros([], jnp.int32),
        preconditioner=preconditioner,
        previous_updates=jax.tree.map(lambda p: like(jnp.zeros(p.shape, dtype), p), params),
        has_previous=jnp.asarray(False),
        hyper_state=hyper_optimizer.init(preconditioner))

  # Jitted so that eager callers (notebooks, doctests) run one compiled step, not op by op.
  @jax.jit
  def compiled_update(updates, state):
    if not isinstance(state, HypergradientState):  # e.g. flax.nnx's own state containers
      state = rebuild(lambda: make_state(updates), jax.tree.leaves(state))
    # On a mesh the per-leaf matrices couple a whole axis: their math runs on replicated
    # copies, while the stored previous gradient keeps the params' layout (_src/sharding.py).
    grads = jax.tree.map(lambda u: replicated(u.astype(dtype)), updates)
    previous = jax.tree.map(replicated, state.previous_updates)
    # ε of the step that produced the current parameters.
    outer_lr = as_dtype(value_at(learning_rate, jnp.maximum(state.count - 1, 0)), dtype)
    grads_finite = all_finite(grads)

    def leaf_hypergradient(m, g, g_previous):
      apply = parametrization_for_shape(g.shape, m).apply
      return jax.grad(lambda m_: -outer_lr * jnp.vdot(g, apply(m_, g_previous)))(m)

    hypergrads = jax.tree.map(leaf_hypergradient, state.preconditioner, grads, previous)

    def move(_):
      moves, moved_hyper_state = hyper_optimizer.update(hypergrads, state.hyper_state,
                                                        state.preconditioner)
      moved = optax.apply_updates(state.preconditioner, moves)
      # The hyper optimizer's own state must stay finite too (Adam's ν overflows at ~1e19).
      ok = all_finite([moved, moved_hyper_state])
      return optax.tree.where(ok, (moved, moved_hyper_state),
                              (state.preconditioner, state.hyper_state))

    # A branch, not a select: on the first step (no previous gradient) the hypergradient is
    # zero, and Adam's sqrt(ν) at ν = 0 has no derivative, so jax.grad through this update
    # must not see that move at all.
    usable = state.has_previous & grads_finite & all_finite(hypergrads)
    preconditioner, hyper_state = jax.lax.cond(
        usable, move, lambda _: (state.preconditioner, state.hyper_state), None)
    directions = jax.tree.map(
        lambda m, g, u: like(jnp.where(grads_finite, parametrization_for_shape(g.shape, m)
                                       .apply(m, g), 0).astype(u.dtype), u),
        preconditioner, grads, updates)
    # A step with a non-finite gradient changes nothing: the next one pairs with the last
    # finite gradient.
    new_state = HypergradientState(
        count=jnp.where(grads_finite, optax.safe_increment(state.count), state.count),
        preconditioner=preconditioner,
        previous_updates=jax.tree.map(
            lambda u, old: jnp.where(grads_finite, u.astype(dtype), old),
            updates, state.previous_updates),
        has_previous=state.has_previous | grads_finite,
        hyper_state=hyper_state)
    return directions, new_state

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return compiled_update(updates, state)

  return optax.GradientTransformationExtraArgs(make_state, update_fn)


def _check_common(learning_rate, hyper_optimizer, precond_dtype, seed):
  check_number("learning_rate", learning_rate, low=0.0, allow_callable=True)
  if not (hasattr(hyper_optimizer, "init") and hasattr(hyper_optimizer, "update")):
    raise ValueError("hyper_optimizer must be an optax.GradientTransformation, got "
                     f"{hyper_optimizer!r}.")
  check_float_dtype("precond_dtype", precond_dtype)
  check_integer("seed", seed)


def _default_hyper_optimizer(hyper_optimizer):
  # The paper trained every preconditioner with Adam at 1e-4 (§4.1).
  return optax.adam(1e-4) if hyper_optimizer is None else hyper_optimizer


# --- FOP --------------------------------------------------------------------------------

# A leaf FOP leaves alone stores a scalar 0 (FOP's M is always a matrix); not an empty
# array, which Orbax cannot save.
_PASS_THROUGH = _Parametrization(init=lambda shape, key: jnp.zeros(()),
                                 apply=lambda m, g: g)


def _matrix_view(shape, spatial):
  """``(to_matrix, from_matrix, rows)``: the leaf as a matrix whose rows ``P`` mixes."""
  if len(shape) == 1:
    rows = shape[0]
  elif len(shape) == 4 and spatial:
    rows = shape[0] * shape[1]  # (kh, kw, in, out): one (kh·kw)² matrix for all channels
  else:
    rows = math.prod(shape[:-1])  # Dense (in, out); other kernels: the fan-in
  return (lambda g: g.reshape(rows, -1)), (lambda matrix: matrix.reshape(shape)), rows


def _fop_parametrization(shape, m, *, rank, normalized, spatial, max_dim, init_scale):
  if len(shape) == 0:
    return _PASS_THROUGH
  to_matrix, from_matrix, rows = _matrix_view(shape, spatial)
  # In ``update`` the stored M decides (its size is static), so traced options are fine.
  if (m is not None and m.ndim == 0) or (m is None and rows > int(max_dim)):
    return _PASS_THROUGH
  identity_part = 0.0 if rank is None else 1.0

  def init(shape_, key):
    if rank is None:
      return jnp.eye(rows)
    columns = min(int(rank), rows)
    return init_scale * jax.random.normal(key, (rows, columns))

  def apply(m_, g):
    matrix = to_matrix(g)
    product = identity_part * matrix + m_ @ (m_.T @ matrix)
    if normalized:
      # ‖P‖_F from the small k×k Gram matrix: ‖c I + M Mᵀ‖² = c²n + 2c‖M‖² + ‖MᵀM‖².
      gram = m_.T @ m_
      norm_sq = (identity_part ** 2 * rows + 2 * identity_part * trace(gram)
                 + jnp.sum(gram ** 2))
      tiny = jnp.finfo(m_.dtype).tiny
      product = product * (math.sqrt(rows) * jax.lax.rsqrt(jnp.maximum(norm_sq, tiny)))
    return from_matrix(product)

  return _Parametrization(init, apply)


def fop(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int | None = None,
    normalized: bool = False,
    spatial: bool = True,
    max_dim: int = 2048,
    hyper_optimizer: optax.GradientTransformation | None = None,
    init_scale: float = 1e-2,
    precond_dtype: Any = "float32",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""First-order preconditioning: a learned ``P = M Mᵀ`` (or ``I + M Mᵀ``) per layer.

  .. math::
    d_t = P(M_t)\,g_t, \qquad
    M_t = M_{t-1} - \mathrm{opt}\Big(-\epsilon_{t-1}\big(g_t g_{t-1}^\top
        + g_{t-1} g_t^\top\big) M_{t-1}\Big)

  The output ``d_t`` is a direction (positive sign); follow it with the step size
  ``ε = learning_rate``, e.g. ``optax.chain(psgd.fop(0.05), optax.sgd(0.05, momentum=0.9))``.

  Which axis ``P`` acts on, per leaf of shape ``s``:

  - ``s = ()``: left alone (``P = 1``).
  - ``s = (n,)``: the whole vector, ``P`` is ``n × n``.
  - ``s = (in, out)`` (a Flax ``Dense`` kernel): the inputs, ``P`` is ``in × in`` and
    shared across the outputs: ``d = P G``.
  - ``s = (kh, kw, in, out)`` (a Flax ``Conv`` kernel) with ``spatial=True``: the paper's
    spatial FOP, a ``(kh·kw) × (kh·kw)`` matrix shared across channels: ``G`` is reshaped
    to ``(kh·kw, in·out)``, multiplied and reshaped back.
  - any other shape (or a conv kernel with ``spatial=False``): the fan-in, all axes but the
    last, like a ``Dense`` kernel.
  - a leaf whose preconditioned axis is longer than ``max_dim`` is left alone.

  Args:
    learning_rate: the outer step size ``ε`` the chain applies after this transformation
      (float or schedule of the step). It scales the hypergradient; a mismatch only
      rescales the preconditioner's learning rate, but the two should agree.
    rank: ``None`` for the full-rank ``P = M Mᵀ`` with ``M`` starting at ``I``; an integer
      ``k`` for low-rank FOP, ``P = I + M Mᵀ`` with ``M`` of shape ``(n, k)`` drawn from
      ``N(0, init_scale²)``, so ``P`` starts near ``I`` (paper §2.2).
    normalized: rescale ``P`` to ``√n · P / ‖P‖_F`` (paper A.1), so that FOP rotates the
      gradient without changing the step size's meaning (``‖I_n‖_F = √n``).
    spatial: use the ``(kh·kw)²`` spatial matrix for 4-D (conv) kernels.
    max_dim: leaves whose preconditioned axis is longer are left alone (memory is ``n²``
      for full rank, ``n·k`` for low rank).
    hyper_optimizer: the optax optimizer that moves ``M`` along the hypergradient;
      default ``optax.adam(1e-4)``, the paper's choice.
    init_scale: standard deviation of the initial low-rank ``M``.
    precond_dtype: dtype of ``M`` and of the cached gradient (``"float32"`` by default).
    seed: seed of the low-rank initialization.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with :class:`HypergradientState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import psgd_optax as psgd
    >>> booth = lambda p: (p[0] + 2 * p[1] - 7) ** 2 + (2 * p[0] + p[1] - 5) ** 2
    >>> tx = optax.chain(psgd.fop(0.01, hyper_optimizer=optax.adam(0.01)), optax.scale(-0.01))
    >>> params = jnp.array([-5.0, -5.0])
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(booth)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(500):
    ...   params, state = step(params, state)
    >>> bool(booth(params) < 1e-6)
    True

  References:
    Moskovitz et al., *First-Order Preconditioning via Hypergradient Descent*, 2019.
  """
  hyper_optimizer = _default_hyper_optimizer(hyper_optimizer)
  _check_common(learning_rate, hyper_optimizer, precond_dtype, seed)
  if rank is not None:
    check_integer("rank", rank, low=1)
  check_integer("max_dim", max_dim, low=1)
  check_number("init_scale", init_scale, low=0.0, low_open=True)
  if not isinstance(normalized, bool):
    raise ValueError(f"normalized must be a bool, got {normalized!r}.")
  if not isinstance(spatial, bool):
    raise ValueError(f"spatial must be a bool, got {spatial!r}.")

  def parametrization_for_shape(shape, m=None):
    return _fop_parametrization(shape, m, rank=rank, normalized=normalized, spatial=spatial,
                                max_dim=max_dim, init_scale=init_scale)

  return _hypergradient_transformation(parametrization_for_shape, learning_rate,
                                       hyper_optimizer, precond_dtype, seed)


# --- Hypergradient learning rates (S-HD, PP-HD) -----------------------------------------

def _learning_rate_hypergradient(per_parameter, learning_rate, hyper_optimizer,
                                 precond_dtype):
  """``α ⊙ g`` with ``α`` (a scalar or one per parameter) learned from 1 by hypergradient."""
  hyper_optimizer = _default_hyper_optimizer(hyper_optimizer)
  _check_common(learning_rate, hyper_optimizer, precond_dtype, 0)
  parametrization = _Parametrization(
      init=lambda shape, key: jnp.ones(shape if per_parameter else ()),
      apply=lambda m, g: m * g)
  return _hypergradient_transformation(lambda shape, m=None: parametrization, learning_rate,
                                       hyper_optimizer, precond_dtype, 0)


_HD_ARGS = """Args:
    learning_rate: the outer step size ``ε`` the chain applies after this transformation
      (float or schedule of the step); it scales the hypergradient.
    hyper_optimizer: the optax optimizer that moves the multipliers; default
      ``optax.adam(1e-4)``, the paper's choice for its baselines.
    precond_dtype: dtype of the multipliers and of the cached gradient.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with :class:`HypergradientState`.
"""


def scalar_hypergradient(
    learning_rate: optax.ScalarOrSchedule,
    *,
    hyper_optimizer: optax.GradientTransformation | None = None,
    precond_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
  r"""S-HD: one learned learning-rate multiplier ``α`` per leaf (Baydin et al., 2017).

  .. math::
    d_t = \alpha_t\,g_t, \qquad
    \alpha_t = \alpha_{t-1} - \mathrm{opt}\big(-\epsilon_{t-1}\,\langle g_t, g_{t-1}\rangle\big)

  ``α`` starts at 1, so the effective step size ``ε·α`` starts at ``ε``. The paper's scalar
  layer-wise baseline for FOP; it rescales each layer's step and never rotates it.

  {hd_args}

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import psgd_optax as psgd
    >>> loss = lambda w: jnp.sum(w ** 2)  # ε = 0.01 is a too-short step here
    >>> tx = optax.chain(psgd.scalar_hypergradient(0.01, hyper_optimizer=optax.sgd(10.0)),
    ...                  optax.scale(-0.01))
    >>> w = jnp.ones(3)
    >>> state = tx.init(w)
    >>> for _ in range(50):
    ...   updates, state = tx.update(2 * w, state)
    ...   w = w + updates
    >>> bool(state[0].preconditioner > 2.0)  # α learned to lengthen the step
    True
  """
  return _learning_rate_hypergradient(False, learning_rate, hyper_optimizer, precond_dtype)


def per_parameter_hypergradient(
    learning_rate: optax.ScalarOrSchedule,
    *,
    hyper_optimizer: optax.GradientTransformation | None = None,
    precond_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
  r"""PP-HD: a learned learning-rate multiplier per parameter, a diagonal ``P``.

  .. math::
    d_t = \alpha_t \odot g_t, \qquad
    \alpha_t = \alpha_{t-1} - \mathrm{opt}\big(-\epsilon_{t-1}\, g_t \odot g_{t-1}\big)

  ``α`` starts at 1. The paper's per-parameter baseline for FOP: the diagonal of a
  preconditioner, learned from first-order information only.

  {hd_args}

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import psgd_optax as psgd
    >>> tx = optax.chain(psgd.per_parameter_hypergradient(0.1), optax.scale(-0.1))
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> state[0].preconditioner["w"]
    Array([1., 1., 1.], dtype=float32)
  """
  return _learning_rate_hypergradient(True, learning_rate, hyper_optimizer, precond_dtype)


for _factory in (scalar_hypergradient, per_parameter_hypergradient):
  _factory.__doc__ = _factory.__doc__.replace("{hd_args}", _HD_ARGS.strip("\n"))
