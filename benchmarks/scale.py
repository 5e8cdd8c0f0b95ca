"""Compile time vs model depth, with and without bucketing.

    python benchmarks/scale.py                    # blocks 4 8 16 32
    python benchmarks/scale.py --blocks 4 32 --family diag

A residual MLP of ``N`` identical blocks (each a ``(width, width)`` kernel and a bias), written
as a Python loop so that every block is its own leaf. For each ``N`` and for
``bucketing=True/False`` it times ``jax.jit(step).lower(...).compile()`` of one training step
(gradient, ``psgd.kron`` preconditioner update with a fit, optax apply) and prints the compile
time relative to the smallest ``N`` with bucketing, all in this one process.
"""

from __future__ import annotations

import argparse
import time

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


def compile_seconds(blocks, width, family, bucketing):
  params = make_params(blocks, width)
  factory = {"kron": psgd.kron, "diag": psgd.diag}[family]
  tx = optax.chain(factory(update_probability=1.0, bucketing=bucketing), optax.scale(-1e-3))
  state = tx.init(params)
  x = jnp.ones((8, width))

  def step(params, state):
    updates, state = tx.update(jax.grad(loss_fn)(params, x), state, params)
    return optax.apply_updates(params, updates), state

  began = time.perf_counter()
  jax.jit(step).lower(params, state).compile()
  return time.perf_counter() - began


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16, 32])
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--family", default="kron", choices=["kron", "diag"])
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].platform}; residual MLP, width {args.width}, "
        f"psgd.{args.family}, compile time of one training step")
  print(f"{'blocks':>6} {'bucketing':>10} {'compile s':>10} {'vs first':>9}")
  compile_seconds(2, args.width, args.family, True)  # warm up JAX itself
  baseline = None
  for blocks in args.blocks:
    for bucketing in (True, False):
      seconds = compile_seconds(blocks, args.width, args.family, bucketing)
      baseline = baseline or seconds
      print(f"{blocks:>6} {str(bucketing):>10} {seconds:>10.2f} {seconds / baseline:>8.2f}×",
            flush=True)


if __name__ == "__main__":
  main()
