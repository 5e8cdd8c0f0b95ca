"""Rosenbrock from (−1, 1), PSGD Newton type: iterations to f < 1e-10 over probe seeds.

    python benchmarks/rosenbrock_newton.py          # every geometry, lr 0.2 0.5 1, decay 0.9 0
    python benchmarks/rosenbrock_newton.py --geometries eq --precond-lrs 1 --lipschitz-decays 0

Paper 000 §7.1 reaches f < 1e-10 in about 200 iterations. Each run is
``examples/rosenbrock.py``'s Newton-type Kron (one dense 2×2 factor, float64, a fit on every
step, unit step size), with the paper's clipping of the preconditioned gradient at norm 1 and
without it; only the probe seed changes between runs, no per-seed tuning. ``lipschitz_decay``
0 normalizes each fit step by its own bound, as paper 000 does; the default 0.9 by a decaying
maximum of past bounds. Prints, per geometry, ``precond_lr``, decay and clipping: the median,
best and worst iterations over the seeds (``-``: not reached in ``--steps``) and how many
seeds reached the tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--steps", type=int, default=500, help="iterations per run")
  parser.add_argument("--seeds", type=int, default=20, help="probe seeds 0 .. N-1")
  parser.add_argument("--geometries", nargs="+", default=["q0.5eq1.5", "quad", "eq"])
  parser.add_argument("--precond-lrs", type=float, nargs="+", default=[0.2, 0.5, 1.0])
  parser.add_argument("--lipschitz-decays", type=float, nargs="+", default=[0.9, 0.0])
  return parser.parse_args(argv)


def iterations(geometry, precond_lr, decay, clip, seed, steps):
  import optax

  import psgd_optax as psgd
  from rosenbrock import iterations_to, run
  tail = [optax.clip_by_global_norm(1.0)] if clip else []
  tx = optax.chain(psgd.kron(curvature="newton", update_probability=1.0,
                             precond_dtype="float64", geometry=geometry,
                             precond_lr=precond_lr, lipschitz_decay=decay, seed=seed),
                   *tail, optax.scale(-1.0))
  return iterations_to(run(tx, steps))


def main(argv=None):
  args = parse_args(argv)
  import jax
  import numpy as np
  jax.config.update("jax_enable_x64", True)
  print(f"Rosenbrock from (-1, 1), kron Newton, {args.seeds} probe seeds, {args.steps} "
        "iterations, float64")
  print(f"{'geometry':<11}{'precond_lr':>11}{'decay':>7}{'clip':>6}{'median':>8}{'best':>6}"
        f"{'worst':>7}{'reached':>9}")
  rows = [(g, lr, d, clip) for g in args.geometries for d in args.lipschitz_decays
          for lr in args.precond_lrs for clip in (True, False)]
  for geometry, precond_lr, decay, clip in rows:
    counts = [iterations(geometry, precond_lr, decay, clip, seed, args.steps)
              for seed in range(args.seeds)]
    reached = [c for c in counts if c is not None]
    # Unreached runs count as beyond the horizon, so the median is honest.
    padded = np.asarray([args.steps + 1 if c is None else c for c in counts])
    median = float(np.median(padded))
    show = lambda x: "-" if x > args.steps else f"{x:.0f}"
    print(f"{geometry:<11}{precond_lr:>11g}{decay:>7g}{'yes' if clip else 'no':>6}"
          f"{show(median):>8}{show(padded.min()):>6}{show(padded.max()):>7}"
          f"{len(reached):>6}/{args.seeds}", flush=True)


if __name__ == "__main__":
  main()
