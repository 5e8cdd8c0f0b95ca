r"""Where the curvature pair ``(v, h)`` that ``Q`` is fitted to comes from.

``"whitening"`` (Fisher type, Li 2019 §3.2)
  ``h = g + damping term`` with ``v ~ N(0, I)`` independent of ``g``: ``P`` converges to
  ``(E[ggᵀ] + λ²I)^{-1/2}``. ``v`` is independent of ``g``, so the ``E[vvᵀ]`` term of the
  fit may be integrated out exactly.
``"newton"`` (Li 2019 §3.1)
  ``h = H v`` with ``v ~ N(0, I)``: ``P → |H|⁻¹``. Either the transformation computes
  the Hessian-vector product itself from a ``value_fn=`` extra argument,
  ``jax.jvp(jax.grad(value_fn), (params,), (v,))``, only on steps that fit ``Q``; or the
  caller supplies ``hvp=`` together with the ``vector=`` it was taken along. The probe is
  kept explicit in the fit: on a quadratic with ``P = H⁻¹`` each pair then fits exactly,
  which is what lets the fit converge to machine precision.
``"finite_difference"`` (Li 2018 §II.A)
  ``h = (∇f(θ + δv) − ∇f(θ − δv)) / 2δ`` from two reverse-mode gradients of ``value_fn``
  on fitting steps, with ``δ = eps^{1/3}`` of the params' dtype. For losses whose second
  derivative JAX cannot take (``jax.custom_vjp``, some custom kernels). The central
  difference costs the same two gradients as the forward one, ``(∇f(θ + δv) − ∇f(θ))/δ``
  at ``δ = √eps``, and is about ten times more accurate (relative error ~1e-4 rather than
  ~1e-3 in float32). ``v`` is the perturbation actually representable,
  ``((θ + δv) − (θ − δv))/2δ``, so rounding of ``θ ± δv`` does not bias the pair.
``"secant"`` (the BFGS-like pairs of Li et al. 2023)
  ``v = θ_t − θ_{t−1}`` and ``h = g_t − g_{t−1}`` from the previous step's params and
  gradients, kept in the state. No extra gradient, no ``value_fn``; the first step has
  no pair and does not fit. The pairs are not isotropic, so ``P`` fits the curvature
  along the directions the optimizer actually moves.

A source has ``init(params, dtype)`` (its memory, ``()`` for most),
``remember(memory, grads, params, treedef, dtype)`` (called every step, fitting or not),
``check_args(params, extra_args)`` (clear errors before tracing) and
``pair(probes, grads, params, treedef, extra_args, memory, dtype)`` (called on fitting steps
only, inside ``lax.cond``; it returns the undamped pair). The engine draws the probes:
``probes()`` gives them leaf by leaf, in the params' layout, for the sources that need them
(a Hessian-vector product along them, a finite difference); a source that pairs with the
engine's probes or with the gradient itself says so with ``None`` and the engine uses the
arrays it already holds. ``output_rms_bound`` is the largest RMS a unit's ``P g`` may have
(whitening only, see :class:`Whitening`).

Damping (Li 2018 §III.C), added to every source's ``h`` (``damping_type``); the engine
applies it per unit inside the fit (:meth:`Damping.apply`), so a stack's units share one
traced copy of it:

``"relative"`` (default)
  ``h + λ·rms(h)·v``: means the same thing at every gradient scale.
``"traditional"``
  ``h + λ·v``: fits ``|H + λI|⁻¹`` (Newton), well suited to convex problems.
``"nonconvex"``
  ``h + λ·v′`` with ``v′ ~ N(0, I)`` independent of ``v``: fits
  ``(H² + λ²I)^{-1/2}``, whose eigenvalues never exceed ``1/λ`` whatever the signs of
  ``H``'s eigenvalues (the paper's non-convexity-compatible damping).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psgd_optax._src.normalize import rms
from psgd_optax._src.sharding import like
from psgd_optax._src.trees import all_finite

CURVATURES = ("whitening", "newton", "finite_difference", "secant")
DAMPING_TYPES = ("relative", "traditional", "nonconvex")


@dataclasses.dataclass(frozen=True)
class CurvaturePair:
  """Per-leaf probe vectors ``v`` and curvature products ``h`` (lists in leaf order).

  Attributes:
    vectors: the probes ``v``; ``None`` when they are the engine's own probes, which it
      already holds stacked.
    products: ``h``, the curvature applied to ``v``, before damping; ``None`` when ``h`` is
      the (averaged) gradient itself, which the engine already holds stacked.
    integrate_probe: whether the fit may replace ``vvᵀ`` by its expectation ``I``.
    valid: a boolean scalar; ``False`` when there is no pair this step (e.g. the first
      step of ``"secant"``), so ``Q`` must not move.
  """

  vectors: Sequence[jax.Array]
  products: Sequence[jax.Array] | None
  integrate_probe: bool
  valid: Any = True


class SecantMemory(NamedTuple):
  """The previous step's params and gradients (params-shaped, ``precond_dtype``).

  Example:
    >>> import jax.numpy as jnp
    >>> import psgd_optax as psgd
    >>> memory = psgd.kron(curvature="secant").init({"w": jnp.zeros(3)}).curvature
    >>> type(memory).__name__, bool(memory.has_previous)
    ('SecantMemory', False)
  """

  params: Any
  grads: Any
  has_previous: jax.Array


@dataclasses.dataclass(frozen=True)
class Damping:
  """Adds ``λ·rms(h)·v``, ``λ·v`` or ``λ·v′`` to every product (see the module doc)."""

  strength: Any = 0.0
  kind: str = "relative"

  def apply(self, v, h, key):
    """One unit's damped product. ``"nonconvex"`` draws its independent ``v′`` from
    ``key``; the other kinds ignore it."""
    strength = jnp.asarray(self.strength, h.dtype)
    if self.kind == "nonconvex":
      return h + strength * jax.random.normal(key, h.shape, h.dtype)
    if self.kind == "traditional":
      return h + strength * v
    return h + strength * rms(h) * v


class _Stateless:
  """Sources that remember nothing between steps."""

  output_rms_bound = None

  def init(self, params, dtype):
    del params, dtype
    return ()

  def remember(self, memory, grads, params, treedef, dtype):
    del grads, params, treedef, dtype
    return memory


@dataclasses.dataclass(frozen=True)
class Whitening(_Stateless):
  """Gradient-whitening pairs ``(v, g + damping)`` with the engine's probes ``v``.

  At the fit's fixed point ``P E[ggᵀ] P = E[vvᵀ]``, so ``E‖P g‖² = E‖v‖²``: the whitened
  gradient has unit RMS. A unit whose ``P g`` has an RMS above ``output_rms_bound = 2`` is
  preconditioned by a ``P`` that has not yet followed a jump in the gradients' scale (the
  fit follows one at its normalized pace, ``log(jump)/log(1 + precond_lr)`` fits), so
  the engine scales that ``P g`` back to RMS 2 (the reference implementation's
  ``grad_clip_max_amp=2`` of its whitening optimizers).
  """

  name: str = "whitening"
  output_rms_bound = 2.0

  def check_args(self, params, extra_args) -> None:
    del params, extra_args

  def pair(self, probes, grads, params, treedef, extra_args, memory, dtype) -> CurvaturePair:
    del probes, grads, params, treedef, extra_args, memory, dtype
    # v: the engine's probes, independent of g; h: the gradient itself.
    return CurvaturePair(None, None, integrate_probe=True)


def _check_value_fn(name, params, value_fn) -> None:
  if value_fn is not None and not callable(value_fn):
    raise ValueError(f"value_fn must be callable, got {value_fn!r}.")
  if value_fn is not None and params is None:
    raise ValueError(f"curvature={name!r} with value_fn= needs params: call "
                     "update(grads, state, params, value_fn=...).")


@dataclasses.dataclass(frozen=True)
class Newton(_Stateless):
  """Hessian-vector-product pairs ``(v, Hv)``: along the engine's probes from ``value_fn``,
  or the caller's ``(vector, hvp)``."""

  name: str = "newton"

  def check_args(self, params, extra_args) -> None:
    value_fn = extra_args.get("value_fn")
    hvp, vector = extra_args.get("hvp"), extra_args.get("vector")
    if (hvp is None) != (vector is None):
      raise ValueError(
          "curvature='newton' with a caller-supplied product needs both hvp= (the "
          "Hessian-vector product) and vector= (the vector it was taken along); got "
          f"hvp={'given' if hvp is not None else None}, "
          f"vector={'given' if vector is not None else None}.")
    if value_fn is None and hvp is None:
      raise ValueError(
          "curvature='newton' needs curvature information at every update: pass "
          "value_fn= (a function of the params returning the scalar loss; the "
          "transformation computes Hessian-vector products on preconditioner-update "
          "steps only) or hvp= together with vector= (a product you computed).")
    if hvp is None:
      _check_value_fn(self.name, params, value_fn)

  def pair(self, probes, grads, params, treedef, extra_args, memory, dtype) -> CurvaturePair:
    del grads, memory
    hvp = extra_args.get("hvp")
    if hvp is not None:
      vectors = [jnp.asarray(v, dtype) for v in treedef.flatten_up_to(extra_args["vector"])]
      products = [jnp.asarray(h, dtype) for h in treedef.flatten_up_to(hvp)]
      return CurvaturePair(vectors, products, integrate_probe=False)
    param_leaves = treedef.flatten_up_to(params)
    tangents = [v.astype(p.dtype) for v, p in zip(probes(), param_leaves)]
    try:
      _, hvp_tree = jax.jvp(jax.grad(extra_args["value_fn"]), (params,),
                            (jax.tree.unflatten(treedef, tangents),))
    except (TypeError, ValueError, NotImplementedError) as error:
      if "jvp" not in str(error).lower():
        raise
      raise ValueError(
          "curvature='newton' cannot differentiate value_fn twice (forward over "
          "reverse): part of it, e.g. a jax.custom_vjp function or a callback, has no "
          f"forward-mode derivative ({str(error).splitlines()[0]}). Use "
          "curvature='finite_difference' (two gradients per fit, no second "
          "derivative) or pass hvp= and vector= yourself.") from error
    products = [h.astype(dtype) for h in treedef.flatten_up_to(hvp_tree)]
    # Where the params' dtype holds the probes exactly, the tangents are the probes the
    # engine already holds; otherwise (bfloat16 params) the rounded tangents are the pair.
    exact = all(jnp.promote_types(p.dtype, dtype) == p.dtype for p in param_leaves)
    vectors = None if exact else [t.astype(dtype) for t in tangents]
    return CurvaturePair(vectors, products, integrate_probe=False)


