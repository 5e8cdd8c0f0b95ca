"""Rosenbrock from (−1, 1): PSGD Newton and whitening types vs first-order methods.

    python examples/rosenbrock.py                 # 500 iterations, table + rosenbrock.png
    python examples/rosenbrock.py --steps 300 --no-plot

Paper 000, Figure 1: f(x, y) = 100 (y − x²)² + (1 − x)², minimum 0 at (1, 1). The PSGD runs use
the paper's preconditioned-gradient clipping (norm 1) and a unit step; the Newton type fits Q
to exact Hessian-vector products on every step, the whitening type to gradients. The first-order
methods and the whitening type get the best learning rate of a small sweep. Float64 throughout. Prints, per method,
the final f and the iterations to reach f < 1e-10, and saves the curves as a PNG.
"""

from __future__ import annotations

from _cli import example_parser

OPTIMIZERS = ("dense", "kron", "lra", "whitening", "gd", "momentum", "nesterov", "adam")


def parse_args(argv=None):
  parser = example_parser(
      __doc__, steps=500, seeds=[0], optimizers=OPTIMIZERS, plot="rosenbrock.png",
      learning_rate_help="one learning rate for the methods that need one (first-order and "
      "PSGD whitening) instead of each one's best of a small sweep; the Newton type keeps its "
      "unit step")
  return parser.parse_args(argv)


if __name__ == "__main__":
  parse_args()  # --help and bad flags answer here, before JAX loads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

import psgd_optax as psgd  # noqa: E402

START = (-1.0, 1.0)
TOLERANCE = 1e-10


def rosenbrock(x):
  return 100.0 * (x[1] - x[0] ** 2) ** 2 + (1.0 - x[0]) ** 2


def psgd_methods(seed=0):
  """The Newton-type PSGD runs, their probes drawn from ``seed``."""
  def psgd_tx(family, curvature, **options):
    return optax.chain(family(curvature=curvature, update_probability=1.0,
                              precond_dtype="float64", seed=seed, **options),
                       optax.clip_by_global_norm(1.0), optax.scale(-1.0))

  # Exact curvature on every step: each fit step normalized by its own bound
  # (lipschitz_decay=0, paper 000's rule) with the papers' triangular Q and a full step.
  # The default memory of past bounds (0.9), made for noisy fits, takes 2-4x the iterations
  # here (BENCHMARKS.md, benchmarks/rosenbrock_newton.py).
  exact = dict(geometry="eq", lipschitz_decay=0.0, precond_lr=1.0)
  return {
      "psgd dense newton": psgd_tx(psgd.dense, "newton", **exact),
      "psgd kron newton": psgd_tx(psgd.kron, "newton", **exact),
      "psgd lra newton": psgd_tx(psgd.lra, "newton", rank=1, lipschitz_decay=0.0,
                                 precond_lr=0.5),
  }


def swept_methods():
  """Methods that need a learning rate, swept: first-order ones and PSGD whitening (its
  normalized ``P g`` has unit size, so the unit step of the Newton type is too long)."""
  whitening = lambda lr: optax.chain(
      psgd.dense(curvature="whitening", update_probability=1.0, precond_dtype="float64",
                 precond_lr=0.2), optax.clip_by_global_norm(1.0), optax.scale(-lr))
  return {
      "psgd dense whitening": whitening,
      "gradient descent": lambda lr: optax.sgd(lr),
      "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
      "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
      "adam": lambda lr: optax.adam(lr),
  }


def run(tx, steps):
  """Losses over ``steps`` iterations from START (one jitted scan)."""
  x = jnp.asarray(START, jnp.float64)

  def body(carry, _):
    x, state = carry
    updates, state = tx.update(jax.grad(rosenbrock)(x), state, x, value_fn=rosenbrock)
    x = optax.apply_updates(x, updates)
    return (x, state), rosenbrock(x)

  _, losses = jax.jit(lambda x: jax.lax.scan(body, (x, tx.init(x)), None, length=steps))(x)
  return np.asarray(losses)


def iterations_to(losses, tolerance=TOLERANCE):
  hits = np.nonzero(losses < tolerance)[0]
  return int(hits[0]) + 1 if hits.size else None


LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # swept for the methods that need one
SHORT_NAMES = {"dense": "psgd dense newton", "kron": "psgd kron newton",
               "lra": "psgd lra newton", "whitening": "psgd dense whitening",
               "gd": "gradient descent", "momentum": "momentum", "nesterov": "nesterov",
               "adam": "adam"}


def compare(steps, learning_rates=LEARNING_RATES, progress=True, seeds=(0,), names=None):
  """``{method: losses}``: the Newton-type PSGD runs (one per probe seed, labelled with the
  seed when there are several) and each method that needs a learning rate at its best of
  ``learning_rates``; ``names``: a subset of ``SHORT_NAMES`` (all by default)."""
  with jax.enable_x64(True):  # float64 here only, not for whoever imports this module
    return _compare(steps, learning_rates, progress, seeds, names)


def _compare(steps, learning_rates, progress, seeds, names):
  chosen = {SHORT_NAMES[name] for name in (names or SHORT_NAMES)}
  results = {}
  jobs = [(name + (f" (seed {seed})" if len(seeds) > 1 else ""), tx, None)
          for seed in seeds for name, tx in psgd_methods(seed).items() if name in chosen]
  jobs += [(name, make(lr), lr) for name, make in swept_methods().items() if name in chosen
           for lr in learning_rates]
  for name, tx, lr in tqdm(jobs, desc="rosenbrock", disable=not progress):
    losses = run(tx, steps)
    losses = np.where(np.isfinite(losses), losses, np.inf)
    label = name if lr is None else f"{name} (lr {lr:g})"
    best = [key for key in results if key.startswith(name + " (")]
    if lr is None:
      results[label] = losses
    elif not best or losses[-1] < results[best[0]][-1]:
      for key in best:
        del results[key]
      results[label] = losses
  return results


def main(argv=None):
  args = parse_args(argv)
  rates = LEARNING_RATES if args.learning_rate is None else (args.learning_rate,)
  results = compare(args.steps, rates, seeds=args.seeds, names=args.optimizers)
  print(f"Rosenbrock from {START}, {args.steps} iterations (float64)")
  print(f"{'method':<30}{'final f':>12}{'iters to 1e-10':>16}")
  for name, losses in results.items():
    hit = iterations_to(losses)
    print(f"{name:<30}{losses[-1]:>12.3e}{hit if hit is not None else '-':>16}")
  if not args.no_plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, losses in results.items():
      axis.semilogy(np.maximum(losses, 1e-30), label=name)
    axis.set_xlabel("iteration")
    axis.set_ylabel("f(x)")
    axis.set_title("Rosenbrock from (−1, 1)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(f"saved {args.plot}")

if __name__ == "__main__":
  main()
