"""A small convolutional autoencoder on scikit-learn's digits: PSGD Kron/SCAN vs Adam and SGD.

    python examples/autoencoder.py                      # 800 steps, seed 0
    python examples/autoencoder.py --steps 2000 --seeds 0 1 2

Li 2018 (paper 001) Experiment 5 trains an autoencoder of three convolution layers and three
deconvolution layers on CIFAR10 and finds PSGD-Kron clearly ahead, SCAN on par with ESGD and
ahead of RMSProp, and SGD last. This is the same architecture scaled to the 8×8 ``load_digits``
images: convolutions 1 → 16 → 32 (stride 2) → 8 (the 2×2×8 code), transposed convolutions
back to 8×8, tanh activations, squared-error loss, batch 128. The PSGD optimizers share the
recipe of :func:`psgd_optax.optimizers.kron` (whitening type, momentum 0.9); SCAN treats each
kernel/bias pair as one affine map (:func:`psgd_optax.affine_pairs`).

Prints the test reconstruction error (mean ± std over seeds) and saves the training curves to
``autoencoder.png``. About 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import time

from _cli import example_parser, learning_rate_overrides

OPTIMIZERS = ("kron", "scan", "adam", "sgd")


def parse_args(argv=None):
  parser = example_parser(__doc__, steps=800, seeds=[0], optimizers=OPTIMIZERS,
                          plot="autoencoder.png")
  parser.add_argument("--batch", type=int, default=128, help="images per batch")
  return parser.parse_args(argv)


if __name__ == "__main__":
  parse_args()  # --help and bad flags answer here, before JAX loads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

import psgd_optax as psgd  # noqa: E402
from _common import compare_over_seeds, save_curves  # noqa: E402


class Autoencoder(nnx.Module):
  """Three convolutions down to a 2×2×8 code, three transposed convolutions back."""

  def __init__(self, rngs: nnx.Rngs):
    self.layers = nnx.List([
        nnx.Conv(1, 16, (3, 3), rngs=rngs),
        nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs),
        nnx.Conv(32, 8, (3, 3), strides=2, rngs=rngs),
        nnx.ConvTranspose(8, 32, (3, 3), strides=2, rngs=rngs),
        nnx.ConvTranspose(32, 16, (3, 3), strides=2, rngs=rngs),
        nnx.ConvTranspose(16, 1, (3, 3), rngs=rngs)])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jnp.tanh(layer(x))
    return self.layers[-1](x)


def load_data(seed):
  images, _ = load_digits(return_X_y=True)
  images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  return train_test_split(images, test_size=0.25, random_state=seed)


# Peak learning rates: each the best test error of a sweep over 800 steps, seed 0 (PSGD and
# Adam 1e-3 … 3e-2, SCAN also 0.1; SGD 0.1 … 1, where 0.3 and 1 diverged; BENCHMARKS.md).
LEARNING_RATES = {"psgd.kron": 1e-2, "psgd.scan": 3e-2, "adam": 1e-2, "sgd": 0.1}


def optimizers(steps, learning_rates=None):
  """name → optimizer with a cosine-decayed learning rate peaking at ``learning_rates[name]``
  (default ``LEARNING_RATES``)."""
  peak = dict(LEARNING_RATES, **(learning_rates or {}))
  schedule = lambda name: optax.cosine_decay_schedule(peak[name], steps)
  return {
      "psgd.kron": psgd.optimizers.kron(learning_rate=schedule("psgd.kron")),
      "psgd.scan": psgd.optimizers.with_preconditioner(psgd.affine_pairs(psgd.scan()),
                                                       schedule("psgd.scan")),
      "adam": optax.adam(schedule("adam")),
      "sgd": optax.sgd(schedule("sgd"), momentum=0.9, nesterov=True),
  }


def train(name, tx, data, steps, batch, seed, progress=True):
  """Return (training losses, test mean squared error, seconds)."""
  x_train, x_test = (jnp.asarray(a) for a in data)
  model = Autoencoder(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_of(model, xb):
    return jnp.mean((model(xb) - xb) ** 2)

  @nnx.jit
  def step(model, optimizer, key):
    xb = x_train[jax.random.choice(key, x_train.shape[0], (batch,), replace=False)]
    loss, grads = nnx.value_and_grad(loss_of)(model, xb)
    optimizer.update(model, grads)
    return loss

  keys = jax.random.split(jax.random.key(seed), steps)
  # Timed from the start, compile included. The first two calls compile: after the first
  # update nnx.Optimizer holds the PSGD state in its own containers (NamedTuples become
  # dicts), so the second call compiles again.
  began = time.perf_counter()
  losses = [step(model, optimizer, key) for key in keys[:2]]
  for key in tqdm(keys[2:], desc=f"{name} (seed {seed})", leave=False, disable=not progress):
    losses.append(step(model, optimizer, key))
  losses = np.asarray(jax.device_get(losses))
  seconds = time.perf_counter() - began
  return losses, float(loss_of(model, x_test)), seconds


def compare(steps, batch, seeds, names=None, progress=True, learning_rates=None):
  """name → list over seeds of (loss curve, test error, seconds)."""
  return compare_over_seeds(
      optimizers(steps, learning_rates), seeds, load_data,
      lambda name, tx, data, seed: train(name, tx, data, steps, batch, seed, progress), names)


def main(argv=None):
  args = parse_args(argv)
  results = compare(args.steps, args.batch, args.seeds, args.optimizers,
                    learning_rates=learning_rate_overrides(args, LEARNING_RATES))

  print(f"\nconvolutional autoencoder on load_digits, {args.steps} steps, batch {args.batch},"
        f" seeds {args.seeds} ({jax.devices()[0].platform})")
  print(f"{'optimizer':<12}{'test MSE':>22}{'final train MSE':>18}{'seconds':>10}")
  for name, runs in results.items():
    test = np.array([run[1] for run in runs])
    final = np.array([run[0][-20:].mean() for run in runs])
    print(f"{name:<12}{test.mean():>13.5f} ± {test.std():.5f}{final.mean():>18.5f}"
          f"{np.mean([run[2] for run in runs]):>10.1f}")

  print("seconds: the run's wall time, its compile included")
  if not args.no_plot:
    save_curves({name: np.mean([run[0] for run in runs], axis=0)
                 for name, runs in results.items()},
                args.plot, xlabel="step", ylabel="training MSE (20-step mean)",
                title="convolutional autoencoder on load_digits", window=20)


if __name__ == "__main__":
  main()
