"""Bad input: invalid hyperparameters fail at construction; bad numbers never reach Q.

Every factory's non-finite and extreme-scale steps are in ``test_contract.py``; these are
the Newton products, the zero-gradient leaf, validation and the gradient spike."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd_optax as psgd
from _helpers import minimize, scale_set_per_leaf

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 20, dtype=jnp.float32).reshape(4, 5),
          "b": jnp.zeros((5,), jnp.float32)}

def _grads(scale=1.0, seed=0):
  key = jax.random.key(seed)
  return {"w": scale * jax.random.normal(key, (4, 5)),
          "b": scale * jax.random.normal(jax.random.fold_in(key, 1), (5,))}


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
    # Booleans are not numbers, fractions are not counts, generic dtypes are ambiguous.
    (psgd.kron, {"precond_lr": True}, "precond_lr"),
    (psgd.kron, {"update_probability": True}, "update_probability"),
    (psgd.kron, {"damping": False}, "damping"),
    (psgd.kron, {"seed": True}, "seed"),
    (psgd.kron, {"seed": 1.5}, "seed"),
    (psgd.fop, {"learning_rate": 0.1, "seed": 1.5}, "seed"),
    (psgd.optimizers.kron, {"learning_rate": True}, "learning_rate"),
    (psgd.lra, {"rank": True}, "rank"),
    (psgd.lra, {"rank": 0}, "rank"),
    (psgd.splu, {"order": True}, "order"),
    (psgd.splu, {"order": 0}, "order"),
    (psgd.kron, {"max_size": True}, "max_size"),
    (psgd.kron, {"max_size": 1.5}, "max_size"),
    (psgd.kron, {"precond_dtype": None}, "precond_dtype"),
    (psgd.kron, {"precond_dtype": "float"}, "precond_dtype"),
    (psgd.snr, {"precond_dtype": float}, "precond_dtype"),
    (psgd.optimizers.kron, {"mask": "bad"}, "mask"),
    (psgd.optimizers.kron, {"mask": 3}, "mask"),
    (psgd.optimizers.with_preconditioner, {"preconditioner": "kron"}, "preconditioner"),
]


@pytest.mark.parametrize("factory,kwargs,name", INVALID)
def test_invalid_hyperparameters_raise_value_error_naming_the_value(factory, kwargs, name):
  with pytest.raises(ValueError) as info:
    factory(**kwargs)
  message = str(info.value)
  assert name in message
  assert repr(kwargs[name]) in message or str(kwargs[name]) in message


def test_float64_state_needs_x64_where_it_is_built():
  tx = psgd.kron(precond_dtype="float64")  # building it is fine: x64 may come later
  with pytest.raises(ValueError, match="jax_enable_x64"):
    tx.init(PARAMS)
  with jax.enable_x64(True):
    state = tx.init(PARAMS)
  assert {a.dtype for a in jax.tree.leaves(state.preconditioner)} == {jnp.dtype(jnp.float64)}


def test_secant_memory_skips_a_non_finite_step():
  """The pair after a NaN gradient spans the last two finite steps; the memory never holds
  the NaN."""
  tx = psgd.kron(curvature="secant", update_probability=1.0)
  state = tx.init(PARAMS)
  params = PARAMS
  for t in range(3):
    _, state = tx.update(_grads(seed=t), state, params)
    params = jax.tree.map(lambda p: p + 0.01 * (t + 1), params)
  bad = _grads(seed=9)
  bad["b"] = bad["b"].at[0].set(np.nan)
  _, after = tx.update(bad, state, params)
  jax.tree.map(np.testing.assert_array_equal, after.curvature, state.curvature)


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


def test_a_gradient_spike_gives_a_bounded_step():
  """After the fit adapts to tiny gradients, a 1e4× larger one must not make a huge step:
  the ready optimizer's update stays within its RMS clip, and the bare whitening
  transformation's P g within RMS 2 (it was ~1e4 before the whitened step was bounded)."""
  lr = 1e-2
  tx = psgd.optimizers.kron(learning_rate=lr, update_probability=1.0)
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  for t in range(100):
    _, state = step(_grads(1e-6, seed=t), state, PARAMS)
  updates, _ = step(_grads(1e-2, seed=123), state, PARAMS)
  for leaf in jax.tree.leaves(updates):
    assert float(jnp.sqrt(jnp.mean(leaf ** 2))) <= 1.1 * lr * (1 + 1e-5)
  bare = psgd.kron(update_probability=1.0)
  bare_state = bare.init(PARAMS)
  bare_step = jax.jit(bare.update)
  for t in range(100):
    _, bare_state = bare_step(_grads(1e-6, seed=t), bare_state, PARAMS)
  spike, _ = bare_step(_grads(1e-2, seed=123), bare_state, PARAMS)
  rms = [float(jnp.sqrt(jnp.mean(u ** 2))) for u in jax.tree.leaves(spike)]
  assert max(rms) <= 2.0 * (1 + 1e-5) and min(rms) > 1.0, rms


@pytest.mark.parametrize("position", ["first", "middle", "last", "big"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_entry_wherever_the_packing_puts_it(monkeypatch, position,
                                                                     bad):
  # Small leaves are checked in packed chunks; shrink the chunk so that this tree has a
  # leaf alone (size ≥ chunk), full chunks and a partial last one, mixed dtypes among them.
  from psgd_optax._src import trees
  monkeypatch.setattr(trees, "_PACK_SIZE", 16)
  leaves = [jnp.zeros(5, jnp.bfloat16), jnp.zeros((2, 4)), jnp.zeros(()), jnp.zeros(7),
            jnp.zeros((4, 8)), jnp.zeros(3, jnp.bfloat16), jnp.zeros((0, 3))]
  assert bool(jax.jit(trees.all_finite)(leaves))
  index = {"first": 0, "middle": 3, "last": 5, "big": 4}[position]
  leaves[index] = leaves[index].ravel().at[-1].set(bad).reshape(leaves[index].shape)
  assert not bool(jax.jit(trees.all_finite)(leaves))
  assert bool(trees.all_finite([])) and bool(trees.all_finite({"a": jnp.zeros(0)}))


def test_ready_chain_clips_each_leaf_update_to_max_update_rms():
  # The clip is per leaf: a leaf above the bound is scaled to RMS max_update_rms, a leaf
  # below it (or a zero leaf) passes unchanged, whatever its neighbours hold.
  tx = psgd.optimizers.with_preconditioner(optax.identity(), learning_rate=1.0,
                                           momentum=0.0, max_update_rms=1.1)
  grads = {"big": jnp.full((3, 4), 5.0), "small": jnp.array([0.3, -0.2, 0.1]),
           "zero": jnp.zeros(2)}
  updates, _ = tx.update(grads, tx.init(grads), grads)
  rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x))))
  np.testing.assert_allclose(rms(updates["big"]), 1.1, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["small"]), -np.asarray(grads["small"]),
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(updates["zero"]), 0.0)
