"""Train a small CNN on scikit-learn's bundled digits with PSGD-Kron and with Adam.

    python examples/digits.py                 # defaults: 600 steps, batch 128, seed 0
    python examples/digits.py --steps 1500 --seeds 0 1 2

Prints a table of test accuracy and wall time per optimizer and saves the training-loss
curves to ``digits_loss.png`` (``--plot`` to change). Runs on CPU in about a minute.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import psgd_optax as psgd


class CNN(nnx.Module):
  """Two 3×3 convolutions, average pooling and a linear classifier (8×8 inputs)."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.head = nnx.Linear(4 * 4 * 32, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    return self.head(x.reshape(x.shape[0], -1))


def load_data(seed: int):
  images, labels = load_digits(return_X_y=True)
  images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  return train_test_split(images, labels.astype(np.int32), test_size=0.25,
                          random_state=seed)


def optimizers(steps: int):
  return {
      "psgd.kron": psgd.optimizers.kron(
          learning_rate=optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4),
      "adam": optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4),
  }


def train(name, tx, data, steps, batch, seed, progress=True):
  x_train, x_test, y_train, y_test = (jnp.asarray(a) for a in data)
  model = CNN(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_of(model, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

  @nnx.jit
  def step(model, optimizer, key):
    idx = jax.random.choice(key, x_train.shape[0], (batch,), replace=False)
    loss, grads = nnx.value_and_grad(loss_of)(model, x_train[idx], y_train[idx])
    optimizer.update(model, grads)
    return loss

  keys = jax.random.split(jax.random.key(seed), steps)
  step(model, optimizer, keys[0]).block_until_ready()  # compile outside the timing
  model = CNN(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  losses = []
  start = time.perf_counter()
  for key in tqdm(keys, desc=f"{name} (seed {seed})", leave=False, disable=not progress):
    losses.append(step(model, optimizer, key))
  losses = np.asarray(jax.device_get(losses))
  seconds = time.perf_counter() - start
  accuracy = float(jnp.mean(jnp.argmax(model(x_test), -1) == y_test))
  return losses, accuracy, seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--plot", default="digits_loss.png")
  args = parser.parse_args()

  results = {}
  for seed in args.seeds:
    data = load_data(seed)
    for name, tx in optimizers(args.steps).items():
      results.setdefault(name, []).append(train(name, tx, data, args.steps, args.batch, seed))

  print(f"\nload_digits CNN, {args.steps} steps, batch {args.batch}, seeds {args.seeds} "
        f"({jax.devices()[0].platform})")
  print(f"{'optimizer':<12}{'test accuracy':>18}{'final loss':>14}{'seconds':>10}")
  for name, runs in results.items():
    accuracy = np.array([r[1] for r in runs])
    final = np.array([r[0][-50:].mean() for r in runs])
    seconds = np.array([r[2] for r in runs])
    print(f"{name:<12}{accuracy.mean():>12.4f} ± {accuracy.std():.4f}"
          f"{final.mean():>14.4f}{seconds.mean():>10.1f}")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, runs in results.items():
    curve = np.mean([r[0] for r in runs], axis=0)
    smooth = np.convolve(curve, np.ones(20) / 20, mode="valid")
    ax.semilogy(smooth, label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (20-step mean)")
  ax.set_title("CNN on load_digits")
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.plot, dpi=120)
  print(f"saved {args.plot}")


if __name__ == "__main__":
  main()
