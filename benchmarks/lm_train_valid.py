"""Training against validation loss on the language-model protocol: one seed of chosen
optimizers, each with its own learning rate and weight decay.

    python benchmarks/lm_train_valid.py --runs kron:0.01:0.1 kron:0.01:0.3 muon:0.05:0.1

Each run is ``benchmarks/lm.py``'s model, data and warmup + cosine schedule (2000 steps at
batch 32 by default); every ``--eval-every`` steps it prints the mean training loss of the
steps since the last row and the validation loss. It separates optimizing from
generalizing: the training text (1.2 MB) is seen about 6.7 times in 2000 steps. Runs go
side by side in separate processes (``--workers``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

from gpt import OPTIMIZERS  # noqa: E402  (gpt loads JAX only when it trains)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--runs", nargs="+", default=["kron:0.01:0.1", "muon:0.05:0.1"],
                      help="NAME:LR:WEIGHT_DECAY, NAME one of " + ", ".join(OPTIMIZERS))
  parser.add_argument("--seed", type=int, default=0, help="seed of every run")
  parser.add_argument("--steps", type=int, default=2000, help="training steps per run")
  parser.add_argument("--eval-every", type=int, default=50, help="steps between rows")
  parser.add_argument("--workers", type=int, default=2, help="runs trained at once")
  parser.add_argument("--rows", type=int, nargs="+", default=None,
                      help="print only these steps' rows (None: every row)")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def train_one(spec, args):
  """In this process: the run ``spec``; one JSON line of ``[step, train, valid]`` rows."""
  import gpt
  import lm
  name, peak, weight_decay = spec.split(":")
  config = lm.model_args(lm.parse_args(["--steps", str(args.steps)]))
  data = gpt.split_text(gpt.load_text())
  tx = gpt.make_optimizer(name, float(peak), args.steps, weight_decay=float(weight_decay))
  run = gpt.Run(config, name, float(peak), args.seed, *data, tx=tx)
  rows, step = [], 0
  while step < args.steps:
    count = min(args.eval_every, args.steps - step)
    train, _ = run.train_steps(count)
    step += count
    rows.append([step, train, run.validate()])
  print(json.dumps(rows))


def main(argv=None):
  args = parse_args(argv)
  if args.one:
    return train_one(args.one, args)
  for spec in args.runs:
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in OPTIMIZERS:
      raise SystemExit(f"--runs takes NAME:LR:WEIGHT_DECAY with NAME in {OPTIMIZERS}, "
                       f"got {spec!r}")
  command = [sys.executable, os.path.abspath(__file__), "--seed", str(args.seed), "--steps",
             str(args.steps), "--eval-every", str(args.eval_every), "--one"]
  results, pending = {}, list(args.runs)
  while pending:
    batch, pending = pending[:args.workers], pending[args.workers:]
    running = {spec: subprocess.Popen(command + [spec], stdout=subprocess.PIPE, text=True)
               for spec in batch}
    for spec, process in running.items():
      out, _ = process.communicate()
      if process.returncode:
        raise SystemExit(f"run {spec} failed")
      results[spec] = json.loads(out.strip().splitlines()[-1])
  print(f"byte GPT of benchmarks/lm.py, seed {args.seed}, {args.steps} steps; "
        "train: mean loss of the steps since the last row; valid: held-out loss")
  print(f"{'step':>6}" + "".join(f"{spec:>26}" for spec in args.runs))
  print(f"{'':>6}" + "".join(f"{'train':>13}{'valid':>13}" for _ in args.runs))
  for i, row in enumerate(results[args.runs[0]]):
    if args.rows is not None and row[0] not in args.rows:
      continue
    print(f"{row[0]:>6}" + "".join(f"{results[s][i][1]:>13.4f}{results[s][i][2]:>13.4f}"
                                   for s in args.runs))


if __name__ == "__main__":
  main()
