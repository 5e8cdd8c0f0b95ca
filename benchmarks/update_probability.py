"""Which preconditioner update probability to use by default: constants vs the annealing schedule.

    python benchmarks/update_probability.py                  # 2000 steps, seeds 0 1
    python benchmarks/update_probability.py --steps 500 --seeds 0

Trains the CNN of ``examples/digits.py`` with ``psgd.optimizers.kron`` (whitening) at constant
update probabilities and with ``psgd.update_probability_schedule()`` (1.0 for 250 steps, then
exponential decay to 0.03), all else equal, in one process. Prints, per setting, the training loss
(mean of the last 100 steps) at a quarter, half and all of the budget, the test accuracy, the
fraction of steps that fitted Q, and the seconds per 1000 steps.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from digits import load_data, train  # noqa: E402

import psgd_optax as psgd  # noqa: E402


def run(update_probability, steps, seed, batch=128):
  tx = psgd.optimizers.kron(learning_rate=optax.cosine_decay_schedule(3e-3, steps),
                            update_probability=update_probability, seed=seed)
  losses, accuracy, seconds = train(str(update_probability), tx, load_data(seed), steps,
                                    batch, seed, progress=False)
  schedule = update_probability if callable(update_probability) else (lambda t: update_probability)
  fit_fraction = float(np.mean([min(1.0, float(schedule(t))) for t in range(steps)]))
  return losses, accuracy, seconds, fit_fraction


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  args = parser.parse_args()
  settings = {"p=1.0": 1.0, "p=0.3": 0.3, "p=0.1": 0.1, "p=0.03": 0.03,
              "default schedule": psgd.update_probability_schedule()}
  marks = [args.steps // 4, args.steps // 2, args.steps]
  print(f"device: {jax.devices()[0].platform}; digits CNN, psgd.optimizers.kron, "
        f"{args.steps} steps, seeds {args.seeds}")
  header = "".join(f"{'loss@' + str(m):>12}" for m in marks)
  print(f"{'update probability':<20}{header}{'test acc':>10}{'fit frac':>10}{'s/1k steps':>12}")
  for name, probability in settings.items():
    runs = [run(probability, args.steps, seed) for seed in args.seeds]
    losses = np.mean([r[0] for r in runs], axis=0)
    at = "".join(f"{losses[max(0, m - 100):m].mean():>12.4f}" for m in marks)
    accuracy = np.mean([r[1] for r in runs])
    seconds = np.mean([r[2] for r in runs]) / args.steps * 1000
    print(f"{name:<20}{at}{accuracy:>10.4f}{runs[0][3]:>10.2f}{seconds:>12.1f}")


if __name__ == "__main__":
  main()
