"""The fit converges to the papers' targets: P → |H|⁻¹ (Newton) and P → C^{-1/2} (whitening).

Update counts and tolerances reached (float64, 2 cores), asserted below:

| group | H | geometry | precond_lr | ‖P|H| − I‖/√n < 1e-6 after |
|---|---|---|---|---|
| kron (4×5) | SPD, cond 900 | q0.5eq1.5 | 0.5 | ~100 updates |
| kron (4×5) | SPD, cond 900 | quad | 0.3 | ~200 |
| kron (4×5) | SPD, cond 900 | eq | 1.0 | ~900 |
| kron (5×5) | indefinite, cond 1200, exact-moment probes | q0.5eq1.5 / quad | 0.2 / 0.1 | < 250 |
| dense (n=20) | SPD, cond 100 | q0.5eq1.5 / quad | 0.5 / 0.25 | ~1000 / ~1600 |
| dense (n=20) | SPD, cond 100 | eq | 1.0 | ~8000 (slowest; asserted within 10000) |
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd_optax as psgd
from _helpers import (fit_error, matrix_abs, matrix_sqrt, newton_fit, random_spd,
                      random_symmetric, single_leaf)


def _newton_fit(family, group, hessian, shape, steps, chunk=100, **options):
  """Fit errors per chunk of a ``family`` fitted in float64 to a fixed quadratic."""
  tx = family(curvature="newton", update_probability=1.0, precond_dtype=jnp.float64, **options)
  return newton_fit(tx, group, hessian, shape, steps, chunk)[0]


def _first_below(errors, tol, chunk=100):
  return next(((i + 1) * chunk for i, e in enumerate(errors) if e < tol), None)


@pytest.mark.parametrize("geometry,lr", [("q0.5eq1.5", 0.5), ("quad", 0.3), ("eq", 1.0)])
def test_kron_newton_converges_to_inverse_hessian(geometry, lr):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    hessian = np.kron(random_spd(4, 30, rng), random_spd(5, 30, rng))
    assert np.linalg.cond(hessian) >= 100
    group = psgd.kron_group((4, 5), geometry=geometry)
    errors = _newton_fit(psgd.kron, group, hessian, (4, 5), 2000, geometry=geometry,
                         precond_lr=lr)
    print(f"kron {geometry}: < 1e-6 after {_first_below(errors, 1e-6)} updates, "
          f"final {errors[-1]:.1e}")
    assert errors[-1] < 1e-6


@pytest.mark.parametrize("geometry,lr,steps", [("q0.5eq1.5", 0.5, 2000), ("quad", 0.25, 2000),
                                               ("eq", 1.0, 10000)])
def test_dense_newton_converges_to_inverse_hessian(geometry, lr, steps):
  with jax.enable_x64(True):
    hessian = random_spd(20, 100, np.random.default_rng(1))
    group = psgd.dense_group((20,), geometry=geometry)
    errors = _newton_fit(psgd.dense, group, hessian, (20,), steps, chunk=500,
                         geometry=geometry, precond_lr=lr)
    print(f"dense {geometry}: < 1e-6 after {_first_below(errors, 1e-6, 500)} updates")
    assert errors[-1] < 1e-6


def test_diag_newton_converges_on_diagonal_hessian():
  with jax.enable_x64(True):
    hessian = np.diag(np.array([-50.0, 0.1, 3.0, 1e3, -2.0]))
    errors = _newton_fit(psgd.diag, psgd.diag_group((5,)), hessian, (5,), 1000,
                         precond_lr=0.5)
    assert errors[-1] < 1e-6


def _exact_moment_fit(geometry, lr, hessian, n, steps):
  """Feeds caller-made pairs whose probes V are √n·(random orthogonal): V Vᵀ = Vᵀ V = n I.

  For an indefinite H a Gaussian pair never fits exactly (S v vᵀ S ≠ v vᵀ with S = sign H),
  so sampling noise hides the fixed point; these probes have the exact second moments the
  Kronecker fit uses, which isolates the fixed point and its stability.
  """
  tx = psgd.kron(curvature="newton", update_probability=1.0, precond_lr=lr,
                 geometry=geometry, precond_dtype=jnp.float64)
  hessian = jnp.asarray(hessian)
  x = jnp.zeros((n, n), jnp.float64)

  def body(i, state):
    basis, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(i), (n, n), jnp.float64))
    vector = basis * jnp.sqrt(float(n))
    hvp = (hessian @ vector.reshape(-1)).reshape(n, n)
    return tx.update(jnp.zeros_like(x), state, x, hvp=hvp, vector=vector)[1]

  return jax.jit(lambda s: jax.lax.fori_loop(0, steps, body, s))(tx.init(x))


@pytest.mark.parametrize("geometry,lr", [("q0.5eq1.5", 0.2), ("quad", 0.1)])
def test_kron_newton_indefinite_converges_to_inverse_abs_hessian(geometry, lr):
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    h1 = random_symmetric(5, [-10.0, -1.0, 0.5, 3.0, 20.0], rng)
    h2 = random_spd(5, 30, rng)
    hessian = np.kron(h1, h2)
    state = _exact_moment_fit(geometry, lr, hessian, 5, 2000)
    p = psgd.kron_group((5, 5), geometry=geometry).materialize(single_leaf(state.preconditioner))
    assert fit_error(p, matrix_abs(hessian)) < 1e-6
    # P is positive definite although H is not.
    assert np.min(np.linalg.eigvalsh(np.asarray(p))) > 0


def test_kron_newton_indefinite_with_gaussian_probes_approaches_inverse_abs_hessian():
  """With the library's own probes the fit is a stochastic approximation: a decaying
  precond_lr brings it close (measured ~0.04), not to machine precision."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    hessian = np.kron(random_symmetric(5, [-10.0, -1.0, 0.5, 3.0, 20.0], rng),
                      random_spd(5, 30, rng))
    errors = _newton_fit(psgd.kron, psgd.kron_group((5, 5)), hessian, (5, 5), 2000,
                         precond_lr=optax.cosine_decay_schedule(0.5, 2000))
    assert errors[-1] < 0.15


