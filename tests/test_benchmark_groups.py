"""The benchmarks' experiment groups are what they claim to be: one fit of
``AuthorsCodeLRAGroup`` equals the 2022 reference's ``UVd`` update as written in its equations
(a float64 NumPy transcription here), and the demo's forward-difference pairs match exact
Hessian-vector products on a quadratic."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from _lra_authors_order import AuthorsCodeLRAGroup, demo_curvature  # noqa: E402

from psgd_optax._src.groups.lra import LRAState  # noqa: E402


def _reference_fit(u, v_factor, d, v, h, step, move_u):
  """One fit of ``Q = (I + UVᵀ)diag(d)`` to ``(v, h)``: ``d`` by ``(Ph)⊙h − v⊙(P⁻¹v)``
  normalized by its largest entry, then ``U`` (or ``V``) along ``(aaᵀ − bbᵀ)V`` (or ``U``)
  normalized by the Frobenius norm of the generator it adds to ``Q``."""
  r = u.shape[1]
  a = d * h + u @ (v_factor.T @ (d * h))                      # Q h
  ph = d * (a + v_factor @ (u.T @ a))                          # P h
  small = np.eye(r) + v_factor.T @ u
  b = v / d - v_factor @ np.linalg.solve(small.T, u.T @ (v / d))  # Q⁻ᵀ v
  inverse_pv = (b - u @ np.linalg.solve(small, v_factor.T @ b)) / d
  grad_d = ph * h - v * inverse_pv
  d_new = d - step / np.max(np.abs(grad_d)) * d * grad_d
  if move_u:
    grad = np.outer(a, a @ v_factor) - np.outer(b, b @ v_factor)
    mu = step / np.linalg.norm(grad @ v_factor.T)
    return u - mu * grad @ small, v_factor, d_new
  grad = np.outer(a, a @ u) - np.outer(b, b @ u)
  mu = step / np.linalg.norm(u @ grad.T)
  return u, v_factor - mu * (grad + v_factor @ (u.T @ grad)), d_new


def test_authors_code_group_is_the_reference_fit():
  n, r, step = 12, 3, 0.01
  rng = np.random.default_rng(0)
  u, v_factor = 0.3 * rng.normal(size=(n, r)), 0.3 * rng.normal(size=(n, r))
  d = np.exp(0.2 * rng.normal(size=n))
  root = rng.normal(size=(n, n))
  v = rng.normal(size=n)
  h = (root @ root.T + np.eye(n)) @ v
  group = AuthorsCodeLRAGroup((n,), r, 0.0)  # lipschitz_decay 0: each step on its own
  with jax.enable_x64(True):
    for move_u in (True, False):
      q = LRAState(d=jnp.asarray(d), u=jnp.asarray(u), v=jnp.asarray(v_factor),
                   lipschitz=jnp.zeros(3), fit_u=jnp.asarray(float(move_u)))
      fitted = group.update(q, jnp.asarray(v), jnp.asarray(h), step, integrate_probe=False)
      u_ref, v_ref, d_ref = _reference_fit(u, v_factor, d, v, h, step, move_u)
      # The group rebalances U and V after the step (UVᵀ unchanged): compare UVᵀ and d.
      moved = np.abs(u_ref @ v_ref.T - u @ v_factor.T).max()
      assert moved > 1e-3  # the fit does move the low-rank part
      np.testing.assert_allclose(np.asarray(fitted.u @ fitted.v.T), u_ref @ v_ref.T,
                                 rtol=0, atol=1e-12)
      np.testing.assert_allclose(np.asarray(fitted.d), d_ref, rtol=1e-12)
  # U and V start with columns of norm about 1/√r (entries N(0, 1/(n·r))), as the reference's.
  start = AuthorsCodeLRAGroup((400,), 4, 0.0).init(1.0, jnp.float32)
  np.testing.assert_allclose(float(jnp.mean(jnp.linalg.norm(start.u, axis=0))), 0.5, rtol=0.1)


def test_demo_curvature_pairs_are_hessian_vector_products():
  """Exact products for the first steps, forward differences after: on a quadratic both
  are ``H v`` (to the difference's rounding), and the inner transformation receives them."""
  n = 6
  root = np.random.default_rng(1).normal(size=(n, n))
  hessian = jnp.asarray(root @ root.T + np.eye(n), jnp.float32)
  value_fn = lambda x: 0.5 * x @ hessian @ x
  seen = []

  def record(updates, state, params=None, *, hvp, vector, **extra_args):
    seen.append(jnp.linalg.norm(hvp - hessian @ vector) / jnp.linalg.norm(hessian @ vector))
    return updates, state

  tx = demo_curvature(optax.GradientTransformationExtraArgs(lambda p: (), record),
                      exact_steps=1)
  params = jnp.ones(n, jnp.float32)
  state = tx.init(params)
  for _ in range(2):
    _, state = tx.update(hessian @ params, state, params, value_fn=value_fn)
  assert int(state.count) == 2
  assert float(seen[0]) < 1e-6   # exact
  assert float(seen[1]) < 1e-2   # forward difference at δ = √eps in float32