@dataclasses.dataclass(frozen=True)
class FiniteDifference(_Stateless):
  """``(v, (∇f(θ + δv) − ∇f(θ − δv))/2δ)`` with ``δ = eps^{1/3}`` of the params' dtype."""

  name: str = "finite_difference"

  def check_args(self, params, extra_args) -> None:
    value_fn = extra_args.get("value_fn")
    if value_fn is None:
      raise ValueError(
          "curvature='finite_difference' needs value_fn= (a function of the params "
          "returning the scalar loss): the transformation differences two of its "
          "gradients on preconditioner-update steps.")
    _check_value_fn(self.name, params, value_fn)

  def pair(self, probes, grads, params, treedef, extra_args, memory, dtype) -> CurvaturePair:
    del grads, memory
    param_leaves = treedef.flatten_up_to(params)
    probes = probes()
    # Central differences at δ = eps^{1/3}: error O(δ²) + O(eps/δ) ≈ eps^{2/3} for the same
    # two gradients a forward difference needs (whose best is ≈ eps^{1/2}: about 1e-3
    # relative in float32, too close to the tolerance users need).
    deltas = [jnp.asarray(float(jnp.finfo(leaf.dtype).eps) ** (1 / 3), leaf.dtype)
              for leaf in param_leaves]
    shifts = [delta * probe.astype(leaf.dtype)
              for leaf, delta, probe in zip(param_leaves, deltas, probes)]
    ahead = [leaf + shift for leaf, shift in zip(param_leaves, shifts)]
    behind = [leaf - shift for leaf, shift in zip(param_leaves, shifts)]
    vectors = [((forward - backward) / (2 * delta)).astype(dtype)
               for forward, backward, delta in zip(ahead, behind, deltas)]
    gradient = jax.grad(extra_args["value_fn"])
    at_ahead = treedef.flatten_up_to(gradient(treedef.unflatten(ahead)))
    at_behind = treedef.flatten_up_to(gradient(treedef.unflatten(behind)))
    products = [(a.astype(dtype) - b.astype(dtype)) / (2 * delta.astype(dtype))
                for a, b, delta in zip(at_ahead, at_behind, deltas)]
    return CurvaturePair(vectors, products, integrate_probe=False)


