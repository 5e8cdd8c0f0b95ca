"""Stacked (scanned) layers: a leading layer axis gets independent per-layer preconditioners."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd_optax as psgd
from _helpers import minimize, scale_set_per_leaf

LAYERS, ROWS, COLS = 3, 4, 5


def _pairs(step):
  """Gradients, probes and HVPs of a per-layer quadratic that differs across layers."""
  key = jax.random.fold_in(jax.random.key(0), step)
  grads = jax.random.normal(key, (LAYERS, ROWS, COLS))
  vector = jax.random.normal(jax.random.fold_in(key, 1), (LAYERS, ROWS, COLS))
  layer_scale = (jnp.arange(LAYERS) + 1.0)[:, None, None]
  hvp = layer_scale * vector * jnp.arange(1.0, COLS + 1) + 0.3 * jnp.roll(vector, 1, axis=1)
  return grads, vector, hvp


@pytest.mark.parametrize("family", [
    lambda **kw: psgd.kron(**kw),
    lambda **kw: psgd.lra(rank=2, **kw),
    lambda **kw: psgd.diag(**kw),
])
def test_stacked_leaf_equals_separate_leaves(family):
  stacked = family(curvature="newton", update_probability=1.0, stacked={"w": True})
  separate = family(curvature="newton", update_probability=1.0)
  stacked_params = {"w": jnp.zeros((LAYERS, ROWS, COLS))}
  names = [f"w{i}" for i in range(LAYERS)]
  separate_params = {name: jnp.zeros((ROWS, COLS)) for name in names}
  split = lambda a: dict(zip(names, a))
  s_stacked, s_separate = stacked.init(stacked_params), separate.init(separate_params)
  step_stacked = jax.jit(stacked.update)
  step_separate = jax.jit(separate.update)
  for t in range(30):
    grads, vector, hvp = _pairs(t)
    out_stacked, s_stacked = step_stacked({"w": grads}, s_stacked, stacked_params,
                                          hvp={"w": hvp}, vector={"w": vector})
    out_separate, s_separate = step_separate(split(grads), s_separate, separate_params,
                                             hvp=split(hvp), vector=split(vector))
  q_stacked = psgd.preconditioner_per_leaf(s_stacked, stacked_params, stacked={"w": True})["w"]
  q_separate = psgd.preconditioner_per_leaf(s_separate, separate_params)
  for i, name in enumerate(names):
    np.testing.assert_allclose(out_stacked["w"][i], out_separate[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(q_stacked), jax.tree.leaves(q_separate[name])):
      np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)
  # The layers really are different preconditioners.
  first = jax.tree.leaves(q_stacked)[0]
  assert not np.allclose(first[0], first[-1])


def test_stacked_spec_as_callable_and_prefix_and_abstract_init():
  params = {"blocks": {"w": jnp.zeros((LAYERS, ROWS, COLS)), "b": jnp.zeros((LAYERS, COLS))},
            "head": jnp.zeros((COLS, 2))}
  by_prefix = psgd.kron(stacked={"blocks": True, "head": False})
  by_callable = psgd.kron(stacked=lambda path, leaf: path[0].key == "blocks")
  shapes = lambda state: jax.tree.map(jnp.shape, state)
  s1, s2 = by_prefix.init(params), by_callable.init(params)
  assert shapes(s1) == shapes(s2)
  spec = {"blocks": True, "head": False}
  per_leaf = psgd.preconditioner_per_leaf(s1, params, stacked=spec)
  assert per_leaf["blocks"]["w"].factors[0].shape == (LAYERS, ROWS, ROWS)
  assert scale_set_per_leaf(s1, params, stacked=spec)["blocks"]["b"].shape == (LAYERS,)
  assert per_leaf["head"].factors[0].shape == (COLS, COLS)
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  assert shapes(jax.eval_shape(by_prefix.init, abstract)) == shapes(s1)
  # Whitening type under jit, with a stacked leaf whose layers see different gradients.
  grads = jax.tree.map(lambda p: jnp.cumsum(jnp.ones_like(p), axis=0), params)
  updates, state = jax.jit(by_prefix.update)(grads, s1, params)
  assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
      lambda x: (x.shape, x.dtype), s1)
  assert bool(jnp.all(scale_set_per_leaf(state, params, stacked=spec)["blocks"]["w"]))


def test_ready_optimizer_trains_a_scanned_model():
  """A 4-layer residual MLP written with lax.scan over stacked weights."""
  key = jax.random.key(1)
  x = jax.random.normal(key, (64, 8))
  y = jnp.sin(x[:, :1] * 2.0)
  params = {"w": 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (4, 8, 8)),
            "out": jnp.zeros((8, 1))}

  def loss(params):
    hidden, _ = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, params["w"])
    return jnp.mean((hidden @ params["out"] - y) ** 2)

  tx = psgd.optimizers.kron(learning_rate=0.02, stacked={"w": True, "out": False})
  trained = minimize(tx, loss, params, 300)
  assert float(loss(trained)) < 0.05 * float(loss(params))


def test_bad_stacked_specs_raise():
  with pytest.raises(ValueError, match="stacked"):
    psgd.kron(stacked={"w": "yes"})
  with pytest.raises(ValueError, match="layer axis"):
    psgd.kron(stacked={"s": True}).init({"s": jnp.zeros(())})
