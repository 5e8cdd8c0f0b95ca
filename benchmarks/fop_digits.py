"""FOP and hypergradient learning rates on a small CNN (paper 003's comparison, on digits).

    python benchmarks/fop_digits.py                       # 1000 steps, seeds 0 1 2
    python benchmarks/fop_digits.py --steps 300 --seeds 0

Trains the CNN of ``examples/digits.py`` (two 3×3 convolutions and a linear head, batch 128)
with SGD + momentum 0.9 at one learning rate ε, alone and with a learned preconditioner in
front: FOP over each kernel's fan-in (full rank), low-rank FOP (``P = I + MMᵀ``, rank 8), the
spatial FOP of the paper (a 9×9 matrix per conv kernel, shared across channels), and the scalar
(S-HD) and per-parameter (PP-HD) hypergradient learning rates. Every preconditioner is moved by
Adam at 1e-4, the paper's setting, and gets the same ε. Same budget, data and seeds for all;
prints the mean test accuracy (and its spread over seeds), the final training loss and the time
per step relative to plain SGD + momentum, all measured in this one run.
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


def methods(lr, momentum):
  sgd = lambda: optax.sgd(lr, momentum=momentum)
  return {
      "sgd+momentum": sgd(),
      "+ fop full (fan-in)": optax.chain(psgd.fop(lr, spatial=False), sgd()),
      "+ fop low rank 8": optax.chain(psgd.fop(lr, rank=8, spatial=False), sgd()),
      "+ fop spatial": optax.chain(psgd.fop(lr, spatial=True), sgd()),
      "+ S-HD": optax.chain(psgd.scalar_hypergradient(lr), sgd()),
      "+ PP-HD": optax.chain(psgd.per_parameter_hypergradient(lr), sgd()),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--momentum", type=float, default=0.9)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].platform}; digits CNN, batch 128, {args.steps} steps, "
        f"seeds {args.seeds}, SGD lr {args.lr} momentum {args.momentum}")
  print(f"{'method':<22}{'test acc':>10}{'± (seeds)':>11}{'final loss':>12}{'ms/step':>9}"
        f"{'time vs sgd':>13}")
  names = list(methods(args.lr, args.momentum))
  # Warm-up, so the first method's timing does not pay for process start-up.
  train("warm-up", methods(args.lr, args.momentum)[names[0]], load_data(0), 20, 128, 0,
        progress=False)
  runs = {name: [] for name in names}
  for seed in args.seeds:  # methods interleaved within a seed: the same machine load for all
    for name in names:
      tx = methods(args.lr, args.momentum)[name]
      losses, accuracy, seconds = train(name, tx, load_data(seed), args.steps, 128, seed,
                                        progress=False)
      runs[name].append((losses[-100:].mean(), accuracy, seconds / args.steps * 1e3))
  baseline_ms = np.mean([run[2] for run in runs[names[0]]])
  for name in names:
    loss, accuracy, ms = (np.asarray(column) for column in zip(*runs[name]))
    print(f"{name:<22}{accuracy.mean():>10.4f}{accuracy.std():>11.4f}{loss.mean():>12.4f}"
          f"{ms.mean():>9.2f}{ms.mean() / baseline_ms:>12.2f}×", flush=True)

if __name__ == "__main__":
  main()
