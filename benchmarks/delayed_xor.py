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

All seeds of a method train together: ``vmap`` over the seeds inside one jitted
``lax.while_loop`` that stops when every seed has succeeded (each seed's run is the one it
would have alone). The step counts stay unbatched, so PSGD's update coin stays a branch, not a
select. Methods are spread over worker processes (one per core). Prints, per length and
method, the successes over the seeds, the median steps to success, the seconds the method took
and each seed's steps.

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


def _state_axes(state):
  """vmap axes of an optimizer state: every leaf batched over seeds except the step counts.

  The counts are the same for every seed, and keeping them unbatched keeps the engine's
  update coin (a function of the count and the optimizer's seed) unbatched, so its
  ``lax.cond`` stays a branch under ``vmap`` instead of becoming a select that would pay for
  every skipped fit."""
  def axis(path, _):
    last = path[-1] if path else None
    return None if getattr(last, "name", None) == "count" else 0
  return jax.tree_util.tree_map_with_path(axis, state)


def train_seeds(tx, value_fn_layout, length, seeds, max_steps, chunk=5000, progress=None):
  """Steps to success of each seed (``None`` for a failure), all seeds trained together.

  The seeds are ``vmap``ped inside one jitted ``lax.while_loop`` that stops when every seed
  has succeeded or the budget is spent; it runs in chunks of ``chunk`` steps so that
  ``progress(step, steps_so_far)`` can report between them. Each seed's run is the run it would
  have alone (its own initialization and data; the optimizer's seed, hence its probes and
  update coin, is the same for all, as it would be in separate runs).

  ``value_fn_layout``: ``None`` (first order), ``"tree"`` (``value_fn`` of the params) or
  ``"flat"`` (under ``optax.flatten`` the inner transformation sees the flat vector)."""
  seeds = jnp.asarray(seeds)
  params = jax.vmap(lambda seed: init_params(jax.random.fold_in(jax.random.key(0), seed)))(
      seeds)
  axes = _state_axes(jax.eval_shape(tx.init, jax.tree.map(lambda leaf: leaf[0], params)))

  def one_seed(params, state, key):
    inputs, targets = make_batch(key, length)
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    batch_loss = lambda p: loss_fn(p, inputs, targets)
    extra = {}
    if value_fn_layout == "tree":
      extra = {"value_fn": batch_loss}
    elif value_fn_layout == "flat":
      unravel = jax.flatten_util.ravel_pytree(params)[1]
      extra = {"value_fn": lambda flat: batch_loss(unravel(flat))}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, loss

  all_seeds = jax.vmap(one_seed, in_axes=(0, axes, 0), out_axes=(0, axes, 0))

  def one_step(carry):
    step, keys, params, state, smooth, solved_at = carry
    keys, batch_keys = jnp.split(jax.vmap(jax.random.split)(keys), 2, axis=1)
    params, state, loss = all_seeds(params, state, batch_keys[:, 0])
    smooth = 0.99 * smooth + 0.01 * jnp.nan_to_num(loss, nan=10.0)
    step = step + 1
    solved_at = jnp.where((solved_at < 0) & (smooth < SUCCESS_LOSS), step, solved_at)
    return step, keys[:, 0], params, state, smooth, solved_at

  @jax.jit
  def run_chunk(carry, limit):
    not_done = lambda carry: (carry[0] < limit) & jnp.any(carry[-1] < 0)
    return jax.lax.while_loop(not_done, one_step, carry)

  carry = (jnp.asarray(0),
           jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(1), seed))(seeds),
           params, jax.jit(jax.vmap(tx.init, out_axes=axes))(params),
           jnp.full(seeds.shape, 0.7), jnp.full(seeds.shape, -1))
  for limit in range(chunk, max_steps + chunk, chunk):
    carry = run_chunk(carry, min(limit, max_steps))
    solved_at = np.asarray(carry[-1])
    if progress is not None:
      progress(int(carry[0]), [int(steps) if steps >= 0 else None for steps in solved_at])
    if (solved_at >= 0).all():
      break
  return [int(steps) if steps >= 0 else None for steps in solved_at]


def _worker_init():
  # One XLA thread per worker: the RNN's matrices are tiny, so parallel seeds in separate
  # processes use the cores far better than intra-op threads.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_multi_thread_eigen=false")


def _job(args):
  name, adam_lr, length, seeds, max_steps, log = args
  tx, value_fn_layout = methods(adam_lr)[name]
  progress = None
  if log:
    progress = lambda step, steps: print(
        f"# length {length} {name}: step {step}, solved "
        f"{sum(count is not None for count in steps)}/{len(seeds)}: "
        f"{' '.join(str(count or '-') for count in steps)}", flush=True)
  began = time.perf_counter()
  steps = train_seeds(tx, value_fn_layout, length, seeds, max_steps, progress=progress)
  return steps, time.perf_counter() - began


def _row(length, name, steps, seconds):
  wins = [count for count in steps if count is not None]
  median_text = f"{np.median(wins):.0f}" if wins else "-"
  print(f"{length:>6} | {name:<28} | {len(wins):>3}/{len(steps):<3} | {median_text:>12} |"
        f" {seconds:>8.0f} | {' '.join(str(count or '-') for count in steps)}", flush=True)
  return len(wins), -(np.median(wins) if wins else np.inf)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64])
  parser.add_argument("--seeds", type=int, default=10)
  parser.add_argument("--max-steps", type=int, default=20_000)
  parser.add_argument("--adam-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  parser.add_argument("--log-seeds", action="store_true",
                      help="print each method's progress every 5000 steps")
  parser.add_argument("--only", nargs="+", choices=["lra", "kron", "adam"],
                      default=["lra", "kron", "adam"], help="methods to run")
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()},"
        f" {args.workers} worker processes), budget {args.max_steps} steps, {args.seeds} seeds;"
        f" adam's lr is swept at length {args.lengths[0]} and its best lr reused after")
  print(f"{'length':>6} | {'method':<28} | {'success':>7} | {'median steps':>12} |"
        f" {'seconds':>8} | steps of each seed", flush=True)
  seeds = tuple(range(args.seeds))
  context = multiprocessing.get_context("spawn")
  adam_lrs = args.adam_lrs
  with context.Pool(args.workers, initializer=_worker_init) as pool:
    for length in args.lengths:
      jobs = [(name, adam_lrs[0], length, seeds, args.max_steps, args.log_seeds)
              for name in methods(adam_lrs[0])
              if not name.startswith("adam") and any(key in name for key in args.only)]
      if "adam" in args.only:
        jobs += [(f"adam lr={lr:g}", lr, length, seeds, args.max_steps, args.log_seeds)
                 for lr in adam_lrs]
      adam_ranks = {}
      for index, (steps, seconds) in pool.imap_unordered(_indexed_job, list(enumerate(jobs))):
        name, adam_lr = jobs[index][:2]
        rank = _row(length, name, steps, seconds)
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