@dataclasses.dataclass(frozen=True)
class Secant:
  """``(θ_t − θ_{t−1}, g_t − g_{t−1})`` from the last step with finite params and
  gradients, kept in the state (a step with non-finite ones is not remembered)."""

  name: str = "secant"
  output_rms_bound = None

  def check_args(self, params, extra_args) -> None:
    del extra_args
    if params is None:
      raise ValueError("curvature='secant' needs params at every update: call "
                       "update(grads, state, params).")

  def init(self, params, dtype):
    zeros = jax.tree.map(lambda p: like(jnp.zeros(p.shape, dtype), p), params)
    return SecantMemory(params=zeros, grads=zeros, has_previous=jnp.asarray(False))

  def remember(self, memory, grads, params, treedef, dtype):
    new = SecantMemory(
        params=treedef.unflatten([p.astype(dtype) for p in treedef.flatten_up_to(params)]),
        grads=treedef.unflatten([g.astype(dtype) for g in grads]),
        has_previous=jnp.asarray(True))
    finite = all_finite([new.params, new.grads])
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, memory)

  def pair(self, probes, grads, params, treedef, extra_args, memory, dtype) -> CurvaturePair:
    del probes, extra_args
    param_leaves = treedef.flatten_up_to(params)
    vectors = [p.astype(dtype) - q for p, q in
               zip(param_leaves, treedef.flatten_up_to(memory.params))]
    products = [g - q for g, q in zip(grads, treedef.flatten_up_to(memory.grads))]
    return CurvaturePair(vectors, products, integrate_probe=False, valid=memory.has_previous)


