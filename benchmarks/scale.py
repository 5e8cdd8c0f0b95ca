"""Compile time vs model depth, with and without bucketing; step time and memory vs psgdax.

    python benchmarks/scale.py                    # blocks 4 8 16 32
    python benchmarks/scale.py --blocks 4 32 --family diag
    python benchmarks/scale.py --versus psgdax    # needs `pip install psgdax`

A residual MLP of ``N`` identical blocks (each a ``(width, width)`` kernel and a bias), written
as a Python loop so that every block is its own leaf. For each ``N`` and each of
``bucketing=True`` with the default ``state_layout="per_bucket"`` (whole buckets vmapped, and
looped one leaf per trip with ``bucket_batch_size=1``) and with ``"per_leaf"``, and
``bucketing=False``, it times ``jax.jit(step).lower(...).compile()`` of one training step
(gradient, ``psgd.kron`` preconditioner update with a fit, optax apply), keeps the fastest
of ``--rounds`` interleaved compiles, and prints each configuration's time relative to its
own time at the smallest ``N``, all in this one process. The same step with ``optax.adam``
is timed beside them as a reference: its growth with ``N`` is the model's own (forward,
backward and a per-leaf update), and the last two columns are each configuration's time
over it (the preconditioner's own share) and that share relative to the smallest ``N``.

``--versus psgdax`` instead times one jitted training step (gradient + optimizer) of
``psgd.optimizers.kron`` (each ``state_layout``, and per bucket with ``bucket_batch_size=1``)
and of ``psgdax.kron`` (the JAX PSGD port on PyPI that installs beside current optax;
``psgd-jax`` imports a private optax module that no longer exists) on the MLP and
transformer of ``benchmarks/step_time.py``, with matched settings: whitening, momentum 0.9,
preconditioner lr 0.1, the same update probability, preconditioned-update RMS clipped at 1,
dense factors for axes with ``n² ≤ size`` (``max_skew=1``, psgdax's rule),
float32 everywhere (psgdax's matmuls at float32 precision, not its TF32 default). Prints
the median and the fastest step time (over all rounds; the fastest is the least disturbed
by other load on a shared machine), the optimizer state's bytes and XLA's peak memory
estimate for the compiled step (arguments + outputs + temporaries − aliased), each as
ours / theirs, all in this one process; each of our layouts is timed interleaved with
psgdax in a pair of its own (psgdax is timed again beside each), so that one layout's
allocations do not change the page faults of another. Beside them: XLA's temporary
buffer for the step (``temp MB``) and the process's minor page faults per timed step
(``faults``). On CPU, XLA allocates that temporary buffer afresh for every call, and glibc's
``malloc`` can give it new pages from the kernel each time: a block above the main arena's
mmap threshold (at most 32 MiB by default) is mapped per call, and XLA's worker threads
allocate from per-thread arenas whose heaps (64 MiB at most) are created and unmapped as
blocks come and go; every new page touched is a fault. ``MALLOC_ARENA_MAX=1
MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824 python benchmarks/scale.py
--versus psgdax`` keeps every block in one arena for both optimizers alike and shows the step
without faults (the thresholds alone do not reach the per-thread arenas; the mmap threshold
alone also pins the trim threshold at 128 KiB, and freed blocks go back to the kernel).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax

import psgd_optax as psgd


def make_params(blocks, width):
  keys = jax.random.split(jax.random.key(0), blocks)
  return {f"block{i:02d}": {"kernel": jax.random.normal(k, (width, width)) / width ** 0.5,
                            "bias": jnp.zeros(width)} for i, k in enumerate(keys)}


def loss_fn(params, x):
  for name in sorted(params):
    x = x + jnp.tanh(x @ params[name]["kernel"] + params[name]["bias"])
  return jnp.mean(x ** 2)


# (bucketing, state_layout, bucket_batch_size) configurations, in the order printed.
CONFIGURATIONS = ((True, "per_bucket", None), (True, "per_bucket", 1), (True, "per_leaf", None),
                  (False, "per_bucket", None))
# The same training step with optax.adam: how much of the growth with depth is the model's own.
ADAM = (None, None, None)


def compile_seconds(blocks, width, family, bucketing, state_layout="per_bucket",
                    bucket_batch_size=None, place=None):
  """Seconds to lower and compile one training step; ``family="adam"`` times the same step
  with ``optax.adam`` instead (the model's own compile time, for reference). ``place`` maps
  the step's ``(params, state)`` to what it is lowered with (by default, themselves)."""
  params = make_params(blocks, width)
  if family == "adam":
    tx = optax.adam(1e-3)
  else:
    factory = {"kron": psgd.kron, "diag": psgd.diag}[family]
    tx = optax.chain(factory(update_probability=1.0, bucketing=bucketing,
                             state_layout=state_layout, bucket_batch_size=bucket_batch_size),
                     optax.scale(-1e-3))
  state = tx.init(params)
  x = jnp.ones((8, width))

  def step(params, state):
    updates, state = tx.update(jax.grad(loss_fn)(params, x), state, params)
    return optax.apply_updates(params, updates), state

  arguments = (params, state) if place is None else place((params, state))
  began = time.perf_counter()
  jax.jit(step).lower(*arguments).compile()
  return time.perf_counter() - began


def _state_bytes(state):
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


def _memory_bytes(jitted_step, params, state):
  """XLA's estimates for the compiled step: (peak, temporaries) in bytes."""
  stats = jitted_step.lower(params, state).compile().memory_analysis()
  if stats is None:
    return float("nan"), float("nan")
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes), stats.temp_size_in_bytes


