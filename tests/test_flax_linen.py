"""The Flax Linen recipe: a TrainState whose apply_gradients forwards extra args (value_fn)."""

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state

import psgd_optax as psgd


class PSGDTrainState(train_state.TrainState):
  """``TrainState`` whose ``apply_gradients`` forwards extra args (``value_fn=``, ...) to
  ``tx.update``; Flax's own passes none."""

  def apply_gradients(self, *, grads, **extra_args):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(jnp.tanh(nn.Dense(16)(x)))


def test_linen_train_state_recipe_trains_newton_type():
  key = jax.random.key(0)
  x = jax.random.normal(key, (128, 4))
  y = jnp.stack([jnp.sin(x[:, 0]), jnp.tanh(x[:, 1] + x[:, 2])], axis=1)
  model = MLP()
  state = PSGDTrainState.create(
      apply_fn=model.apply, params=model.init(key, x)["params"],
      tx=psgd.optimizers.kron(learning_rate=0.03, curvature="newton", update_probability=0.3))

  @jax.jit
  def train_step(state):
    def loss_of(params):
      return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_of)(state.params)
    return state.apply_gradients(grads=grads, value_fn=loss_of), loss

  state, first = train_step(state)
  for _ in range(300):
    state, loss = train_step(state)
  assert int(state.step) == 301
  # Newton type needs the value_fn: it fitted Q (the first fit sets its scale from HVPs).
  assert bool(jax.tree.leaves(state.opt_state[0].scale_set)[0])
  assert float(loss) < 0.1 * float(first)
