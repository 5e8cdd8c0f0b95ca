"""Compile time vs model depth; step time and memory vs psgdax or vs an earlier checkout.

    python benchmarks/scale.py                          # compile time, blocks 4 8 16 32
    python benchmarks/scale.py --blocks 4 32 --family diag
    python benchmarks/scale.py --versus psgdax          # needs `pip install psgdax`
    python benchmarks/scale.py --baseline ../old        # before/after: another checkout

**Compile time.** A residual MLP of ``N`` identical blocks (each a ``(width, width)`` kernel
and a bias), written as a Python loop so that every block is its own leaf. For each ``N`` it
times ``jax.jit(step).lower(...).compile()`` of one training step (gradient, ``psgd.kron``
preconditioner update with a fit, optax apply), keeps the fastest of ``--rounds``
interleaved compiles, and prints the time relative to the smallest ``N``. The same step with
``optax.adam`` is timed beside it: its growth with ``N`` is the model's own (forward,
backward and a per-leaf update), and the last two columns are the preconditioner's own
share (time over Adam's) and that share relative to the smallest ``N``.

**Step time and memory.** One jitted training step (gradient + optimizer) of
``psgd.optimizers.kron`` on the MLP (four 512×512 layers) and the transformer of
``benchmarks/step_time.py``, at each update probability, beside a second optimizer with
matched settings, timed interleaved in this one process: the median and the fastest step
(over all rounds; the fastest is the least disturbed by other load), the optimizer state's
bytes, XLA's peak memory estimate for the compiled step (arguments + outputs + temporaries
− aliased) and its temporary buffer (``temp MB``), and the process's minor page faults per
timed step (``faults``; on CPU, XLA allocates its temporary buffer afresh for every call,
and glibc's ``malloc`` may hand it new pages each time). Ratios are ours / theirs.

* ``--versus psgdax``: the JAX PSGD port on PyPI (``psgd-jax`` imports a private optax
  module that no longer exists), with whitening, momentum 0.9, preconditioner lr 0.1, the
  same update probability, preconditioned-update RMS clipped at 1, dense factors for axes
  with ``n² ≤ size`` (``max_skew=1``, psgdax's rule), float32 everywhere (psgdax's matmuls
  at float32 precision, not its TF32 default).
* ``--baseline DIR``: the same optimizer from the ``psgd_optax`` of another checkout
  (``git worktree add DIR <commit>``), imported beside this one (``_checkout.py``); then the
  compile table for both. Every hot-path change is measured this way.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

if __name__ == "__main__" and "--baseline" in sys.argv:  # before psgd_optax is imported
  import _checkout
  BASELINE = _checkout.load_baseline(sys.argv[sys.argv.index("--baseline") + 1])
else:
  BASELINE = None

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

import psgd_optax as psgd  # pylint: disable=wrong-import-position


def make_params(blocks, width):
  keys = jax.random.split(jax.random.key(0), blocks)
  return {f"block{i:02d}": {"kernel": jax.random.normal(k, (width, width)) / width ** 0.5,
                            "bias": jnp.zeros(width)} for i, k in enumerate(keys)}


def loss_fn(params, x):
  for name in sorted(params):
    x = x + jnp.tanh(x @ params[name]["kernel"] + params[name]["bias"])
  return jnp.mean(x ** 2)


def compile_seconds(blocks, width, tx, place=None):
  """Seconds to lower and compile one training step of ``tx``; ``place`` maps the step's
  ``(params, state)`` to what it is lowered with (by default, themselves)."""
  params = make_params(blocks, width)
  state = tx.init(params)
  x = jnp.ones((8, width))

  def step(params, state):
    updates, state = tx.update(jax.grad(loss_fn)(params, x), state, params)
    return optax.apply_updates(params, updates), state

  arguments = (params, state) if place is None else place((params, state))
  began = time.perf_counter()
  jax.jit(step).lower(*arguments).compile()
  return time.perf_counter() - began


def _compiled_optimizers(family):
  """name → transformation timed by the compile table: ours (and the baseline's), Adam."""
  libraries = {"psgd_optax": psgd} if BASELINE is None else {"ours": psgd,
                                                              "baseline": BASELINE}
  optimizers = {name: optax.chain(getattr(library, family)(update_probability=1.0),
                                  optax.scale(-1e-3))
                for name, library in libraries.items()}
  optimizers["optax.adam"] = optax.adam(1e-3)  # the model alone
  return optimizers


def compile_table(block_counts, width, family, rounds, device, place=None):
  """Prints each optimizer's compile time (fastest of ``rounds`` interleaved compiles) for
  each number of blocks, beside Adam's; ``place`` as in ``compile_seconds``."""
  print(f"{device}; residual MLP, width {width}, psgd.{family}, compile time of one"
        " training step")
  optimizers = _compiled_optimizers(family)
  first = block_counts[0]
  print(f"{'blocks':>6} {'optimizer':>12} {'compile s':>10} {f'vs {first} blocks':>12}"
        f" {'over adam s':>12} {f'vs {first} blocks':>12}")
  compile_seconds(2, width, optimizers["optax.adam"], place=place)  # warm up JAX itself
  seconds = {}
  for _ in range(rounds):  # interleaved, so every optimizer sees the same load
    for blocks in block_counts:
      for name, tx in optimizers.items():
        took = compile_seconds(blocks, width, tx, place=place)
        seconds[blocks, name] = min(took, seconds.get((blocks, name), np.inf))
  for blocks in block_counts:
    for name in optimizers:
      ratio = seconds[blocks, name] / seconds[first, name]
      extra = seconds[blocks, name] - seconds[blocks, "optax.adam"]
      smallest = seconds[first, name] - seconds[first, "optax.adam"]
      over_adam = ("" if name == "optax.adam" else
                   f" {extra:>12.2f} {extra / smallest:>11.2f}×")
      print(f"{blocks:>6} {name:>12} {seconds[blocks, name]:>10.2f} {ratio:>11.2f}×"
            f"{over_adam}", flush=True)
  return seconds


def _state_bytes(state):
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


def _memory_bytes(jitted_step, params, state):
  """XLA's estimates for the compiled step: (peak, temporaries) in bytes."""
  stats = jitted_step.lower(params, state).compile().memory_analysis()
  if stats is None:
    return float("nan"), float("nan")
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes), stats.temp_size_in_bytes


