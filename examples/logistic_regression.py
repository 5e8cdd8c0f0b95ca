"""Convex logistic regression on outer-product features: PSGD-LRA vs SGD vs L-BFGS.

    python examples/logistic_regression.py               # 1000 iterations, seed 0
    python examples/logistic_regression.py --steps 3000 --seeds 0 1 2 3 4

Li et al. 2023 (paper 002) Appendix E.3, on scikit-learn's ``load_digits`` instead of MNIST:
each 8×8 image ``x`` (64 pixels in [0, 1]) is replaced by its outer product ``x xᵀ``
(4096 features) plus a constant, and a 10-class logistic regression is fitted to it, a convex
problem with 40,970 coefficients and a badly conditioned Hessian. As in the paper: mini-batches
of 500, no momentum, PSGD with ``lra(rank=10)`` fitted to Hessian-vector products (preconditioner
learning rate 0.1) over the whole coefficient vector, its step clipped to norm 1, SGD at the
best of a small learning-rate sweep. L-BFGS (``optax.lbfgs``, with its zoom line search) runs on the full training set,
its natural setting; each of its iterations may evaluate the loss several times. A small L2
penalty keeps the minimum finite.

Prints the final full-training-set loss, its excess over the minimum (the lowest loss any
method reached, L-BFGS's in practice) and the test error (mean ± std over seeds), and saves
the loss curves to ``logistic_regression.png``. About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import time

from _cli import example_parser


def parse_args(argv=None):
  parser = example_parser(
      __doc__, steps=1000, seeds=[0], optimizers=("psgd", "l-bfgs", "sgd"),
      plot="logistic_regression.png",
      learning_rate_help="PSGD's learning rate (default: the paper's 0.05); SGD sweeps its own")
  parser.add_argument("--update-probability", type=float, default=1.0,
                      help="PSGD's probability of fitting Q on a step")
  return parser.parse_args(argv)


if __name__ == "__main__":
  parse_args()  # --help and bad flags answer here, before JAX loads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

import psgd_optax as psgd  # noqa: E402
from _common import save_curves  # noqa: E402

BATCH = 500
L2 = 1e-4
CLASSES = 10


def features(images):
  """Outer-product features ``vec(x xᵀ)`` and a constant 1, for rows of pixels in [0, 1]."""
  outer = images[:, :, None] * images[:, None, :]
  flat = outer.reshape(images.shape[0], -1)
  return np.concatenate([flat, np.ones((images.shape[0], 1), images.dtype)], axis=1)


def load_data(seed):
  images, labels = load_digits(return_X_y=True)
  images = (images / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
      images, labels.astype(np.int32), test_size=0.25, random_state=seed)
  return features(x_train), features(x_test), y_train, y_test


def loss_fn(weights, x, y):
  """Mean cross-entropy plus the L2 penalty; ``weights`` is the flat coefficient vector (so
  a whole-vector preconditioner sees it as one leaf)."""
  logits = x @ weights.reshape(x.shape[1], CLASSES)
  data = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return data + 0.5 * L2 * jnp.sum(weights ** 2)


SGD_LEARNING_RATES = (0.3, 1.0, 3.0)


def methods(sgd_lrs=SGD_LEARNING_RATES, psgd_lr=0.05, update_probability=1.0):
  """name → (optimizer, passes ``value_fn`` of a batch, full batch).

  PSGD uses the paper's settings (learning rate 0.05, preconditioner learning rate 0.1, a fit
  on every step) and its preconditioned-gradient clipping at norm 1. Without the clipping it
  diverged after ~500 steps: the flattest directions have curvature ~1e-4 (the L2 penalty),
  so a Newton-type ``P`` is large there and amplifies the mini-batch noise. SGD runs at each
  of ``sgd_lrs``."""
  lra = psgd.lra(rank=10, curvature="newton", precond_lr=0.1,
                 update_probability=update_probability)
  table = {"psgd.lra(rank=10) newton": (
               optax.chain(lra, optax.clip_by_global_norm(1.0), optax.scale(-psgd_lr)),
               True, False),
           "l-bfgs (full batch)": (optax.lbfgs(), True, True)}
  for lr in sgd_lrs:
    table[f"sgd lr={lr:g}"] = (optax.sgd(lr), False, False)
  return table


def train(tx, newton, full_batch, data, steps, seed, desc=None):
  """Train from zero weights; return the full-training-set loss after each step, the test
  error and the seconds taken."""
  x_train, x_test, y_train, y_test = (jnp.asarray(a) for a in data)
  weights = jnp.zeros(x_train.shape[1] * CLASSES)
  state = tx.init(weights)

  @jax.jit
  def step(weights, state, key):
    if full_batch:
      xb, yb = x_train, y_train
    else:
      idx = jax.random.choice(key, x_train.shape[0], (BATCH,), replace=False)
      xb, yb = x_train[idx], y_train[idx]
    batch_loss = lambda w: loss_fn(w, xb, yb)
    value, grads = jax.value_and_grad(batch_loss)(weights)
    extra = {}
    if newton:  # PSGD's HVPs and L-BFGS's line search both need the batch loss
      extra = {"value_fn": batch_loss}
    if full_batch:
      extra.update(value=value, grad=grads)
    updates, state = tx.update(grads, state, weights, **extra)
    weights = optax.apply_updates(weights, updates)
    return weights, state, loss_fn(weights, x_train, y_train)

  keys = jax.random.split(jax.random.key(seed), steps)
  began = time.perf_counter()  # the run's time includes its compile
  losses = []
  for key in tqdm(keys, desc=desc, leave=False, disable=desc is None):
    weights, state, loss = step(weights, state, key)
    losses.append(loss)
  losses = np.asarray(jax.device_get(losses))
  seconds = time.perf_counter() - began
  error = float(jnp.mean(jnp.argmax(x_test @ weights.reshape(-1, CLASSES), -1) != y_test))
  return losses, error, seconds


def compare(steps, seeds, sgd_lrs=SGD_LEARNING_RATES, names=None, progress=True,
            **psgd_options):
  """name → list over seeds of (loss curve, test error, seconds) for the methods whose name
  starts with one of ``names`` (all by default); SGD keeps its best learning rate (lowest
  final training loss, summed over seeds). ``psgd_options`` go to :func:`methods`."""
  results = {}
  for name, (tx, newton, full_batch) in methods(sgd_lrs, **psgd_options).items():
    if names is not None and not any(name.startswith(prefix) for prefix in names):
      continue
    for seed in seeds:
      run = train(tx, newton, full_batch, load_data(seed), steps, seed,
                  desc=f"{name} (seed {seed})" if progress else None)
      results.setdefault(name, []).append(run)
  swept = [name for name in results if name.startswith("sgd")]
  if swept:
    best = min(swept, key=lambda name: sum(run[0][-1] for run in results[name]))
    for name in swept:
      if name != best:
        del results[name]
  return results


def main(argv=None):
  args = parse_args(argv)
  psgd_lr = 0.05 if args.learning_rate is None else args.learning_rate
  results = compare(args.steps, args.seeds, names=args.optimizers, psgd_lr=psgd_lr,
                    update_probability=args.update_probability)

  print(f"\nlogistic regression on outer-product features of load_digits (40,970 coefficients),"
        f" {args.steps} iterations, seeds {args.seeds} ({jax.devices()[0].platform})")
  minimum = min(float(np.min(run[0])) for runs in results.values() for run in runs)
  print(f"{'method':<28}{'final train loss':>18}{'excess':>10}{'test error %':>16}"
        f"{'seconds':>9}")
  for name, runs in results.items():
    final = np.array([run[0][-1] for run in runs])
    error = 100 * np.array([run[1] for run in runs])
    print(f"{name:<28}{np.mean(final):>18.5f}{np.mean(final) - minimum:>10.2g}"
          f"{error.mean():>9.2f} ± {error.std():.2f}{np.mean([run[2] for run in runs]):>9.1f}")

  print("seconds: the run's wall time, its compile included")
  if not args.no_plot:
    save_curves({name: np.mean([run[0] for run in runs], axis=0)
                 for name, runs in results.items()},
                args.plot, xlabel="iteration", ylabel="training loss (full training set)",
                title="logistic regression, outer-product features")


if __name__ == "__main__":
  main()
