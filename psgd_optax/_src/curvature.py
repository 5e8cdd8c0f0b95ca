r"""Where the curvature pair ``(v, h)`` that ``Q`` is fitted to comes from.

``"whitening"`` (Fisher type, Li 2019 §3.2)
  ``h = g + λ·rms(g)·v`` with ``v ~ N(0, I)``: ``P`` converges to
  ``(E[ggᵀ] + λ²rms²I)^{-1/2}``. The damping is *relative* to the gradient's RMS so that
  it means the same thing at every gradient scale. ``v`` is independent of ``g``, so the
  ``E[vvᵀ]`` term of the fit may be integrated out exactly.
``"newton"`` (Li 2019 §3.1)
  ``h = H v`` with ``v ~ N(0, I)``: ``P → |H|⁻¹``. Either the transformation computes
  the Hessian-vector product itself from a ``value_fn=`` extra argument,
  ``jax.jvp(jax.grad(value_fn), (params,), (v,))``, only on steps that fit ``Q``; or the
  caller supplies ``hvp=`` together with the ``vector=`` it was taken along. The probe is
  kept explicit in the fit: on a quadratic with ``P = H⁻¹`` each pair then fits exactly,
  which is what lets the fit converge to machine precision.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

CURVATURES = ("whitening", "newton")


@dataclasses.dataclass(frozen=True)
class CurvaturePair:
  """Per-leaf probe vectors ``v`` and curvature products ``h`` (lists in leaf order).

  Attributes:
    vectors: the probes ``v``.
    products: ``h``, the curvature applied to ``v`` (or the damped gradient).
    integrate_probe: whether the fit may replace ``vvᵀ`` by its expectation ``I``.
  """

  vectors: Sequence[jax.Array]
  products: Sequence[jax.Array]
  integrate_probe: bool


def _rms(x: jax.Array) -> jax.Array:
  scale = jnp.max(jnp.abs(x))
  safe = jnp.where(scale > 0, scale, 1.0)
  return safe * jnp.sqrt(jnp.mean(jnp.square(x / safe)))


def _probe_leaves(key, leaves, dtype):
  return [jax.random.normal(jax.random.fold_in(key, i), leaf.shape, dtype)
          for i, leaf in enumerate(leaves)]


@dataclasses.dataclass(frozen=True)
class Whitening:
  """Gradient-whitening pairs ``(v, g + λ·rms(g)·v)``."""

  damping: Any = 1e-6
  name: str = "whitening"

  def check_args(self, params, extra_args) -> None:
    del params, extra_args

  def pair(self, key, grads, params, treedef, dtype, extra_args) -> CurvaturePair:
    del params, treedef, extra_args
    probes = _probe_leaves(key, grads, dtype)
    products = [g + self.damping * _rms(g) * v for g, v in zip(grads, probes)]
    return CurvaturePair(probes, products, integrate_probe=True)


@dataclasses.dataclass(frozen=True)
class Newton:
  """Hessian-vector-product pairs ``(v, Hv + λ·rms(Hv)·v)`` (λ = ``damping``, default 0)."""

  damping: Any = 0.0
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
    if hvp is None and params is None:
      raise ValueError(
          "curvature='newton' with value_fn= needs params: call "
          "update(grads, state, params, value_fn=...).")
    if value_fn is not None and not callable(value_fn):
      raise ValueError(f"value_fn must be callable, got {value_fn!r}.")

  def pair(self, key, grads, params, treedef, dtype, extra_args) -> CurvaturePair:
    hvp = extra_args.get("hvp")
    if hvp is not None:
      vectors = [jnp.asarray(v, dtype) for v in treedef.flatten_up_to(extra_args["vector"])]
      products = [jnp.asarray(h, dtype) for h in treedef.flatten_up_to(hvp)]
    else:
      param_leaves = treedef.flatten_up_to(params)
      probes = _probe_leaves(key, param_leaves, dtype)
      tangents = [v.astype(p.dtype) for v, p in zip(probes, param_leaves)]
      value_fn: Callable = extra_args["value_fn"]
      _, hvp_tree = jax.jvp(jax.grad(value_fn), (params,),
                            (jax.tree.unflatten(treedef, tangents),))
      vectors = [t.astype(dtype) for t in tangents]
      products = [h.astype(dtype) for h in treedef.flatten_up_to(hvp_tree)]
    products = [h + self.damping * _rms(h) * v for h, v in zip(products, vectors)]
    return CurvaturePair(vectors, products, integrate_probe=False)


def make_curvature(name: str, damping):
  """The curvature source called ``name``; ``damping=None`` picks its default."""
  sources = {"whitening": Whitening, "newton": Newton}
  if name not in sources:
    raise ValueError(f"curvature must be one of {CURVATURES}, got {name!r}.")
  source = sources[name]
  return source() if damping is None else source(damping=damping)
