"""Delayed XOR with a vanilla tanh RNN (Li 2018 Experiment 2; Li et al. 2023 Table 8).

Each sequence has random ±1 values in channel 0 and two markers in channel 1, one in the
first 10% of the sequence and one in 10–50%; the target is the XOR of the two marked
values. A tanh RNN with 30 hidden units reads the sequence; loss is the logistic loss of
its final output, batch 128, fresh data every step. Success: loss < 0.1 (smoothed over 100
steps) within the step budget. All seeds of one method train in one vmapped, jitted loop.

Methods: ``psgd.lra(rank=10)`` and ``psgd.kron`` (Newton type, HVPs from ``value_fn`` on
fitting steps) with the papers' preconditioned-gradient clipping, and ``optax.adam`` at
the best of a small learning-rate sweep.

Run:  python benchmarks/delayed_xor.py --lengths 32 64 --seeds 10 --max-steps 100000
(the default budget is smaller so the script finishes on a laptop CPU; results with the
budget used are recorded in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import psgd_optax as psgd

HIDDEN, BATCH = 30, 128


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


def train(tx, value_fn_layout, length, seeds, max_steps, chunk=500):
  """Steps to success per seed (``None`` for a failure), all seeds vmapped.

  ``value_fn_layout``: ``None`` (first order), ``"tree"`` (``value_fn`` of the params) or
  ``"flat"`` (under ``optax.flatten`` the inner transformation sees the flat vector)."""

  def one_step(carry, key):
    params, state, smooth = carry
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
    return (optax.apply_updates(params, updates), state, 0.99 * smooth + 0.01 * loss), None

  def run_chunk(carry, keys):
    carry, _ = jax.lax.scan(one_step, carry, keys)
    return carry

  run_chunks = jax.jit(jax.vmap(run_chunk))
  params = jax.vmap(init_params)(jax.random.split(jax.random.key(0), seeds))
  states = jax.vmap(tx.init)(params)
  carry = (params, states, jnp.full((seeds,), 0.7))
  solved = [None] * seeds
  for start in range(0, max_steps, chunk):
    keys = jax.vmap(lambda s: jax.random.split(jax.random.fold_in(jax.random.key(s + 1), start),
                                               chunk))(jnp.arange(seeds))
    carry = run_chunks(carry, keys)
    smooth = np.asarray(carry[2])
    for i in range(seeds):
      if solved[i] is None and smooth[i] < 0.1:
        solved[i] = start + chunk
    if all(s is not None for s in solved):
      break
  return solved


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64])
  parser.add_argument("--seeds", type=int, default=10)
  parser.add_argument("--max-steps", type=int, default=20_000)
  parser.add_argument("--adam-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}),"
        f" budget {args.max_steps} steps, {args.seeds} seeds")
  print(f"{'length':>6} | {'method':<28} | {'success':>7} | {'median steps':>12} | time")
  for length in args.lengths:
    rows = []
    for adam_lr in args.adam_lrs:
      for name, (tx, value_fn_layout) in methods(adam_lr).items():
        if not name.startswith("adam") and adam_lr != args.adam_lrs[0]:
          continue
        began = time.perf_counter()
        solved = train(tx, value_fn_layout, length, args.seeds, args.max_steps)
        wins = [s for s in solved if s is not None]
        rows.append((name, len(wins), np.median(wins) if wins else None,
                     time.perf_counter() - began))
    adam_rows = [r for r in rows if r[0].startswith("adam")]
    best_adam = max(adam_rows, key=lambda r: (r[1], -(r[2] or np.inf)))
    for name, wins, median, seconds in rows:
      if name.startswith("adam") and name != best_adam[0]:
        continue
      median_text = f"{median:.0f}" if median is not None else "-"
      label = name + (" (best)" if name.startswith("adam") else "")
      print(f"{length:>6} | {label:<28} | {wins:>3}/{args.seeds:<3} | {median_text:>12} |"
            f" {seconds:.0f} s", flush=True)


if __name__ == "__main__":
  main()