LAYOUTS = ("per_bucket", "per_leaf", "looped")


def matched_optimizers(probability, layouts=LAYOUTS):
  """Ours in each of ``layouts`` ("looped": per bucket, one leaf per trip) and psgdax, with
  the matched settings of the module docstring, keyed "ours LAYOUT" and "psgdax"."""
  import psgdax  # pylint: disable=import-outside-toplevel
  layout_args = {"per_bucket": ("per_bucket", None), "per_leaf": ("per_leaf", None),
                 "looped": ("per_bucket", 1)}
  optimizers = {
      f"ours {layout}": psgd.optimizers.kron(
          learning_rate=1e-3, momentum=0.9, update_probability=probability, precond_lr=0.1,
          max_skew=1.0, max_update_rms=1.0, state_layout=layout_args[layout][0],
          bucket_batch_size=layout_args[layout][1])
      for layout in layouts}
  optimizers["psgdax"] = psgdax.kron(
      learning_rate=1e-3, b1=0.9, preconditioner_update_probability=probability,
      preconditioner_lr=0.1, max_skew_triangular=1.0, grad_clip_max_amp=1.0,
      precond_update_precision="float32", precond_grads_precision="float32")
  return optimizers


def versus_psgdax(steps, probabilities, rounds, models=("mlp", "transformer"),
                  layouts=LAYOUTS, donate=False):
  import step_time  # pylint: disable=import-outside-toplevel

  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); "
        f"{rounds} interleaved rounds of {steps} timed steps; ratios are ours / psgdax"
        + ("; params and state donated" if donate else ""))
  print(f"{'model':<12}{'p':>5}{'optimizer':>16}{'median ms':>11}{'min ms':>9}"
        f"{'state MB':>10}{'peak MB':>9}{'temp MB':>9}{'faults':>8}")
  builders = {"mlp": step_time.mlp_model, "transformer": step_time.transformer_model}
  for model in models:
    build = builders[model]
    params, loss_fn = build(jax.random.key(0))
    for probability in probabilities:
      optimizers = matched_optimizers(probability, layouts)
      rows = {}
      for name, tx in optimizers.items():
        step = step_time.optimizer_step(tx, loss_fn, False, donate)
        state = tx.init(params)
        peak, temp = _memory_bytes(step, params, state)
        rows[name] = {"step": step, "state": state, "bytes": _state_bytes(state),
                      "peak": peak, "temp": temp}
      theirs = rows["psgdax"]
      for layout in layouts:
        # Each layout is timed in its own interleaved pair with psgdax: one layout whose
        # temporaries exceed the mmap threshold changes the heap the others reuse, and in a
        # four-way rotation the default layout's page faults went from 484 to 2,106 per step.
        pair = {f"ours {layout}": rows[f"ours {layout}"], "psgdax": theirs}
        times = {name: [] for name in pair}
        faults = {name: [] for name in pair}
        for _ in range(rounds):  # interleaved, so both see the same machine load
          for name, row in pair.items():
            carry = (params, row["state"])
            if donate:  # the step consumes its arguments: each round starts from a copy
              carry = jax.tree.map(jnp.copy, carry)
            times[name] += step_time.step_milliseconds(row["step"], carry, steps,
                                                       faults=faults[name])
        summary = {name: (np.median(times[name]), np.min(times[name]),
                          sum(faults[name]) / len(times[name]))  # faults per timed step
                   for name in pair}
        for name, row in pair.items():
          median, fastest, per_step = summary[name]
          print(f"{model:<12}{probability:>5}{name:>16}{median:>11.2f}{fastest:>9.2f}"
                f"{row['bytes'] / 1e6:>10.2f}{row['peak'] / 1e6:>9.1f}"
                f"{row['temp'] / 1e6:>9.1f}{per_step:>8.0f}")
        our_row = pair[f"ours {layout}"]
        (our_median, our_min, _), (their_median, their_min, _) = (
            summary[f"ours {layout}"], summary["psgdax"])
        print(f"{'':<12}{'':>5}{'ratio ' + layout:>16}"
              f"{our_median / their_median:>10.2f}×{our_min / their_min:>8.2f}×"
              f"{our_row['bytes'] / theirs['bytes']:>9.2f}×"
              f"{our_row['peak'] / theirs['peak']:>8.2f}×", flush=True)


