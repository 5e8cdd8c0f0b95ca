"""Curvature sources (finite differences, secant pairs), damping variants, gradient
clipping as an optax recipe, and skipped-update schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd_optax as psgd
from _helpers import single_leaf
from psgd_optax._src import curvature as curvature_lib


def _mlp_loss(params):
  x = jnp.linspace(-1.0, 1.0, 24, dtype=jnp.float32).reshape(8, 3)
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((hidden @ params["w2"] - jnp.sin(x[:, :1])) ** 2)


def _mlp_params():
  key = jax.random.key(0)
  return {"w1": jax.random.normal(key, (3, 5), jnp.float32),
          "b1": 0.1 * jnp.ones((5,), jnp.float32),
          "w2": jax.random.normal(jax.random.fold_in(key, 1), (5, 1), jnp.float32)}


def _pairs(name, params, loss):
  leaves, treedef = jax.tree.flatten(params)
  source = curvature_lib.make_curvature(name)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  probes = lambda: [jax.random.normal(k, leaf.shape, jnp.float32)
                    for k, leaf in zip(keys, leaves)]
  return source.pair(probes, leaves, params, treedef, {"value_fn": loss}, (), jnp.float32)


def test_finite_difference_agrees_with_exact_hvp_in_float32():
  params = _mlp_params()
  approx = _pairs("finite_difference", params, _mlp_loss)
  # The pair's vector is the perturbation θ + δv actually made (rounding included), so
  # compare with the exact HVP along that vector.
  leaves, treedef = jax.tree.flatten(params)
  vector = treedef.unflatten(list(approx.vectors))
  _, exact = jax.jvp(jax.grad(_mlp_loss), (params,), (vector,))
  h_exact = jnp.concatenate([h.reshape(-1) for h in jax.tree.leaves(exact)])
  h_approx = jnp.concatenate([h.reshape(-1) for h in approx.products])
  relative = float(jnp.linalg.norm(h_approx - h_exact) / jnp.linalg.norm(h_exact))
  assert relative < 1e-3, relative


@jax.custom_vjp
def _clipped_square(x):
  return jnp.sum(x ** 2)


def _clipped_square_fwd(x):
  return _clipped_square(x), x


def _clipped_square_bwd(x, cotangent):
  # A host-side gradient kernel (as in custom CUDA/numpy kernels): JAX cannot
  # differentiate it again, so forward-over-reverse HVPs are impossible.
  gradient = jax.pure_callback(lambda a: (2 * np.asarray(a)).astype(a.dtype),
                               jax.ShapeDtypeStruct(x.shape, x.dtype), x)
  return (cotangent * gradient,)


_clipped_square.defvjp(_clipped_square_fwd, _clipped_square_bwd)


def test_custom_vjp_loss_newton_errors_clearly_and_finite_difference_trains():
  scales = jnp.asarray([4.0, 1.0, 0.25], jnp.float32)
  loss = lambda x: _clipped_square(scales * x)
  x = jnp.ones(3, jnp.float32)
  newton = psgd.dense(curvature="newton")
  with pytest.raises(ValueError, match="finite_difference"):
    newton.update(jax.grad(loss)(x), newton.init(x), x, value_fn=loss)

  tx = optax.chain(psgd.dense(curvature="finite_difference", update_probability=1.0,
                              precond_lr=0.5), optax.clip_by_global_norm(1.0),
                   optax.scale(-0.5))
  state = tx.init(x)
  step = jax.jit(lambda x, s: tx.update(jax.grad(loss)(x), s, x, value_fn=loss))
  for _ in range(200):
    updates, state = step(x, state)
    x = optax.apply_updates(x, updates)
  # Plain gradient descent at a stable step (< 2/32) needs ~10³ steps for the 0.25 axis.
  assert float(loss(x)) < 1e-6, x


def test_finite_difference_needs_value_fn():
  tx = psgd.kron(curvature="finite_difference")
  x = jnp.ones(3)
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(x, tx.init(x), x)


def _rosenbrock(x):
  return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def test_secant_pairs_minimize_rosenbrock_to_1e_8():
  with jax.enable_x64(True):
    tx = optax.chain(psgd.dense(curvature="secant", update_probability=1.0, precond_lr=0.5,
                                precond_dtype=jnp.float64),
                     optax.clip_by_global_norm(1.0), optax.scale(-0.5))
    x = jnp.asarray([-1.0, 1.0], jnp.float64)
    state = tx.init(x)
    step = jax.jit(lambda x, s: tx.update(jax.grad(_rosenbrock)(x), s, x))
    best = np.inf
    for _ in range(3000):
      updates, state = step(x, state)
      x = optax.apply_updates(x, updates)
      best = min(best, float(_rosenbrock(x)))
    assert best < 1e-8, (best, x)


def test_secant_first_step_does_not_fit_and_memory_holds_previous_step():
  x = jnp.asarray([1.0, 2.0])
  tx = psgd.diag(curvature="secant", update_probability=1.0)
  state = tx.init(x)
  _, state = tx.update(jnp.asarray([0.5, 0.5]), state, x)
  assert not bool(single_leaf(state.scale_set))  # no pair yet: Q untouched
  np.testing.assert_array_equal(state.curvature.params, x)
  _, state = tx.update(jnp.asarray([0.25, 1.0]), state, x + 1.0)
  assert bool(single_leaf(state.scale_set))
  np.testing.assert_array_equal(state.curvature.grads, [0.25, 1.0])


@pytest.mark.parametrize("damping_type", ["traditional", "nonconvex"])
def test_damping_keeps_largest_eigenvalue_of_p_below_inverse_lambda(damping_type):
  """H has a (near) zero eigenvalue and negative ones (≤ −2λ), so without damping the
  largest eigenvalue of P would be ~1e6; with λ = 0.1 it must stay ≤ 1/λ (+1%)."""
  rng = np.random.default_rng(0)
  basis, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  eigenvalues = np.array([-3.0, -0.5, 1e-6, 0.4, 1.0, 4.0])
  hessian = jnp.asarray((basis * eigenvalues) @ basis.T)
  strength = 0.1
  with jax.enable_x64(True):
    loss = lambda x: 0.5 * x @ hessian @ x
    steps = 6000
    lr = optax.cosine_decay_schedule(0.5, steps, alpha=0.02)
    tx = psgd.dense(curvature="newton", damping=strength, damping_type=damping_type,
                    update_probability=1.0, precond_lr=lr, precond_dtype=jnp.float64)
    x = jnp.zeros(6, jnp.float64)
    run = jax.jit(lambda s: jax.lax.fori_loop(
        0, steps, lambda _, s: tx.update(x, s, x, value_fn=loss)[1], s))
    state = run(tx.init(x))
    p = np.asarray(psgd.dense_group((6,)).materialize(single_leaf(state.preconditioner)))
  largest = np.linalg.eigvalsh(p).max()
  assert largest <= 1.01 / strength, largest
  # ... and the damping did not simply shrink P: it still fits the well-determined part.
  assert largest > 0.5 / strength, largest


def test_nonconvex_damping_draws_its_own_independent_probe():
  # The damping draws v′ from the key the engine gives each unit; the others ignore it.
  vector, product = jnp.ones((4,)), jnp.zeros((4,))
  key = jax.random.key(0)
  damped = curvature_lib.Damping(0.5, "nonconvex").apply(vector, product, key)
  traditional = curvature_lib.Damping(0.5, "traditional").apply(vector, product, key)
  np.testing.assert_allclose(traditional, 0.5 * jnp.ones(4))
  np.testing.assert_allclose(damped, 0.5 * jax.random.normal(key, (4,)))
  assert not np.allclose(damped, traditional)


def test_invalid_damping_type_raises():
  with pytest.raises(ValueError, match="damping_type"):
    psgd.kron(damping_type="strong")


def test_preconditioned_gradient_clipping_recipe_bounds_the_step():
  """The papers' clipping θ ← θ − μ P g / max(1, ‖P g‖/Ω) is optax.clip_by_global_norm(Ω)
  after the preconditioner."""
  omega, lr = 0.5, 0.1
  tx = optax.chain(psgd.kron(), optax.clip_by_global_norm(omega), optax.scale(-lr))
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
  state = tx.init(params)
  for scale in (1e-3, 1e-3, 1e3):  # a spike after small gradients
    grads = jax.tree.map(lambda p: scale * p, params)
    updates, state = tx.update(grads, state, params)
    norm = float(optax.tree.norm(updates))
    assert norm <= lr * omega * (1 + 1e-5)
  plain = psgd.kron()
  direction, _ = plain.update(grads, plain.init(params), params)
  assert float(optax.tree.norm(direction)) > omega  # the clip was active


def test_skip_schedules_follow_their_rules():
  log_rule = psgd.log10_skip_schedule()
  fits = [t for t in range(0, 1200) if float(log_rule(t)) == 1.0]
  assert fits[:100] == list(range(100))
  assert all(t % 2 == 0 for t in fits if 100 <= t < 1000)
  assert all(t % 3 == 0 for t in fits if t >= 1000)
  expected = [t for t in range(1200) if t % max(int(np.floor(np.log10(max(t, 1)))), 1) == 0]
  assert fits == expected
  assert [float(psgd.periodic_schedule(4)(t)) for t in range(5)] == [1, 0, 0, 0, 1]
  with pytest.raises(ValueError, match="period"):
    psgd.periodic_schedule(0)


def test_engine_fits_only_on_scheduled_steps():
  x = jnp.ones((3,))
  tx = psgd.diag(update_probability=psgd.periodic_schedule(3), init_scale=1.0)
  state = tx.init(x)
  changed = []
  for t in range(7):
    _, new_state = tx.update(jnp.asarray([1.0, 2.0, 3.0]) * (t + 1), state, x)
    changed.append(bool(jnp.any(single_leaf(new_state.preconditioner).factors[0]
                                != single_leaf(state.preconditioner).factors[0])))
    state = new_state
  assert changed == [True, False, False, True, False, False, True]
