"""Orbax checkpoints of the optimizer state: a resumed run equals an uninterrupted one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import psgd_optax as psgd


def _loss(params, step):
  x = jax.random.normal(jax.random.fold_in(jax.random.key(0), step), (16, 4))
  y = jnp.sin(x[:, :2])
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((params["scale"] * hidden @ params["w2"] - y) ** 2)


# A scalar leaf too: FOP leaves it alone, and its state must still be saveable.
PARAMS = {"w1": 0.3 * jnp.ones((4, 6)), "b1": jnp.zeros(6), "w2": 0.1 * jnp.ones((6, 2)),
          "scale": jnp.asarray(1.0)}
OPTIMIZERS = {
    "kron_newton": lambda: optax.chain(psgd.kron(curvature="newton", update_probability=0.5),
                                       optax.scale(-0.05)),
    "ready_kron_secant": lambda: psgd.optimizers.kron(learning_rate=0.02, curvature="secant"),
    "lra_flat": lambda: optax.chain(optax.flatten(psgd.lra(rank=2)), optax.scale(-0.05)),
    "fop_snr": lambda: optax.chain(psgd.fop(0.05), psgd.snr(), optax.scale(-0.05)),
}


def _training_step(tx):
  @jax.jit
  def step(params, state, t):
    loss = lambda p: _loss(p, t)
    updates, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state
  return step


def _train(step, params, state, start, stop):
  for t in range(start, stop):
    params, state = step(params, state, t)
  return params, state


# Newton kron in the default run (the must-show), all four kinds with -m slow.
@pytest.mark.parametrize("name", [
    "kron_newton",
    pytest.param("fop_snr", marks=pytest.mark.slow),
    pytest.param("ready_kron_secant", marks=pytest.mark.slow),
    pytest.param("lra_flat", marks=pytest.mark.slow)])
def test_resumed_run_is_bitwise_equal_to_an_uninterrupted_run(name, tmp_path):
  tx = OPTIMIZERS[name]()
  step = _training_step(tx)  # compiled once for all three runs
  full_params, full_state = _train(step, PARAMS, tx.init(PARAMS), 0, 100)

  params, state = _train(step, PARAMS, tx.init(PARAMS), 0, 50)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "step50", {"params": params, "opt_state": state})
  # Restore into a fresh process's view: an abstract target built from init, nothing else.
  fresh = {"params": PARAMS, "opt_state": tx.init(PARAMS)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "step50", abstract)
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state)
  resumed_params, resumed_state = _train(step, restored["params"], restored["opt_state"], 50,
                                         100)

  jax.tree.map(np.testing.assert_array_equal, resumed_params, full_params)
  jax.tree.map(np.testing.assert_array_equal, resumed_state, full_state)
