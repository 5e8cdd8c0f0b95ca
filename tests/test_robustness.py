"""Bad input: invalid hyperparameters fail at construction; bad numbers never reach Q."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd_optax as psgd
from _helpers import minimize, scale_set_per_leaf

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 20, dtype=jnp.float32).reshape(4, 5),
          "b": jnp.zeros((5,), jnp.float32)}
FAMILIES = {"kron": psgd.kron, "dense": psgd.dense, "diag": psgd.diag,
            "kron_eq": lambda **kw: psgd.kron(geometry="eq", **kw),
            "lra": lambda **kw: psgd.lra(rank=3, **kw), "xmat": psgd.xmat,
            "butterfly": psgd.butterfly, "splu": lambda **kw: psgd.splu(order=3, **kw),
            "scan": psgd.scan, "scaw": psgd.scaw}


def _grads(scale=1.0, seed=0):
  key = jax.random.key(seed)
  return {"w": scale * jax.random.normal(key, (4, 5)),
          "b": scale * jax.random.normal(jax.random.fold_in(key, 1), (5,))}


def _warm_state(tx, steps=5):
  state = tx.init(PARAMS)
  for t in range(steps):
    _, state = tx.update(_grads(seed=t), state, PARAMS)
  return state


@pytest.mark.parametrize("name", FAMILIES)
def test_non_finite_gradients_leave_q_unchanged(name):
  # One transformation for the three bad values, so its update compiles once.
  tx = FAMILIES[name](update_probability=1.0)
  state = _warm_state(tx)
  for bad in [np.nan, np.inf, -np.inf]:
    grads = _grads(seed=99)
    grads["w"] = grads["w"].at[1, 2].set(bad)
    _, new_state = tx.update(grads, state, PARAMS)
    for before, after in zip(jax.tree.leaves(state.preconditioner),
                             jax.tree.leaves(new_state.preconditioner)):
      np.testing.assert_array_equal(before, after, err_msg=f"gradient with {bad}")
    assert all(bool(jnp.all(jnp.isfinite(q)))
               for q in jax.tree.leaves(new_state.preconditioner))
  # The next clean step fits again.
  _, later = tx.update(_grads(seed=100), new_state, PARAMS)
  assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(new_state.preconditioner),
                                                   jax.tree.leaves(later.preconditioner)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_hvp_leaves_q_unchanged(bad):
  tx = psgd.kron(curvature="newton", update_probability=1.0)
  state = tx.init(PARAMS)
  vector = _grads(seed=5)
  for t in range(3):
    _, state = tx.update(_grads(seed=t), state, PARAMS, hvp=_grads(seed=10 + t), vector=vector)
  hvp = _grads(seed=20)
  hvp["b"] = hvp["b"].at[0].set(bad)
  _, new_state = tx.update(_grads(seed=4), state, PARAMS, hvp=hvp, vector=vector)
  for before, after in zip(jax.tree.leaves(state.preconditioner),
                           jax.tree.leaves(new_state.preconditioner)):
    np.testing.assert_array_equal(before, after)


def test_value_fn_with_non_finite_curvature_leaves_q_unchanged():
  tx = psgd.kron(curvature="newton", update_probability=1.0)
  state = tx.init(PARAMS)
  loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)
  _, state = tx.update(_grads(), state, PARAMS, value_fn=loss)
  bad_loss = lambda p: jnp.sum(p["w"] ** 2) * jnp.inf + jnp.sum(p["b"] ** 2)
  _, new_state = tx.update(_grads(), state, PARAMS, value_fn=bad_loss)
  for before, after in zip(jax.tree.leaves(state.preconditioner),
                           jax.tree.leaves(new_state.preconditioner)):
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_and_extreme_gradients_give_finite_updates(name):
  tx = FAMILIES[name](update_probability=1.0)
  step = jax.jit(tx.update)  # compiled once for the three scales
  for scale in [0.0, 1e-30, 1e30]:
    state = tx.init(PARAMS)
    for t in range(5):
      updates, state = step(_grads(scale, seed=t), state, PARAMS)
      assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)), scale
      assert all(bool(jnp.all(jnp.isfinite(q)))
                 for q in jax.tree.leaves(state.preconditioner)), scale
    if scale > 0:
      # Q took the gradients' scale at once: P g is O(1) whatever the scale of g.
      rms = [float(jnp.sqrt(jnp.mean(u ** 2))) for u in jax.tree.leaves(updates)]
      assert all(0.05 < r < 20 for r in rms), (scale, rms)
    else:
      assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))


def test_zero_gradient_leaf_keeps_identity_until_it_has_data():
  tx = psgd.kron(update_probability=1.0)
  state = tx.init(PARAMS)
  grads = {"w": _grads()["w"], "b": jnp.zeros(5)}
  for _ in range(3):
    _, state = tx.update(grads, state, PARAMS)
  scale_set = scale_set_per_leaf(state, PARAMS)
  assert bool(scale_set["w"]) and not bool(scale_set["b"])
  _, state = tx.update(_grads(), state, PARAMS)
  assert bool(scale_set_per_leaf(state, PARAMS)["b"])


INVALID = [
    (psgd.kron, {"precond_lr": 0.0}, "precond_lr"),
    (psgd.kron, {"precond_lr": -0.1}, "precond_lr"),
    (psgd.kron, {"precond_lr": float("nan")}, "precond_lr"),
    (psgd.kron, {"update_probability": 1.5}, "update_probability"),
    (psgd.kron, {"update_probability": -0.1}, "update_probability"),
    (psgd.kron, {"init_scale": 0.0}, "init_scale"),
    (psgd.kron, {"init_scale": -1.0}, "init_scale"),
    (psgd.kron, {"damping": -1e-3}, "damping"),
    (psgd.kron, {"lipschitz_decay": 1.0}, "lipschitz_decay"),
    (psgd.kron, {"lipschitz_decay": -0.5}, "lipschitz_decay"),
    (psgd.kron, {"max_size": 0}, "max_size"),
    (psgd.kron, {"max_skew": 0.0}, "max_skew"),
    (psgd.kron, {"memory_save_mode": "some"}, "memory_save_mode"),
    (psgd.kron, {"geometry": "QEQ"}, "geometry"),
    (psgd.kron, {"curvature": "fisher"}, "curvature"),
    (psgd.kron, {"precond_dtype": "int32"}, "precond_dtype"),
    (psgd.dense, {"geometry": "triangular"}, "geometry"),
    (psgd.diag, {"precond_lr": "fast"}, "precond_lr"),
    (psgd.optimizers.kron, {"learning_rate": -1.0}, "learning_rate"),
    (psgd.optimizers.kron, {"momentum": 1.0}, "momentum"),
    (psgd.optimizers.dense, {"weight_decay": -1e-4}, "weight_decay"),
    (psgd.optimizers.diag, {"max_update_rms": 0.0}, "max_update_rms"),
    (psgd.optimizers.kron, {"precond_lr": 2e9, "update_probability": 2.0}, "update_probability"),
    (psgd.update_probability_schedule, {"min_prob": 2.0}, "min_prob"),
    (psgd.update_probability_schedule, {"max_prob": 0.0}, "max_prob"),
    (psgd.lra, {"rank": -1}, "rank"),
    (psgd.lra, {"rank": 2.5}, "rank"),
    (psgd.splu, {"order": -2}, "order"),
    (psgd.xmat, {"lipschitz_decay": 1.5}, "lipschitz_decay"),
    (psgd.scan, {"damping_type": "huge"}, "damping_type"),
    (psgd.butterfly, {"curvature": "bfgs"}, "curvature"),
    (psgd.periodic_schedule, {"period": 0}, "period"),
    (psgd.fop, {"learning_rate": -0.1}, "learning_rate"),
    (psgd.fop, {"learning_rate": 0.1, "rank": 0}, "rank"),
    (psgd.fop, {"learning_rate": 0.1, "rank": 1.5}, "rank"),
    (psgd.fop, {"learning_rate": 0.1, "max_dim": 0}, "max_dim"),
    (psgd.fop, {"learning_rate": 0.1, "init_scale": 0.0}, "init_scale"),
    (psgd.fop, {"learning_rate": 0.1, "normalized": "yes"}, "normalized"),
    (psgd.fop, {"learning_rate": 0.1, "hyper_optimizer": "adam"}, "hyper_optimizer"),
    (psgd.fop, {"learning_rate": 0.1, "precond_dtype": "int8"}, "precond_dtype"),
    (psgd.scalar_hypergradient, {"learning_rate": float("nan")}, "learning_rate"),
    (psgd.per_parameter_hypergradient, {"learning_rate": "fast"}, "learning_rate"),
    (psgd.snr, {"b1": 1.0}, "b1"),
    (psgd.snr, {"b2": -0.1}, "b2"),
]


@pytest.mark.parametrize("factory,kwargs,name", INVALID)
def test_invalid_hyperparameters_raise_value_error_naming_the_value(factory, kwargs, name):
  with pytest.raises(ValueError) as info:
    factory(**kwargs)
  message = str(info.value)
  assert name in message
  assert repr(kwargs[name]) in message or str(kwargs[name]) in message


def test_unknown_option_of_ready_optimizer_is_a_type_error():
  with pytest.raises(TypeError):
    psgd.optimizers.kron(learning_rate=1e-3, precond_learning_rate=0.1)


def test_bfloat16_params_train_with_float32_state():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16) + 1, PARAMS)
  target = jax.tree.map(lambda p: jnp.zeros_like(p), params)
  loss = lambda p: sum(jnp.sum((a.astype(jnp.float32) - b) ** 2)
                       for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))
  trained = minimize(psgd.optimizers.kron(learning_rate=0.05), loss, params, 100)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(trained))
  assert float(loss(trained)) < 0.05 * float(loss(params))


def test_ready_optimizer_bounds_the_step_after_a_gradient_spike():
  """After the fit adapts to tiny gradients, a 1e4× larger one must not make a huge step."""
  lr = 1e-2
  tx = psgd.optimizers.kron(learning_rate=lr, update_probability=1.0)
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  for t in range(100):
    _, state = step(_grads(1e-6, seed=t), state, PARAMS)
  updates, _ = step(_grads(1e-2, seed=123), state, PARAMS)
  for leaf in jax.tree.leaves(updates):
    assert float(jnp.sqrt(jnp.mean(leaf ** 2))) <= 1.1 * lr * (1 + 1e-5)
  # The bare transformation is unclipped: the spike is amplified, hence the default.
  bare = psgd.kron(update_probability=1.0)
  bare_state = bare.init(PARAMS)
  for t in range(100):
    _, bare_state = bare.update(_grads(1e-6, seed=t), bare_state, PARAMS)
  spike, _ = bare.update(_grads(1e-2, seed=123), bare_state, PARAMS)
  assert max(float(jnp.sqrt(jnp.mean(u ** 2))) for u in jax.tree.leaves(spike)) > 100
