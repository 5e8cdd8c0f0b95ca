"""Delayed XOR with a vanilla tanh RNN (Li 2018 Experiment 2; Li et al. 2023 Table 8).

Each sequence has random ±1 values in channel 0 and two markers in channel 1, one in the
first 10% of the sequence and one in 10–50%; the target is the XOR of the two marked
values. A tanh RNN with 30 hidden units reads the sequence; loss is the logistic loss of
its final output, batch 128, fresh data every step. Success: loss < 0.1 (smoothed over 100
steps) within the step budget; the authors' demos' looser criterion (the first batch whose own
loss is below 0.1) is printed beside it.

Methods: ``psgd.lra(rank=10)`` (whole model, ``optax.flatten``) and ``psgd.kron`` (Newton
type, HVPs from ``value_fn`` on fitting steps, update probability 0.1) with the papers'
preconditioned-gradient clipping at 1 and learning rate 0.01, and ``optax.adam`` at the best
of a small learning-rate sweep. Adam's sweep runs at the first length; its best learning rate
(most successes, then fewest median steps) is reused at the longer lengths.

All seeds of a method train together: ``vmap`` over the seeds inside one jitted
``lax.while_loop`` that stops when every seed has succeeded (each seed's run is the one it
would have alone). The step counts stay unbatched, so PSGD's update coin stays a branch, not a
select. Methods are spread over worker processes (one per core); with fewer methods than
workers each method's seeds are split into groups, one process each. Prints, per length and
method, the successes over the seeds, the median steps to success, the seconds the method took
(summed over its seed groups) and each seed's steps.

Run:  python benchmarks/delayed_xor.py --lengths 32 64 --seeds 10 --max-steps 100000
(add ``--checkpoint-dir DIR`` to make the runs resumable: rerunning the same command continues
each run from its last 5000-step chunk, with the same result as an uninterrupted run)
(the default budget, 20000 steps, is smaller so the script finishes sooner; results with the
budget used are recorded in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import platform
import sys
import time

import jax
import numpy as np
import optax

import psgd_optax as psgd

# The task, the RNN and the vmapped trainer live with the example (examples/_rnn_tasks.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import _rnn_tasks  # noqa: E402
import delayed_xor as delayed_xor_example  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _lra_authors_order import demo_curvature, lra_authors_order  # noqa: E402


# LRA fitted as the papers' experiments and the authors' delayed-XOR demo do, one change at a
# time against the example's settings (update probability 0.1, precond_lr 0.1, a Lipschitz
# estimate with memory 0.9): a fit on every step at step 0.01, each normalized on its own.
_PAPER_FIT = dict(update_probability=1.0, precond_lr=0.01, lipschitz_decay=0.0)


def _authors_code():
  return lra_authors_order(rank=10, curvature="newton", init_scale=1.0, authors_code=True,
                           **_PAPER_FIT)


LRA_RECIPES = {
    "paper": lambda: psgd.lra(rank=10, curvature="newton", **_PAPER_FIT),
    # ... with the demo's initial Q = I instead of a scale set from the first pair
    "paper_init1": lambda: psgd.lra(rank=10, curvature="newton", init_scale=1.0, **_PAPER_FIT),
    # ... with the authors' code's factor order, Q = (I + UVᵀ)diag(d)
    "authors_order": lambda: lra_authors_order(rank=10, curvature="newton", **_PAPER_FIT),
    # ... and the rest of the authors' 2022 UVd class: Q = I at first, U and V drawn 10×
    # larger, factor steps normalized by their generators' exact norms
    "authors_code": _authors_code,
    # ... and its demo's Hessian-vector products: exact for 1000 steps, then forward differences
    "authors_code_fd": lambda: demo_curvature(_authors_code()),
}


def methods(adam_lr):
  """name → (optimizer, how it takes ``value_fn``): the example's methods at this Adam lr,
  and LRA with each of ``LRA_RECIPES``."""
  table = dict(delayed_xor_example.methods(adam_lr))
  for recipe, make in LRA_RECIPES.items():
    table[f"psgd.lra newton {recipe}"] = (
        _rnn_tasks.psgd_newton(optax.flatten(make())), "flat")
  return table


def _selected(name, only, lra_recipes):
  if name.startswith("psgd.lra newton "):
    return "lra" in only and name.removeprefix("psgd.lra newton ") in lra_recipes
  if "lra" in name:  # the example's LRA: the default recipe
    return "lra" in only and "default" in lra_recipes
  return any(key in name for key in only)


def _worker_init():
  # One XLA thread per worker: the RNN's matrices are tiny, so parallel seeds in separate
  # processes use the cores far better than intra-op threads.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_multi_thread_eigen=false")


def _checkpoint_path(directory, name, length, seeds):
  """Where a method's run at this length keeps its state between chunks (None: nowhere)."""
  if directory is None:
    return None
  slug = "".join(char if char.isalnum() or char in ".=" else "_" for char in name)
  return os.path.join(directory, f"{slug}_length{length}_seeds{'-'.join(map(str, seeds))}.npz")


