"""Flax nnx integration: PSGD-Kron trains an MLP on scikit-learn's digits as well as Adam."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import psgd_optax as psgd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from flax_nnx_training import MLP, loss_of  # noqa: E402  (the README's recommended loop)

STEPS = 300
BATCH = 256


def _data():
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  return train_test_split(x, y.astype(np.int32), test_size=0.25, random_state=0)


def _train(tx, seed=0):
  x_train, x_test, y_train, y_test = _data()
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
  model = MLP(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, t):
    idx = jax.random.choice(jax.random.key(t), x_train.shape[0], (BATCH,), replace=False)
    xb, yb = x_train[idx], y_train[idx]
    loss, grads = nnx.value_and_grad(loss_of)(model, xb, yb)
    optimizer.update(model, grads)
    return loss

  for t in range(STEPS):
    step(model, optimizer, t)
  predictions = jnp.argmax(model(jnp.asarray(x_test)), axis=-1)
  return float(jnp.mean(predictions == jnp.asarray(y_test)))


def test_psgd_kron_matches_or_beats_adam_on_digits_mlp():
  # Both at their best learning rate of the sweep 1e-3, 3e-3, 1e-2 over 300 steps, which was
  # 1e-2 for both (measured test accuracy: adam 0.958 / 0.971 / 0.978, kron 0.967 / 0.980 /
  # 0.980); only that rate runs here, to keep the default suite short.
  adam = _train(optax.adam(1e-2))
  kron = _train(psgd.optimizers.kron(learning_rate=1e-2))
  print(f"digits MLP test accuracy after {STEPS} steps: psgd.kron {kron:.4f}, adam {adam:.4f}")
  assert kron >= adam
  assert kron > 0.95


# The Newton type through nnx.Optimizer (value_fn forwarded by optimizer.update) is tested by
# tests/test_examples.py on examples/flax_nnx_training.py, the loop the README recommends.
