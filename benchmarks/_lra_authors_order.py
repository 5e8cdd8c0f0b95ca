"""An experiment group for ``benchmarks/``: LRA with the authors' code's factor order.

``psgd.lra`` fits ``Q = diag(d)(I + UVᵀ)`` (paper 002, Appendix D). The authors' PyTorch code
and the paper's ``Q = (I + UVᵀ)B`` put the diagonal on the right: ``Q = (I + UVᵀ)diag(d)``,
so the low-rank part refines the Jacobi-scaled problem. With ``D`` on the right its fit is
``d ← d − μ((Ph)⊙h − v⊙(P⁻¹v))⊙d``, and ``U``, ``V`` move on their groups by
``M = aaᵀ − bbᵀ`` (``a = Qh``, ``b = Q⁻ᵀv``) without the ``D`` conjugation of ours. Not an
option of the library: the benchmarks measure whether the order matters (it did not, see
BENCHMARKS.md), and this module keeps that measurement repeatable.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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
      bound = (norm(fitted) * norm(q.v @ (q.v.T @ fitted))
               + norm(probe) * norm(q.v @ (q.v.T @ probe)))
      step, lipschitz = lipschitz_step(lr, q.lipschitz[1], bound, self.lipschitz_decay, unit)
      return q.u - step * (grad @ small), q.v, q.lipschitz.at[1].set(lipschitz)

    def move_v(_):
      grad = jnp.outer(fitted, q.u.T @ fitted) - jnp.outer(probe, q.u.T @ probe)
      bound = (norm(q.u @ (q.u.T @ fitted)) * norm(fitted)
               + norm(q.u @ (q.u.T @ probe)) * norm(probe))
      step, lipschitz = lipschitz_step(lr, q.lipschitz[2], bound, self.lipschitz_decay, unit)
      return q.u, q.v - step * (grad + q.v @ (q.u.T @ grad)), q.lipschitz.at[2].set(lipschitz)

    u, v_new, lipschitz = jax.lax.cond(q.fit_u > 0.5, move_u, move_v, None)
    u, v_new = self._balance(u, v_new)
    return LRAState(d=d, u=u, v=v_new, lipschitz=lipschitz.at[0].set(lipschitz_d),
                    fit_u=1.0 - q.fit_u)

  def q_matrix(self, q: LRAState) -> jax.Array:
    return (jnp.eye(self.size, dtype=q.d.dtype) + q.u @ q.v.T) * q.d[None, :]


def lra_authors_order(*, rank: int = 10, lipschitz_decay: float = 0.9, **options):
  """``psgd.lra``'s options on :class:`AuthorsOrderLRAGroup`."""
  def group_for_shape(shape, state_leaves=None):
    effective = rank if state_leaves is None else state_leaves[2].shape[-1]
    return AuthorsOrderLRAGroup(tuple(shape), int(effective), lipschitz_decay)
  return engine.preconditioner(group_for_shape, **options)