def _job(args):
  name, adam_lr, length, seeds, max_steps, log, checkpoint_dir = args
  tx, value_fn_layout = methods(adam_lr)[name]
  progress = None
  if log:
    progress = lambda step, steps, losses: print(
        f"# length {length} {name}, seeds {' '.join(map(str, seeds))}: step {step}, solved "
        f"{sum(count is not None for count in steps)}/{len(seeds)}: "
        f"{' '.join(str(count or '-') for count in steps)}", flush=True)
  began = time.perf_counter()
  steps, curve, batch_steps = _rnn_tasks.train_seeds(
      tx, value_fn_layout, _rnn_tasks.delayed_xor(length), seeds, max_steps, progress=progress,
      checkpoint=_checkpoint_path(checkpoint_dir, name, length, seeds))
  return steps, time.perf_counter() - began, batch_steps, curve[-1]


def _row(length, name, steps, seconds, batch_steps, final_losses):
  wins = [count for count in steps if count is not None]
  median_text = f"{np.median(wins):.0f}" if wins else "-"
  print(f"{length:>6} | {name:<29} | {len(wins):>3}/{len(steps):<3} | {median_text:>12} |"
        f" {seconds:>8.0f} | {' '.join(str(count or '-') for count in steps)}", flush=True)
  # The authors' demos' criterion (one batch's loss < 0.1, counted up to where this run
  # stopped: the budget, or the last seed's success by ours) and where the seeds ended.
  batch_wins = sum(count is not None for count in batch_steps)
  print(f"{'':>6}   one batch < 0.1 (the demos' criterion): {batch_wins}/{len(steps)}, steps"
        f" {' '.join(str(count or '-') for count in batch_steps)}; final smoothed loss"
        f" {' '.join(f'{loss:.3g}' for loss in final_losses)}", flush=True)
  return len(wins), -(np.median(wins) if wins else np.inf)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64])
  parser.add_argument("--seeds", type=int, default=10, help="seeds 0 … N−1")
  parser.add_argument("--seed-list", type=int, nargs="+", default=None,
                      help="these seeds instead of 0 … N−1")
  parser.add_argument("--lra-recipes", nargs="+", choices=["default", *LRA_RECIPES],
                      default=["default"],
                      help="LRA's settings: the example's (default), the papers' fit on every "
                      "step (paper), with Q = I at first (paper_init1), with the authors' "
                      "factor order (authors_order), as the authors' 2022 code "
                      "(authors_code), and with its demo's finite-difference products after "
                      "step 1000 (authors_code_fd)")
  parser.add_argument("--max-steps", type=int, default=20_000)
  parser.add_argument("--adam-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  parser.add_argument("--log-seeds", action="store_true",
                      help="print each method's progress every 5000 steps")
  parser.add_argument("--only", nargs="+", choices=["lra", "kron", "adam"],
                      default=["lra", "kron", "adam"], help="methods to run")
  parser.add_argument("--checkpoint-dir", default=None,
                      help="keep each run's state here after every 5000 steps and resume from it"
                      " (a row of 1e5 steps takes core-hours); the seconds column then counts"
                      " only this process")
  args = parser.parse_args()
  if args.checkpoint_dir is not None:
    os.makedirs(args.checkpoint_dir, exist_ok=True)
  seeds = tuple(args.seed_list) if args.seed_list else tuple(range(args.seeds))
  print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()},"
        f" {args.workers} worker processes), budget {args.max_steps} steps, seeds {list(seeds)};"
        f" adam's lr is swept at length {args.lengths[0]} and its best lr reused after")
  print(f"{'length':>6} | {'method':<29} | {'success':>7} | {'median steps':>12} |"
        f" {'seconds':>8} | steps of each seed", flush=True)
  context = multiprocessing.get_context("spawn")
  adam_lrs = args.adam_lrs
  with context.Pool(args.workers, initializer=_worker_init) as pool:
    for length in args.lengths:
      runs = [(name, adam_lrs[0]) for name in methods(adam_lrs[0])
              if not name.startswith("adam") and _selected(name, args.only, args.lra_recipes)]
      if "adam" in args.only:
        runs += [(f"adam lr={lr:g}", lr) for lr in adam_lrs]
      # Fewer runs than workers: each run's seeds are split into groups, one job each (a
      # seed's run is the same in any group, up to the rounding of batched kernels).
      groups = np.array_split(np.array(seeds), max(1, min(len(seeds),
                                                          args.workers // max(1, len(runs)))))
      jobs = [(name, adam_lr, length, tuple(int(s) for s in group), args.max_steps,
               args.log_seeds, args.checkpoint_dir)
              for name, adam_lr in runs for group in groups]
      done = collections.defaultdict(dict)
      adam_ranks = {}
      for index, result in pool.imap_unordered(_indexed_job, list(enumerate(jobs))):
        name, adam_lr, _, group = jobs[index][:4]
        done[name][group] = result
        if len(done[name]) < len(groups):
          continue
        parts = [done[name][group] for group in sorted(done[name])]
        # Per seed in seed order; the seconds add up the groups' (the core time).
        rank = _row(length, name, [c for p in parts for c in p[0]], sum(p[1] for p in parts),
                    [c for p in parts for c in p[2]],
                    np.concatenate([np.atleast_1d(p[3]) for p in parts]))
        if name.startswith("adam"):
          adam_ranks[adam_lr] = rank
      if len(adam_ranks) > 1:
        adam_lrs = [max(adam_ranks, key=adam_ranks.get)]
        print(f"{'':>6}   best adam lr: {adam_lrs[0]:g} (reused at longer lengths)", flush=True)


def _indexed_job(indexed):
  index, job = indexed
  return index, _job(job)


if __name__ == "__main__":
  main()