def compile_table(block_counts, width, family, rounds, device, place=None):
  """Prints the compile times of every configuration and Adam's, fastest of ``rounds``
  interleaved compiles, for each number of blocks; ``place`` as in ``compile_seconds``."""
  print(f"{device}; residual MLP, width {width}, psgd.{family}, compile time of one"
        " training step")
  print(f"{'blocks':>6} {'bucketing':>10} {'state_layout':>13} {'batch':>6} {'compile s':>10}"
        f" {'vs ' + str(block_counts[0]) + ' blocks':>12} {'over adam s':>12}"
        f" {'vs ' + str(block_counts[0]) + ' blocks':>12}")
  compile_seconds(2, width, family, True, place=place)  # warm up JAX itself
  seconds = {}
  for _ in range(rounds):  # interleaved, so every configuration sees the same load
    for blocks in block_counts:
      for config in CONFIGURATIONS + (ADAM,):
        step_family = "adam" if config == ADAM else family
        took = compile_seconds(blocks, width, step_family, *config, place=place)
        seconds[blocks, config] = min(took, seconds.get((blocks, config), np.inf))
  for blocks in block_counts:
    for config in CONFIGURATIONS + (ADAM,):
      ratio = seconds[blocks, config] / seconds[block_counts[0], config]
      label = (f"{'optax.adam (the model alone)':>38}" if config == ADAM else
               f"{str(config[0]):>10} {config[1]:>13} {str(config[2]):>6}")
      extra = seconds[blocks, config] - seconds[blocks, ADAM]
      smallest = seconds[block_counts[0], config] - seconds[block_counts[0], ADAM]
      over_adam = ("" if config == ADAM else
                   f" {extra:>12.2f} {extra / smallest:>11.2f}×")
      print(f"{blocks:>6} {label} {seconds[blocks, config]:>10.2f} {ratio:>11.2f}×{over_adam}",
            flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16, 32])
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--family", default="kron", choices=["kron", "diag"])
  parser.add_argument("--versus", choices=["psgdax"], default=None,
                      help="time and measure memory against another JAX PSGD instead")
  parser.add_argument("--steps", type=int, default=30, help="timed steps per round (--versus)")
  parser.add_argument("--probabilities", type=float, nargs="+", default=[1.0, 0.1])
  parser.add_argument("--models", nargs="+", default=["mlp", "transformer"],
                      choices=["mlp", "transformer"], help="models to time (--versus)")
  parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS,
                      help="our layouts to time, each beside psgdax (--versus)")
  parser.add_argument("--donate", action="store_true",
                      help="jit both steps with their params and state donated (--versus)")
  parser.add_argument("--rounds", type=int, default=3,
                      help="compile (or, with --versus, time) each configuration this many"
                      " times, interleaved; compile times keep the fastest (they move by ±20%%"
                      " from run to run)")
  args = parser.parse_args()
  if args.versus:
    versus_psgdax(args.steps, args.probabilities, args.rounds, args.models, args.layouts,
                  args.donate)
    return
  compile_table(args.blocks, args.width, args.family, args.rounds,
                f"device: {jax.devices()[0].platform}")


if __name__ == "__main__":
  main()
