"""Delayed XOR with a vanilla tanh RNN (Li 2018 Experiment 2; Li et al. 2023 Table 8).

Each sequence has random ±1 values in channel 0 and two markers in channel 1, one in the
first 10% of the sequence and one in 10–50%; the target is the XOR of the two marked
values. A tanh RNN with 30 hidden units reads the sequence; loss is the logistic loss of
its final output, batch 128, fresh data every step. Success: loss < 0.1 (smoothed over 100
steps) within the step budget.

Methods: ``psgd.lra(rank=10)`` (whole model, ``optax.flatten``) and ``psgd.kron`` (Newton
type, HVPs from ``value_fn`` on fitting steps, update probability 0.1) with the papers'
preconditioned-gradient clipping at 1 and learning rate 0.01, and ``optax.adam`` at the best
of a small learning-rate sweep. Adam's sweep runs at the first length; its best learning rate
(most successes, then fewest median steps) is reused at the longer lengths.

Each seed trains in one jitted ``lax.while_loop`` that stops at success; seeds are spread over
worker processes (one per core). Prints, per length and method, the successes over the seeds,
the median steps to success and the core-seconds spent.

Run:  python benchmarks/delayed_xor.py --lengths 32 64 --seeds 10 --max-steps 100000
(the default budget, 20000 steps, is smaller so the script finishes sooner; results with the
budget used are recorded in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import psgd_optax as psgd

HIDDEN, BATCH = 30, 128
SUCCESS_LOSS = 0.1


def make_batch(key, length):
  key_values, key_first, key_second = jax.random.split(key, 3)
  values = jax.random.choice(key_values, jnp.asarray([-1.0, 1.0]), (BATCH, length))
  first = jnp.floor(jax.random.uniform(key_first, (BATCH,)) * 0.1 * length).astype(int)
  second = jnp.floor(jax.random.uniform(key_second, (BATCH,)) * 0.4 * length
                     + 0.1 * length).astype(int)
  rows = jnp.arange(BATCH)
  markers = jnp.zeros((BATCH, length)).at[rows, first].set(1.0).at[rows, second].set(1.0)
  same = values[rows, first] == values[rows, second]
  targets = jnp.where(same, -1.0, 1.0)
  return jnp.stack([values, markers], axis=-1), targets


def init_params(key):
  keys = jax.random.split(key, 3)
  recurrent, _ = jnp.linalg.qr(jax.random.normal(keys[1], (HIDDEN, HIDDEN)))
  return {"w_in": 0.1 * jax.random.normal(keys[0], (2, HIDDEN)), "w_rec": recurrent,
          "b": jnp.zeros(HIDDEN), "w_out": 0.1 * jax.random.normal(keys[2], (HIDDEN, 1)),
          "b_out": jnp.zeros([])}


def loss_fn(params, inputs, targets):
  def cell(hidden, x):
    return jnp.tanh(x @ params["w_in"] + hidden @ params["w_rec"] + params["b"]), None
  final, _ = jax.lax.scan(cell, jnp.zeros((BATCH, HIDDEN)), jnp.swapaxes(inputs, 0, 1))
  logits = (final @ params["w_out"])[:, 0] + params["b_out"]
  return jnp.mean(jax.nn.softplus(-targets * logits))


def methods(adam_lr):
  clip = optax.clip_by_global_norm(1.0)
  return {
      "psgd.lra(rank=10) newton": (optax.chain(
          optax.flatten(psgd.lra(rank=10, curvature="newton", update_probability=0.1)),
          clip, optax.scale(-0.01)), "flat"),
      "psgd.kron newton": (optax.chain(
          psgd.kron(curvature="newton", update_probability=0.1), clip,
          optax.scale(-0.01)), "tree"),
      f"adam lr={adam_lr:g}": (optax.adam(adam_lr), None),
  }


def train_one(tx, value_fn_layout, length, seed, max_steps):
  """Steps to success for one seed (``None`` for a failure).

  One jitted ``lax.while_loop`` that stops at success. Seeds run one by one, not vmapped:
  under ``vmap`` the engine's ``lax.cond`` becomes a select and every step would pay for the
  fit that ``update_probability`` skips.

  ``value_fn_layout``: ``None`` (first order), ``"tree"`` (``value_fn`` of the params) or
  ``"flat"`` (under ``optax.flatten`` the inner transformation sees the flat vector)."""

  def one_step(carry):
    step, key, params, state, smooth = carry
    key, batch_key = jax.random.split(key)
    inputs, targets = make_batch(batch_key, length)
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    batch_loss = lambda p: loss_fn(p, inputs, targets)
    extra = {}
    if value_fn_layout == "tree":
      extra = {"value_fn": batch_loss}
    elif value_fn_layout == "flat":
      unravel = jax.flatten_util.ravel_pytree(params)[1]
      extra = {"value_fn": lambda flat: batch_loss(unravel(flat))}
    updates, state = tx.update(grads, state, params, **extra)
    smooth = 0.99 * smooth + 0.01 * jnp.nan_to_num(loss, nan=10.0)
    return step + 1, key, optax.apply_updates(params, updates), state, smooth

  def not_done(carry):
    step, _, _, _, smooth = carry
    return (step < max_steps) & (smooth >= SUCCESS_LOSS)

  @jax.jit
  def run(seed):
    params = init_params(jax.random.fold_in(jax.random.key(0), seed))
    carry = (jnp.asarray(0), jax.random.fold_in(jax.random.key(1), seed), params,
             tx.init(params), jnp.asarray(0.7))
    step, *_, smooth = jax.lax.while_loop(not_done, one_step, carry)
    return step, smooth

  step, smooth = run(seed)
  return int(step) if float(smooth) < SUCCESS_LOSS else None


def _worker_init():
  # One XLA thread per worker: the RNN's matrices are tiny, so parallel seeds in separate
  # processes use the cores far better than intra-op threads.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_multi_thread_eigen=false")


def _job(args):
  name, adam_lr, length, seed, max_steps = args
  tx, value_fn_layout = methods(adam_lr)[name]
  began = time.perf_counter()
  steps = train_one(tx, value_fn_layout, length, seed, max_steps)
  return steps, time.perf_counter() - began


def _run_jobs(pool, jobs, log):
  """Results of ``jobs`` in order; each seed's result is also logged as it finishes, so a run
  cut short still leaves its finished seeds on record."""
  results = [None] * len(jobs)
  for index, result in pool.imap_unordered(_indexed_job, list(enumerate(jobs))):
    results[index] = result
    name, _, length, seed, _ = jobs[index]
    steps, seconds = result
    if log:
      print(f"# length {length} {name} seed {seed}: "
            f"{'solved at ' + str(steps) if steps is not None else 'not solved'} "
            f"({seconds:.0f} s)", flush=True)
  return results


def _indexed_job(indexed):
  index, job = indexed
  return index, _job(job)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64])
  parser.add_argument("--seeds", type=int, default=10)
  parser.add_argument("--max-steps", type=int, default=20_000)
  parser.add_argument("--adam-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
  parser.add_argument("--sweep-seeds", type=int, default=None,
                      help="seeds of adam's lr sweep (default: all); the best lr then runs "
                           "every seed")
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  parser.add_argument("--log-seeds", action="store_true",
                      help="print each seed's result as it finishes")
  parser.add_argument("--only", nargs="+", choices=["lra", "kron", "adam"],
                      default=["lra", "kron", "adam"], help="methods to run")
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()},"
        f" {args.workers} worker processes), budget {args.max_steps} steps, {args.seeds} seeds;"
        f" adam's lr is swept at length {args.lengths[0]} and its best lr reused after")
  print(f"{'length':>6} | {'method':<28} | {'success':>7} | {'median steps':>12} |"
        f" {'core-seconds':>12}", flush=True)
  context = multiprocessing.get_context("spawn")
  best_adam_lr = None
  with context.Pool(args.workers, initializer=_worker_init) as pool:
    for length in args.lengths:
      adam_lrs = args.adam_lrs if best_adam_lr is None else [best_adam_lr]
      runs = [(name, adam_lrs[0]) for name in methods(adam_lrs[0])
              if not name.startswith("adam") and any(key in name for key in args.only)]
      if "adam" in args.only:
        runs += [(f"adam lr={lr:g}", lr) for lr in adam_lrs]
      adam_results = []
      sweeping = best_adam_lr is None and len(adam_lrs) > 1
      sweep_seeds = min(args.sweep_seeds or args.seeds, args.seeds)
      sweep_results = {}
      for name, adam_lr in runs:
        seeds = sweep_seeds if sweeping and name.startswith("adam") else args.seeds
        jobs = [(name, adam_lr, length, seed, args.max_steps) for seed in range(seeds)]
        results = _run_jobs(pool, jobs, args.log_seeds)
        if seeds < args.seeds:
          sweep_results[adam_lr] = results
          print(f"{length:>6} | {name + ' (sweep)':<28} | "
                f"{sum(s is not None for s, _ in results):>3}/{seeds:<3} |", flush=True)
          continue
        wins = [steps for steps, _ in results if steps is not None]
        median_text = f"{np.median(wins):.0f}" if wins else "-"
        seconds = sum(took for _, took in results)
        print(f"{length:>6} | {name:<28} | {len(wins):>3}/{args.seeds:<3} | {median_text:>12} |"
              f" {seconds:>12.0f}", flush=True)
        if name.startswith("adam"):
          adam_results.append((len(wins), -(np.median(wins) if wins else np.inf), adam_lr))
      if sweep_results:  # the sweep ran on a few seeds: pick by them, then run every seed
        def sweep_rank(lr):
          wins = [steps for steps, _ in sweep_results[lr] if steps is not None]
          return len(wins), -(np.median(wins) if wins else np.inf)
        best_adam_lr = max(sweep_results, key=sweep_rank)
        print(f"{'':>6}   best adam lr on {sweep_seeds} seeds: {best_adam_lr:g}", flush=True)
        name = f"adam lr={best_adam_lr:g}"
        jobs = [(name, best_adam_lr, length, seed, args.max_steps)
                for seed in range(sweep_seeds, args.seeds)]
        results = sweep_results[best_adam_lr] + _run_jobs(pool, jobs, args.log_seeds)
        wins = [steps for steps, _ in results if steps is not None]
        median_text = f"{np.median(wins):.0f}" if wins else "-"
        seconds = sum(took for _, took in results)
        print(f"{length:>6} | {name:<28} | {len(wins):>3}/{args.seeds:<3} | {median_text:>12} |"
              f" {seconds:>12.0f}", flush=True)
      elif adam_results and best_adam_lr is None:
        best_adam_lr = max(adam_results)[2]
        print(f"{'':>6}   best adam lr: {best_adam_lr:g}", flush=True)


if __name__ == "__main__":
  main()
