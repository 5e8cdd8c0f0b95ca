"""The recommended Flax nnx training loop with PSGD: jit, ``nnx.Optimizer``, Newton via ``value_fn``.

    python examples/flax_nnx_training.py                # 400 steps of each type
    python examples/flax_nnx_training.py --steps 1000

An MLP classifies scikit-learn's ``load_digits``. Two ways to run PSGD-Kron:

* whitening type (the default): ``optimizer.update(model, grads)``; ``Q`` is fitted to the
  gradients themselves, so nothing else is needed;
* Newton type (``curvature="newton"``): ``Q`` is fitted to Hessian-vector products, which the
  optimizer computes from ``value_fn``, the batch loss as a function of the ``nnx.Param``
  state. ``nnx.Optimizer.update`` forwards the keyword to the transformation; inside the
  jitted step ``value_fn`` merges the params it is given back into the model. Its ``P·g`` is
  a Newton-sized step, so its learning rate is O(0.1–1), not Adam's.

Prints the test accuracy and final training loss of each type and saves the loss curves to
``flax_nnx_training.png``. About 30 seconds on 2 CPU cores.
"""

from __future__ import annotations

from _cli import example_parser

# The peak learning rate of each type (cosine decay): whitening steps are per entry, Newton
# steps are Newton-sized.
LEARNING_RATES = {"whitening": 1e-2, "newton": 0.3}


def parse_args(argv=None):
  parser = example_parser(__doc__, steps=400, seeds=[0], optimizers=tuple(LEARNING_RATES),
                          plot="flax_nnx_training.png")
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
from _common import save_curves  # noqa: E402


class MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 64, rngs=rngs)
    self.out = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def loss_of(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit(static_argnames="newton")
def train_step(model, optimizer, x, y, newton=False):
  loss, grads = nnx.value_and_grad(loss_of)(model, x, y)
  if newton:
    # value_fn receives the nnx.Param state (the tree ``grads`` has) and returns the loss.
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    value_fn = lambda params: loss_of(nnx.merge(graphdef, params, rest), x, y)
    optimizer.update(model, grads, value_fn=value_fn)
  else:
    optimizer.update(model, grads)
  return loss


def train(newton, steps, batch=256, seed=0, progress=True, learning_rate=None):
  """Return (training losses, test accuracy); ``learning_rate``: the peak of the cosine
  schedule (default ``LEARNING_RATES`` of the type)."""
  images, labels = load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = train_test_split(
      (images / 16.0).astype(np.float32), labels.astype(np.int32), test_size=0.25,
      random_state=0)
  model = MLP(nnx.Rngs(seed))
  # The default per-bucket state keeps its structure under nnx.Optimizer: one compile.
  kind = "newton" if newton else "whitening"
  peak = LEARNING_RATES[kind] if learning_rate is None else learning_rate
  tx = psgd.optimizers.kron(learning_rate=optax.cosine_decay_schedule(peak, steps),
                            curvature=kind)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  losses = []
  for _ in tqdm(range(steps), desc="newton" if newton else "whitening", leave=False,
                disable=not progress):
    idx = rng.choice(len(x_train), batch, replace=False)
    losses.append(train_step(model, optimizer, x_train[idx], y_train[idx], newton=newton))
  accuracy = float(jnp.mean(jnp.argmax(model(x_test), -1) == y_test))
  return np.asarray(jax.device_get(losses)), accuracy


def main(argv=None):
  args = parse_args(argv)
  results = {name: [train(name == "newton", args.steps, seed=seed,
                          learning_rate=args.learning_rate) for seed in args.seeds]
             for name in args.optimizers}
  print(f"\nMLP on load_digits, psgd.optimizers.kron, {args.steps} steps, seeds {args.seeds} "
        f"({jax.devices()[0].platform})")
  print(f"{'type':<12}{'test accuracy':>15}{'final loss':>12}")
  for name, runs in results.items():
    accuracy = np.mean([accuracy for _, accuracy in runs])
    final = np.mean([losses[-20:].mean() for losses, _ in runs])
    print(f"{name:<12}{accuracy:>15.4f}{final:>12.4f}")
  if not args.no_plot:
    save_curves({name: np.mean([losses for losses, _ in runs], axis=0)
                 for name, runs in results.items()}, args.plot,
                xlabel="step", ylabel="training loss (10-step mean)",
                title="Flax nnx MLP on load_digits, PSGD-Kron", window=10)

if __name__ == "__main__":
  main()