def _ours(library, probability):
  return library.optimizers.kron(
      learning_rate=1e-3, momentum=0.9, update_probability=probability, precond_lr=0.1,
      max_skew=1.0, max_update_rms=1.0)


def matched_optimizers(probability):
  """``{"ours": ..., "psgdax": ...}``, with the matched settings of the module docstring."""
  import psgdax  # pylint: disable=import-outside-toplevel
  return {"ours": _ours(psgd, probability),
          "psgdax": psgdax.kron(
              learning_rate=1e-3, b1=0.9, preconditioner_update_probability=probability,
              preconditioner_lr=0.1, max_skew_triangular=1.0, grad_clip_max_amp=1.0,
              precond_update_precision="float32", precond_grads_precision="float32")}


def versus(other, steps, probabilities, rounds, models=("mlp", "transformer"), donate=False):
  """Ours beside ``other`` ("psgdax" or "baseline"), timed interleaved; prints a table."""
  import step_time  # pylint: disable=import-outside-toplevel

  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); "
        f"{rounds} interleaved rounds of {steps} timed steps; ratios are ours / {other}"
        + ("; params and state donated" if donate else ""))
  print(f"{'model':<12}{'p':>5}{'optimizer':>10}{'median ms':>11}{'min ms':>9}"
        f"{'state MB':>10}{'peak MB':>9}{'temp MB':>9}{'faults':>8}")
  builders = {"mlp": step_time.mlp_model, "transformer": step_time.transformer_model}
  for model in models:
    params, loss_fn_ = builders[model](jax.random.key(0))
    for probability in probabilities:
      optimizers = (matched_optimizers(probability) if other == "psgdax" else
                    {"ours": _ours(psgd, probability),
                     "baseline": _ours(BASELINE, probability)})
      rows = {}
      for name, tx in optimizers.items():
        step = step_time.optimizer_step(tx, loss_fn_, False, donate)
        state = tx.init(params)
        peak, temp = _memory_bytes(step, params, state)
        rows[name] = {"step": step, "state": state, "bytes": _state_bytes(state),
                      "peak": peak, "temp": temp}
      times = {name: [] for name in rows}
      faults = {name: [] for name in rows}
      for _ in range(rounds):  # interleaved, so both see the same machine load
        for name, row in rows.items():
          carry = (params, row["state"])
          if donate:  # the step consumes its arguments: each round starts from a copy
            carry = jax.tree.map(jnp.copy, carry)
          times[name] += step_time.step_milliseconds(row["step"], carry, steps,
                                                     faults=faults[name])
      summary = {name: (np.median(times[name]), np.min(times[name]),
                        sum(faults[name]) / len(times[name])) for name in rows}
      for name, row in rows.items():
        median, fastest, per_step = summary[name]
        print(f"{model:<12}{probability:>5}{name:>10}{median:>11.2f}{fastest:>9.2f}"
              f"{row['bytes'] / 1e6:>10.2f}{row['peak'] / 1e6:>9.1f}"
              f"{row['temp'] / 1e6:>9.1f}{per_step:>8.0f}")
      ours, theirs = rows["ours"], rows[other]
      print(f"{'':<12}{'':>5}{'ratio':>10}"
            f"{summary['ours'][0] / summary[other][0]:>10.2f}×"
            f"{summary['ours'][1] / summary[other][1]:>8.2f}×"
            f"{ours['bytes'] / theirs['bytes']:>9.2f}×{ours['peak'] / theirs['peak']:>8.2f}×"
            f"{ours['temp'] / theirs['temp']:>8.2f}×", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16, 32])
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--family", default="kron", choices=["kron", "diag"])
  parser.add_argument("--versus", choices=["psgdax"], default=None,
                      help="time and measure memory against another JAX PSGD instead")
  parser.add_argument("--baseline", metavar="DIR", default=None,
                      help="a checkout of an earlier psgd_optax: step time and memory of "
                      "both, then the compile table of both")
  parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
  parser.add_argument("--probabilities", type=float, nargs="+", default=[1.0, 0.1])
  parser.add_argument("--models", nargs="+", default=["mlp", "transformer"],
                      choices=["mlp", "transformer"], help="models to time")
  parser.add_argument("--donate", action="store_true",
                      help="jit the steps with their params and state donated")
  parser.add_argument("--rounds", type=int, default=3,
                      help="compile (or time) each optimizer this many times, interleaved; "
                      "compile times keep the fastest (they move by ±20%% from run to run)")
  args = parser.parse_args()
  other = "psgdax" if args.versus else "baseline" if args.baseline else None
  if other:
    versus(other, args.steps, args.probabilities, args.rounds, args.models, args.donate)
  if other != "psgdax":
    compile_table(args.blocks, args.width, args.family, args.rounds,
                  f"device: {jax.devices()[0].platform}")


if __name__ == "__main__":
  main()
