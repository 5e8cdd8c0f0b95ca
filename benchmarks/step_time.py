"""Jitted training-step time of PSGD-Kron vs Adam, and the matrix-product floor of applying P.

    python benchmarks/step_time.py            # both models, 50 timed steps each
    python benchmarks/step_time.py --steps 20 --models mlp

Models: (a) an MLP with four 512×512 hidden layers, batch 1024; (b) four pre-LN transformer
blocks of width 256 (4 heads, MLP 1024), batch 8 × 128 tokens. Every optimizer is timed in
this one process on the same device (``jax.devices()[0]``). PSGD is timed as the ready
optimizer ``psgd.optimizers.kron`` (whitening; Newton with ``value_fn``) at update
probability 1.0 and 0.1; Adam as ``optax.adam``.

The floor is the bare products that applying ``P = QᵀQ`` needs for the same leaves with the
same factor kinds, each dense axis the cheaper way kron takes (``QᵢᵀQᵢ`` formed once and one
product where ``nᵢ² < numel``, else ``Qᵢᵀ(Qᵢ·)``) and elementwise scaling along diagonal axes. The preconditioning
overhead is ``kron(p=0.1) − adam``, printed as a ratio to the floor for median step times
(a typical step) and for mean step times (which include the 10% of steps that fit ``Q``).
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import psgd_optax as psgd


def mlp_model(key):
  sizes = [512, 512, 512, 512, 512, 10]
  keys = jax.random.split(key, len(sizes))
  params = [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
  x = jax.random.normal(keys[-1], (1024, 512))
  y = jax.random.randint(keys[-1], (1024,), 0, 10)

  def loss_fn(params):
    h = x
    for layer in params[:-1]:
      h = jax.nn.relu(h @ layer["w"] + layer["b"])
    logits = h @ params[-1]["w"] + params[-1]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss_fn


def transformer_model(key, width=256, heads=4, blocks=4, batch=8, tokens=128, vocab=512):
  keys = iter(jax.random.split(key, 8 * blocks + 4))
  dense = lambda a, b: jax.random.normal(next(keys), (a, b)) / np.sqrt(a)
  params = {
      "embed": jax.random.normal(next(keys), (vocab, width)) * 0.02,
      "blocks": [{
          "ln1": jnp.ones(width), "qkv": dense(width, 3 * width), "proj": dense(width, width),
          "ln2": jnp.ones(width), "up": dense(width, 4 * width), "down": dense(4 * width, width),
      } for _ in range(blocks)],
      "unembed": dense(width, vocab),
  }
  inputs = jax.random.randint(next(keys), (batch, tokens), 0, vocab)
  targets = jnp.roll(inputs, -1, axis=1)
  mask = jnp.tril(jnp.ones((tokens, tokens), bool))

  def norm(h, scale):
    return scale * (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-6)

  def loss_fn(params):
    h = params["embed"][inputs]
    for block in params["blocks"]:
      q, k, v = jnp.split(norm(h, block["ln1"]) @ block["qkv"], 3, axis=-1)
      split = lambda t: t.reshape(batch, tokens, heads, width // heads)
      scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(width // heads)
      scores = jnp.where(mask, scores, -1e9)
      attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), split(v))
      h = h + attn.reshape(batch, tokens, width) @ block["proj"]
      h = h + jax.nn.gelu(norm(h, block["ln2"]) @ block["up"]) @ block["down"]
    logits = h @ params["unembed"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  return params, loss_fn


def minor_page_faults():
  """The process's minor page faults so far (pages the kernel had to map in)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def step_milliseconds(step, carry, steps, warmup=3, faults=None):
  """Each of ``steps`` timed steps' wall time in ms, after ``warmup`` untimed ones; the timed
  steps' minor page faults are appended to the list ``faults`` when one is given."""
  for _ in range(warmup):
    carry = step(*carry)
  jax.block_until_ready(carry)
  times = []
  faults_before = minor_page_faults()
  for _ in range(steps):
    start = time.perf_counter()
    carry = jax.block_until_ready(step(*carry))
    times.append((time.perf_counter() - start) * 1e3)
  if faults is not None:
    faults.append(minor_page_faults() - faults_before)
  return times