_SOURCES = {"whitening": Whitening, "newton": Newton,
            "finite_difference": FiniteDifference, "secant": Secant}
_DEFAULT_DAMPING = {"whitening": 1e-6}


def make_curvature(name: str):
  """The curvature source called ``name``."""
  if name not in _SOURCES:
    raise ValueError(f"curvature must be one of {CURVATURES}, got {name!r}.")
  return _SOURCES[name]()


def make_damping(curvature: str, damping, damping_type: str = "relative") -> Damping:
  """The damping of ``curvature``'s pairs; ``damping=None`` picks its default (relative
  1e-6 for whitening, 0 otherwise)."""
  if damping_type not in DAMPING_TYPES:
    raise ValueError(f"damping_type must be one of {DAMPING_TYPES}, got {damping_type!r}.")
  strength = _DEFAULT_DAMPING.get(curvature, 0.0) if damping is None else damping
  return Damping(strength, damping_type)


# The whitening fit tracks gradient statistics that move as a model trains; a large step
# keeps up (byte GPT, 200 steps: 2.56 -> 2.02 nats/byte from 0.1 to 0.5; digits CNN test
# error 2.44 -> 1.70 %). Curvature pairs are noisier: there 0.5 raised the fit's noise floor
# (notebooks) and lost on the GPT (Newton type at lr 0.1: 3.24 at 0.1, 4.71 at 0.5).
_DEFAULT_PRECOND_LR = {"whitening": 0.5}


def default_precond_lr(curvature: str, precond_lr):
  """``precond_lr``, or for ``None`` the default of ``curvature`` (0.5 whitening, else 0.1)."""
  return _DEFAULT_PRECOND_LR.get(curvature, 0.1) if precond_lr is None else precond_lr
