"""The addition problem with a vanilla tanh RNN and mini-batch size 1: PSGD vs first order.

    python examples/addition_rnn.py                     # length 30, seeds 0-2, 50000 steps
    python examples/addition_rnn.py --steps 100000 --methods diag kron lra adam sgd

Li 2018 (paper 001) Experiment 1 (the task of Hochreiter & Schmidhuber 1997): each sequence
holds values uniform in [0, 1] and two markers, one in each half; a tanh RNN with 30 hidden
units must output the mean of the two marked values after reading the whole sequence. The
paper deliberately uses mini-batch size 1, so the gradients are very noisy: PSGD damps the
noise and speeds up convergence at once. A blind guess scores 1/24 ≈ 0.042 (squared error);
a run is solved when its smoothed loss falls below 5e-3.

Prints, per method, the seeds solved, the median steps to success and the final smoothed
loss, and saves the loss curves to ``addition_rnn.png``. The default run takes about
3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse

import optax

import psgd_optax as psgd
from _rnn_tasks import addition, compare, psgd_newton, report


def methods():
  """name → (optimizer, how it takes ``value_fn``). Each learning rate is the best of a sweep
  over 50000 steps and seeds 0–2 (BENCHMARKS.md): PSGD 0.01, 0.03, 0.1 (clipped steps of
  norm ≤ 1); Adam 1e-4 … 3e-3; SGD 3e-3 … 0.1."""
  newton = dict(curvature="newton", update_probability=0.1)
  return {
      "psgd.diag newton": (psgd_newton(psgd.diag(**newton), 0.03), "tree"),
      "psgd.kron newton": (psgd_newton(psgd.kron(**newton), 0.03), "tree"),
      "psgd.lra(rank=10) newton": (psgd_newton(optax.flatten(psgd.lra(rank=10, **newton)),
                                               0.03), "flat"),
      "adam lr=3e-4": (optax.adam(3e-4), None),
      "sgd lr=1e-2": (optax.sgd(1e-2), None),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--length", type=int, default=30)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=50_000)
  parser.add_argument("--methods", nargs="+",
                      choices=["diag", "kron", "lra", "adam", "sgd"],
                      default=["kron", "lra", "adam", "sgd"])
  parser.add_argument("--plot", default="addition_rnn.png")
  args = parser.parse_args()
  chosen = {name: method for name, method in methods().items()
            if any(name.startswith(key) or f".{key}" in name for key in args.methods)}
  task = addition(args.length, args.batch)
  chunk = max(args.steps // 100, 1)
  results = compare(task, chosen, args.seeds, args.steps, chunk)
  report(task, results, args.seeds, args.steps, chunk, args.plot)


if __name__ == "__main__":
  main()