def time_steps(step, carry, steps, warmup=3):
  times = step_milliseconds(step, carry, steps, warmup)
  return np.median(times), np.mean(times)


def optimizer_step(tx, loss_fn, newton, donate=False):
  """One jitted training step; with ``donate`` its params and state buffers are donated (the
  outputs reuse them, as a training loop that drops the old state can let them)."""
  def step(params, state):
    grads = jax.grad(loss_fn)(params)
    extra = {"value_fn": loss_fn} if newton else {}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def floor_step(params):
  """The bare products of applying P with the factor kinds kron chooses for each leaf, the
  cheaper way per dense axis (``QᵀQ`` formed once where ``n² < numel``, as kron does)."""
  leaves = jax.tree.leaves(params)
  factors = []
  for leaf in leaves:
    kinds = psgd.factor_kinds(leaf.shape)
    core = [n for n in leaf.shape if n > 1] or [1]
    factors.append([jnp.eye(n) + 0.01 if kind == "dense" else jnp.ones(n)
                    for n, kind in zip(core, kinds)])

  def apply(x, fs):
    shape = x.shape
    x = x.reshape([f.shape[0] for f in fs])
    for axis, f in enumerate(fs):
      if f.ndim == 2 and f.shape[0] ** 2 < x.size:  # QᵀQ once, then one product
        x = jnp.moveaxis(jnp.tensordot(f.T @ f, x, axes=(1, axis)), 0, axis)
      elif f.ndim == 2:
        x = jnp.moveaxis(jnp.tensordot(f, x, axes=(1, axis)), 0, axis)   # Q x
        x = jnp.moveaxis(jnp.tensordot(f, x, axes=(0, axis)), 0, axis)   # Qᵀ (Q x)
      else:
        x = x * (f * f).reshape([-1 if i == axis else 1 for i in range(x.ndim)])
    return x.reshape(shape)

  @jax.jit
  def step(grads, factor_list):
    return [apply(g, fs) for g, fs in zip(grads, factor_list)], factor_list

  return step, (leaves, factors)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--models", nargs="+", default=["mlp", "transformer"])
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
        f"{args.steps} timed steps after 3 warm-up")
  builders = {"mlp": mlp_model, "transformer": transformer_model}
  for name in args.models:
    params, loss_fn = builders[name](jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"\n{name}: {n_params / 1e6:.2f}M parameters")
    print(f"{'optimizer':<34}{'median ms':>10}{'mean ms':>10}{'mean / adam':>13}")
    rows = {}
    configs = [("adam", optax.adam(1e-3), False)]
    for curvature in ("whitening", "newton"):
      for p in (1.0, 0.1):
        tx = psgd.optimizers.kron(learning_rate=1e-3, curvature=curvature,
                                  update_probability=p)
        configs.append((f"kron {curvature} p={p}", tx, curvature == "newton"))
    for label, tx, newton in configs:
      step = optimizer_step(tx, loss_fn, newton)
      rows[label] = time_steps(step, (params, tx.init(params)), args.steps)
    floor_fn, floor_carry = floor_step(params)
    rows["floor: bare products of applying P"] = time_steps(floor_fn, floor_carry, args.steps)
    adam_mean = rows["adam"][1]
    for label, (median, mean) in rows.items():
      print(f"{label:<34}{median:>10.2f}{mean:>10.2f}{mean / adam_mean:>13.2f}")
    floor_median, floor_mean = rows["floor: bare products of applying P"]
    kron_median, kron_mean = rows["kron whitening p=0.1"]
    adam_median = rows["adam"][0]
    print(f"preconditioning overhead, kron whitening p=0.1 − adam: "
          f"medians {kron_median - adam_median:.2f} ms = "
          f"{(kron_median - adam_median) / floor_median:.2f}× the floor; "
          f"means {kron_mean - adam_mean:.2f} ms = "
          f"{(kron_mean - adam_mean) / floor_mean:.2f}× the floor (fits included)")

if __name__ == "__main__":
  main()
