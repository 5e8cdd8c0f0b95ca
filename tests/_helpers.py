"""Shared test fixtures: matrices with known spectra, fit-error measures, fitting loops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import psgd_optax as psgd


def random_symmetric(n, eigenvalues, rng):
  basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return (basis * np.asarray(eigenvalues, float)) @ basis.T


def random_spd(n, cond, rng):
  return random_symmetric(n, np.geomspace(1.0, cond, n), rng)


def single_leaf(state_entries):
  """The one unit's entry of a PSGD state field (``state.preconditioner`` or
  ``state.scale_set``) built for a single array: one stack of one member."""
  (entry,) = state_entries
  return jax.tree.map(lambda a: a[0], entry)


scale_set_per_leaf = psgd.scale_set_per_leaf


def matrix_abs(h):
  w, v = np.linalg.eigh(h)
  return (v * np.abs(w)) @ v.T


def matrix_sqrt(h):
  w, v = np.linalg.eigh(h)
  return (v * np.sqrt(w)) @ v.T


def fit_error(p, target_inverse):
  """‖P T − I‖_F / √n: how far P is from T⁻¹."""
  n = p.shape[0]
  return float(np.linalg.norm(np.asarray(p, np.float64) @ target_inverse - np.eye(n)) / np.sqrt(n))


def newton_fit(tx, group, hessian, shape, steps, chunk=100):
  """Fits ``tx`` (Newton type) to the quadratic ``½xᵀHx`` with the library's own probes.

  Returns the fit errors ``‖P|H| − I‖/√n`` after every ``chunk`` updates and the final
  state. Run under ``jax.enable_x64(True)`` for float64.
  """
  hessian = jnp.asarray(hessian)
  loss = lambda x: 0.5 * x.reshape(-1) @ (hessian @ x.reshape(-1))
  x = jnp.zeros(shape, hessian.dtype)

  @jax.jit
  def run_chunk(state):
    body = lambda _, s: tx.update(jnp.zeros_like(x), s, x, value_fn=loss)[1]
    return jax.lax.fori_loop(0, chunk, body, state)

  state = tx.init(x)
  target = matrix_abs(np.asarray(hessian))
  errors = []
  for _ in range(steps // chunk):
    state = run_chunk(state)
    errors.append(fit_error(group.materialize(single_leaf(state.preconditioner)), target))
  return errors, state


def minimize(tx, loss, params, steps):
  """``steps`` jitted steps of ``tx`` on the gradient of ``loss``; the final params."""
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  return params