@pytest.mark.parametrize("geometry", ["q0.5eq1.5", "quad", "eq"])
def test_kron_whitening_converges_to_inverse_sqrt_covariance(geometry):
  rng = np.random.default_rng(0)
  covariance = np.kron(random_spd(4, 10, rng), random_spd(6, 10, rng))
  cholesky = jnp.asarray(np.linalg.cholesky(covariance), jnp.float32)
  tx = psgd.kron(update_probability=1.0, geometry=geometry, damping=0.0,
                 precond_lr=optax.cosine_decay_schedule(0.1, 5000, alpha=0.02))

  def body(i, state):
    grad = (cholesky @ jax.random.normal(jax.random.key(i), (24,))).reshape(4, 6)
    return tx.update(grad, state)[1]

  state = jax.jit(lambda s: jax.lax.fori_loop(0, 5000, body, s))(tx.init(jnp.zeros((4, 6))))
  p = psgd.kron_group((4, 6), geometry=geometry).materialize(single_leaf(state.preconditioner))
  assert fit_error(p, matrix_sqrt(covariance)) < 0.1


def _rosenbrock_iterations(tx, steps):
  """Iterations from (−1, 1) to f < 1e-10 (float64), or None within ``steps``."""
  rosenbrock = lambda x: 100.0 * (x[1] - x[0] ** 2) ** 2 + (1.0 - x[0]) ** 2

  def body(carry, _):
    x, state = carry
    updates, state = tx.update(jax.grad(rosenbrock)(x), state, x, value_fn=rosenbrock)
    x = optax.apply_updates(x, updates)
    return (x, state), rosenbrock(x)

  x = jnp.array([-1.0, 1.0], jnp.float64)
  _, losses = jax.jit(lambda x: jax.lax.scan(body, (x, tx.init(x)), None, length=steps))(x)
  hits = np.nonzero(np.asarray(losses) < 1e-10)[0]
  return int(hits[0]) + 1 if hits.size else None


def test_rosenbrock_newton_with_per_step_normalization_beats_150_iterations():
  """Paper 000 §7.1: the Newton type solves Rosenbrock from (−1, 1) in about 200 steps.

  Its rule normalizes each fit step by that step's own gradient bound. The default
  ``lipschitz_decay=0.9`` keeps a memory of past bounds instead, which steadies noisy fits
  but, on this problem, where the exact Hessian-vector products shrink by orders of
  magnitude along the valley, keeps the steps of ``Q`` too short. With ``lipschitz_decay=0``
  and the papers' triangular ``geometry="eq"`` at ``precond_lr=1`` (20 probe seeds,
  benchmarks/rosenbrock_newton.py: median 110, 86–169; seeds 0–4 here: 86–110) the median
  over probe seeds is below 150; with the memory, at the same settings, every seed needs
  more than 400 (410–457).
  """
  with jax.enable_x64(True):
    def iterations(seed, decay):
      tx = optax.chain(
          psgd.dense(curvature="newton", update_probability=1.0, precond_lr=1.0,
                     geometry="eq", lipschitz_decay=decay, precond_dtype=jnp.float64,
                     seed=seed),
          optax.clip_by_global_norm(1.0), optax.scale(-1.0))
      found = _rosenbrock_iterations(tx, 300)
      return 301 if found is None else found

    per_step = [iterations(seed, 0.0) for seed in range(5)]
    remembered = [iterations(seed, 0.9) for seed in range(5)]
  assert max(per_step) <= 200 and np.median(per_step) <= 150, per_step
  assert min(remembered) > 300, remembered


def test_whole_model_dense_through_optax_flatten_fits_cross_leaf_curvature():
  """optax.flatten(psgd.dense()) fits one P over all leaves, coupling included."""
  with jax.enable_x64(True):
    hessian = random_spd(7, 50, np.random.default_rng(2))  # couples "a" (3,) and "b" (2, 2)
    params = {"a": jnp.zeros(3, jnp.float64), "b": jnp.zeros((2, 2), jnp.float64)}
    flat0, unravel = jax.flatten_util.ravel_pytree(params)
    hessian_j = jnp.asarray(hessian)
    flat_loss = lambda flat: 0.5 * flat @ hessian_j @ flat
    tx = optax.flatten(psgd.dense(curvature="newton", update_probability=1.0,
                                  precond_lr=0.5, precond_dtype=jnp.float64))
    state = tx.init(params)

    def body(_, state):
      return tx.update(params, state, params, value_fn=flat_loss)[1]

    state = jax.jit(lambda s: jax.lax.fori_loop(0, 1500, body, s))(state)
    p = psgd.dense_group((7,)).materialize(single_leaf(state.preconditioner))
    assert fit_error(p, hessian) < 1e-6
    # The flattened order is ravel_pytree's, so the unravelled direction is P·g per leaf.
    grads = unravel(hessian_j @ jnp.arange(1.0, 8.0))
    direction, _ = tx.update(grads, state, params, value_fn=flat_loss)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(direction)[0],
                               np.arange(1.0, 8.0), rtol=1e-5)
