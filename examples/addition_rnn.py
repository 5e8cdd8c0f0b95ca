"""The addition problem with a vanilla tanh RNN and mini-batch size 1: PSGD vs first order.

    python examples/addition_rnn.py                     # length 30, seeds 0-2, 50000 steps
    python examples/addition_rnn.py --steps 100000 --optimizers diag kron lra adam sgd

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

from _cli import example_parser

OPTIMIZERS = ("diag", "kron", "lra", "adam", "sgd")


def parse_args(argv=None):
  parser = example_parser(__doc__, steps=50_000, seeds=[0, 1, 2], optimizers=OPTIMIZERS,
                          default_optimizers=("kron", "lra", "adam", "sgd"),
                          plot="addition_rnn.png")
  parser.add_argument("--length", type=int, default=30, help="sequence length")
  parser.add_argument("--batch", type=int, default=1, help="sequences per step")
  return parser.parse_args(argv)


if __name__ == "__main__":
  parse_args()  # --help and bad flags answer here, before JAX loads

import optax  # noqa: E402

import psgd_optax as psgd  # noqa: E402
from _rnn_tasks import addition, compare, psgd_newton, report  # noqa: E402


# Learning rates: each the best of a sweep over 50000 steps and seeds 0-2 (BENCHMARKS.md):
# PSGD 0.01, 0.03, 0.1 (of clipped steps of norm ≤ 1); Adam 1e-4 … 3e-3; SGD 3e-3 … 0.1.
LEARNING_RATES = {"diag": 0.03, "kron": 0.03, "lra": 0.03, "adam": 1e-3, "sgd": 1e-2}


def methods(learning_rates=None):
  """name → (optimizer, how it takes ``value_fn``), keyed by the short names of
  ``LEARNING_RATES``, whose values ``learning_rates`` overrides."""
  lr = dict(LEARNING_RATES, **(learning_rates or {}))
  newton = dict(curvature="newton", update_probability=0.1)
  return {
      "diag": (f"psgd.diag newton lr={lr['diag']:g}",
               psgd_newton(psgd.diag(**newton), lr["diag"]), "tree"),
      "kron": (f"psgd.kron newton lr={lr['kron']:g}",
               psgd_newton(psgd.kron(**newton), lr["kron"]), "tree"),
      "lra": (f"psgd.lra(rank=10) newton lr={lr['lra']:g}",
              psgd_newton(optax.flatten(psgd.lra(rank=10, **newton)), lr["lra"]), "flat"),
      "adam": (f"adam lr={lr['adam']:g}", optax.adam(lr["adam"]), None),
      "sgd": (f"sgd lr={lr['sgd']:g}", optax.sgd(lr["sgd"]), None),
  }


def main(argv=None):
  args = parse_args(argv)
  overrides = None
  if args.learning_rate is not None:
    overrides = {key: args.learning_rate for key in LEARNING_RATES}
  chosen = {name: (tx, layout) for key, (name, tx, layout) in methods(overrides).items()
            if key in args.optimizers}
  task = addition(args.length, args.batch)
  chunk = max(args.steps // 100, 1)
  results = compare(task, chosen, args.seeds, args.steps, chunk)
  report(task, results, args.seeds, args.steps, chunk, None if args.no_plot else args.plot)

if __name__ == "__main__":
  main()
