"""Experiment groups for ``benchmarks/``: LRA as the authors' code fits it.

``psgd.lra`` fits ``Q = diag(d)(I + UVᵀ)`` (paper 002, Appendix D). The authors' PyTorch code
and the paper's ``Q = (I + UVᵀ)B`` put the diagonal on the right: ``Q = (I + UVᵀ)diag(d)``,
so the low-rank part refines the Jacobi-scaled problem. With ``D`` on the right its fit is
``d ← d − μ((Ph)⊙h − v⊙(P⁻¹v))⊙d``, and ``U``, ``V`` move on their groups by
``M = aaᵀ − bbᵀ`` (``a = Qh``, ``b = Q⁻ᵀv``) without the ``D`` conjugation of ours
(:class:`AuthorsOrderLRAGroup`). :class:`AuthorsCodeLRAGroup` adds the rest of the authors'
2022 ``UVd`` class (the code of paper 002's experiments), and :func:`demo_curvature` the
Hessian-vector products of its delayed-XOR demo. Not options of the library: the benchmarks
measure whether these differences matter (they did not, see BENCHMARKS.md), and this module
keeps those measurements repeatable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from psgd_optax._src import engine
from psgd_optax._src.groups.lra import LRAGroup, LRAState
from psgd_optax._src.normalize import lipschitz_step, norm, scale_pair


@dataclasses.dataclass(frozen=True)
class AuthorsOrderLRAGroup(LRAGroup):
  """``Q = (I + UVᵀ) diag(d)``: ``P g = D Aᵀ A D g`` with ``A = I + UVᵀ``."""

  def precondition(self, q: LRAState, g):
    scaled = q.d * g.reshape(-1)
    return (q.d * self._apply_a_transpose(q, self._apply_a(q, scaled))).reshape(g.shape)

  def update(self, q: LRAState, v, h, lr, *, integrate_probe: bool) -> LRAState:
    del integrate_probe
    h, v = h.reshape(-1), v.reshape(-1)
    fitted = self._apply_a(q, q.d * h)                           # a = Q h
    preconditioned_h = q.d * self._apply_a_transpose(q, fitted)  # P h
    probe = self._solve_a_transpose(q, v / q.d)                  # b = Q⁻ᵀ v
    small = jnp.eye(self.effective_rank, dtype=h.dtype) + q.v.T @ q.u
    # P⁻¹ v = D⁻¹ A⁻¹ b with A⁻¹ x = x − U (I + VᵀU)⁻¹ Vᵀ x.
    inverse_v = (probe - q.u @ jnp.linalg.solve(small, q.v.T @ probe)) / q.d
    unit, fitted, probe, preconditioned_h, h, v, inverse_v = scale_pair(
        fitted, probe, preconditioned_h, h, v, inverse_v)

    direction = preconditioned_h * h - v * inverse_v
    step_d, lipschitz_d = lipschitz_step(lr, q.lipschitz[0], jnp.max(jnp.abs(direction)),
                                         self.lipschitz_decay, unit)
    d = q.d - step_d * direction * q.d

    def move_u(_):
      grad = jnp.outer(fitted, q.v.T @ fitted) - jnp.outer(probe, q.v.T @ probe)
      bound = self._generator_norm(fitted, probe, q.v)
      step, lipschitz = lipschitz_step(lr, q.lipschitz[1], bound, self.lipschitz_decay, unit)
      return q.u - step * (grad @ small), q.v, q.lipschitz.at[1].set(lipschitz)

    def move_v(_):
      grad = jnp.outer(fitted, q.u.T @ fitted) - jnp.outer(probe, q.u.T @ probe)
      bound = self._generator_norm(fitted, probe, q.u)
      step, lipschitz = lipschitz_step(lr, q.lipschitz[2], bound, self.lipschitz_decay, unit)
      return q.u, q.v - step * (grad + q.v @ (q.u.T @ grad)), q.lipschitz.at[2].set(lipschitz)

    u, v_new, lipschitz = jax.lax.cond(q.fit_u > 0.5, move_u, move_v, None)
    u, v_new = self._balance(u, v_new)
    return LRAState(d=d, u=u, v=v_new, lipschitz=lipschitz.at[0].set(lipschitz_d),
                    fit_u=1.0 - q.fit_u)

  @staticmethod
  def _generator_norm(a, b, w):
    """A bound on ``‖(aaᵀ − bbᵀ)WWᵀ‖``, the norm of the step's generator (``W`` is the
    factor that stays): ``‖a‖‖WWᵀa‖ + ‖b‖‖WWᵀb‖``."""
    return norm(a) * norm(w @ (w.T @ a)) + norm(b) * norm(w @ (w.T @ b))

  def q_matrix(self, q: LRAState) -> jax.Array:
    return (jnp.eye(self.size, dtype=q.d.dtype) + q.u @ q.v.T) * q.d[None, :]


@dataclasses.dataclass(frozen=True)
class AuthorsCodeLRAGroup(AuthorsOrderLRAGroup):
  """The authors' 2022 ``UVd`` class (the code of paper 002's experiments) as far as it
  differs from :class:`AuthorsOrderLRAGroup`: ``U`` and ``V`` drawn 10× larger (entries
  ``N(0, 1/(n·r))``, so ``UVᵀ`` starts 100× further from 0), and each factor step normalized
  by the exact Frobenius norm of its generator instead of a bound (with
  ``lipschitz_decay=0``; ``d``'s step already is ``max|∇_d|``)."""

  def init(self, scale, dtype) -> LRAState:
    q = super().init(scale, dtype)
    return q._replace(u=10.0 * q.u, v=10.0 * q.v)

  @staticmethod
  def _generator_norm(a, b, w):
    # ‖a(WWᵀa)ᵀ − b(WWᵀb)ᵀ‖_F² = ‖a‖²‖WWᵀa‖² + ‖b‖²‖WWᵀb‖² − 2(aᵀb)(WWᵀa)ᵀ(WWᵀb).
    wa, wb = w @ (w.T @ a), w @ (w.T @ b)
    square = (jnp.dot(a, a) * jnp.dot(wa, wa) + jnp.dot(b, b) * jnp.dot(wb, wb)
              - 2.0 * jnp.dot(a, b) * jnp.dot(wa, wb))
    return jnp.sqrt(jnp.abs(square))


def lra_authors_order(*, rank: int = 10, lipschitz_decay: float = 0.9, authors_code=False,
                      **options):
  """``psgd.lra``'s options on :class:`AuthorsOrderLRAGroup` (on
  :class:`AuthorsCodeLRAGroup` with ``authors_code=True``)."""
  group_class = AuthorsCodeLRAGroup if authors_code else AuthorsOrderLRAGroup
  def group_for_shape(shape, state_leaves=None):
    effective = rank if state_leaves is None else state_leaves[2].shape[-1]
    return group_class(tuple(shape), int(effective), lipschitz_decay)
  return engine.preconditioner(group_for_shape, **options)


class _DemoCurvatureState(NamedTuple):
  count: jax.Array
  inner: Any


def demo_curvature(inner, exact_steps: int = 1000, seed: int = 1):
  """``inner`` (a Newton-type transformation of flat params) fitted to the pairs of the
  authors' delayed-XOR demo: exact Hessian-vector products for ``exact_steps`` steps, then
  forward differences ``(∇f(θ + δv) − ∇f(θ))/δ`` at ``δ = √eps`` (the demo sets
  ``exact_hessian_vector_product = False`` after its first 1000 iterations). Passes the pair
  as ``hvp=``/``vector=``; needs ``value_fn=`` and a gradient that is ``∇f(θ)``."""

  def init(params):
    return _DemoCurvatureState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None, *, value_fn, **extra_args):
    vector = jax.random.normal(jax.random.fold_in(jax.random.key(seed), state.count),
                               params.shape, params.dtype)
    gradient = jax.grad(value_fn)
    delta = float(jnp.finfo(params.dtype).eps) ** 0.5
    hvp = jax.lax.cond(
        state.count < exact_steps,
        lambda: jax.jvp(gradient, (params,), (vector,))[1],
        lambda: (gradient(params + delta * vector) - updates) / delta)
    updates, inner_state = inner.update(updates, state.inner, params, hvp=hvp,
                                        vector=vector, **extra_args)
    return updates, _DemoCurvatureState(optax.safe_increment(state.count), inner_state)

  return optax.GradientTransformationExtraArgs(init, update)
