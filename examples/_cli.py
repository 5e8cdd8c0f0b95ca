"""The examples' shared command line. Standard library only: each example parses its flags
before it imports JAX, so ``--help`` and a mistyped flag answer at once."""

from __future__ import annotations

import argparse


def example_parser(doc: str, *, steps: int, seeds, optimizers, plot: str,
                   default_optimizers=None, learning_rate_help: str | None = None):
  """``--steps --seeds --optimizers --learning-rate --plot --no-plot``, with the defaults
  shown in ``--help``; an example adds its own flags to the parser it returns."""
  parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--steps", type=int, default=steps, help="training steps per run")
  parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds),
                      help="seeds; the table gives the mean over them")
  parser.add_argument("--optimizers", nargs="+", choices=list(optimizers),
                      default=list(default_optimizers or optimizers),
                      help="which optimizers to run")
  parser.add_argument("--learning-rate", type=float, default=None,
                      help=learning_rate_help or "one peak learning rate for every chosen "
                      "optimizer, for sweeps (default: each optimizer's own, LEARNING_RATES)")
  parser.add_argument("--plot", default=plot, help="where to save the figure")
  parser.add_argument("--no-plot", action="store_true", help="save no figure")
  return parser


def learning_rate_overrides(args, names):
  """name → ``--learning-rate`` for every optimizer name, or ``None`` without the flag."""
  if args.learning_rate is None:
    return None
  return {name: args.learning_rate for name in names}
