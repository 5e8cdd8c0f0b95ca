"""A byte-level GPT (Flax nnx) trained with PSGD-Kron, its Newton type, AdamW and Muon.

    python examples/gpt.py                                   # about 6 minutes on 2 CPU cores
    python examples/gpt.py --steps 2000 --batch 32 --seeds 0 1 2
    python examples/gpt.py --optimizers kron adamw --learning-rate 3e-3

The model is the small transformer people try optimizers on: pre-LayerNorm blocks of causal
self-attention and a 4x MLP, learned positions, the byte embedding tied to the output layer
(4 layers, d_model 128, 4 heads, context 128 by default). The text ships with Python: the
documentation topics of ``pydoc_data`` and the docstrings of the standard library's top-level
modules (about 1.4 MB of bytes); the last 10 % is held out for validation.

Every optimizer gets the same warmup + cosine schedule around its own peak learning rate
(``--learning-rate`` sets one for all, for sweeps). The Newton type fits ``Q`` to
Hessian-vector products of the batch loss (``value_fn``), so its learning rate is O(0.1–1),
and its weight decay about 1e-3 (AdamW's 0.1 outweighs its small Newton steps).
Prints a results table — final validation loss (nats per byte), steps and seconds (compile
included) to reach AdamW's final validation loss, the first step's compile time — and saves
the validation curves against steps and against seconds to ``gpt.png``.
The full protocol (batch 32, 2000 steps, learning-rate sweeps, 3 seeds) is
``benchmarks/lm.py``.
"""

from __future__ import annotations

import argparse
import ast
import os
import sysconfig
import time

# Peak learning rates: each optimizer's best of the sweep in benchmarks/lm.py (BENCHMARKS.md);
# the Newton type's is the best over 3 seeds, 0.3 (1.0 led on seed 0 but diverged on seed 2).
LEARNING_RATES = {"kron": None, "kron_newton": 0.3, "adamw": 3e-3, "muon": 0.05}
# Muon's Adam for the parameters that are not matrices (biases, norms); not swept.
MUON_ADAM_RATE = 1e-3
OPTIMIZERS = tuple(LEARNING_RATES)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--steps", type=int, default=250, help="training steps")
  parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to average")
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS,
                      help="optimizers to train")
  parser.add_argument("--learning-rate", type=float, default=None,
                      help="peak learning rate for every chosen optimizer (default: each "
                      "optimizer's own; kron: the ready optimizer's default)")
  parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
  parser.add_argument("--width", type=int, default=128, help="d_model")
  parser.add_argument("--heads", type=int, default=4, help="attention heads")
  parser.add_argument("--context", type=int, default=128, help="sequence length in bytes")
  parser.add_argument("--eval-every", type=int, default=25, help="steps between validations")
  parser.add_argument("--plot", default="gpt.png", help="where to save the curves")
  parser.add_argument("--no-plot", action="store_true", help="skip the plot")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  return parser.parse_args(argv)


def load_text() -> bytes:
  """The corpus: pydoc_data's topics, then the stdlib's top-level docstrings, as bytes."""
  import pydoc_data.topics
  parts = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
  root = sysconfig.get_paths()["stdlib"]
  for name in sorted(os.listdir(root)):
    if not name.endswith(".py"):
      continue
    try:
      with open(os.path.join(root, name), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, OSError):
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc:
          parts.append(doc)
  return "\n\n".join(parts).encode("utf-8")


def split_text(text: bytes, holdout: float = 0.1):
  """(train, validation) uint8 arrays: the last ``holdout`` of the bytes is held out."""
  import numpy as np
  data = np.frombuffer(text, dtype=np.uint8)
  cut = int(len(data) * (1 - holdout))
  return data[:cut], data[cut:]


def build(args):
  """Import JAX/Flax lazily (``--help`` answers at once) and return the model's module."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  class Block(nnx.Module):
    """Pre-LayerNorm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width, heads, rngs):
      init = nnx.initializers.normal(0.02)
      out_init = nnx.initializers.normal(0.02 / (2 * args.layers) ** 0.5)
      self.heads = heads
      self.ln1 = nnx.LayerNorm(width, rngs=rngs)
      self.qkv = nnx.Linear(width, 3 * width, kernel_init=init, rngs=rngs)
      self.proj = nnx.Linear(width, width, kernel_init=out_init, rngs=rngs)
      self.ln2 = nnx.LayerNorm(width, rngs=rngs)
      self.up = nnx.Linear(width, 4 * width, kernel_init=init, rngs=rngs)
      self.down = nnx.Linear(4 * width, width, kernel_init=out_init, rngs=rngs)

    def __call__(self, x):
      b, t, d = x.shape
      q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
      q, k, v = (z.reshape(b, t, self.heads, d // self.heads) for z in (q, k, v))
      attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
      x = x + self.proj(attended.reshape(b, t, d))
      return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))

  class GPT(nnx.Module):

    def __init__(self, rngs):
      init = nnx.initializers.normal(0.02)
      self.embed = nnx.Embed(256, args.width, embedding_init=init, rngs=rngs)
      self.position = nnx.Param(init(rngs.params(), (args.context, args.width)))
      self.blocks = nnx.List([Block(args.width, args.heads, rngs)
                              for _ in range(args.layers)])
      self.ln = nnx.LayerNorm(args.width, rngs=rngs)

    def __call__(self, tokens):
      x = self.embed(tokens) + self.position[:tokens.shape[1]]
      for block in self.blocks:
        x = block(x)
      return self.embed.attend(self.ln(x))   # tied output layer

  return GPT


def warmup_cosine(peak, steps):
  """A 5 % linear warmup to ``peak``, then a cosine decay to 10 % of it."""
  import optax
  return optax.warmup_cosine_decay_schedule(0.0, peak, max(1, steps // 20), steps, peak / 10)


def default_kron_rate() -> float:
  """The ready optimizer's own default learning rate."""
  import inspect

  import psgd_optax as psgd
  return inspect.signature(psgd.optimizers.kron).parameters["learning_rate"].default


def make_optimizer(name, peak, steps, weight_decay=0.1, **options):
  """The optimizer ``name`` on the :func:`warmup_cosine` schedule to ``peak`` (``None``:
  the ready optimizer's own default learning rate) with decoupled ``weight_decay`` (the
  Newton type's scaled as below; Muon's Adam part keeps 0.1); ``options`` go to the PSGD
  ones."""
  import optax

  import psgd_optax as psgd
  if peak is None:
    peak = default_kron_rate()
  schedule = warmup_cosine(peak, steps)
  if name == "kron":
    return psgd.optimizers.kron(learning_rate=schedule, weight_decay=weight_decay, **options)
  if name == "kron_newton":
    # Decoupled weight decay pulls against the step as λ·|θ| against |P g|, whatever η. The
    # whitened direction (like AdamW's) has RMS about 1, a Newton step about 1e-3 on this
    # model: at λ = 0.1 the loss stalls near 3.4 (BENCHMARKS.md). λ = 1e-3/peak is what the
    # protocol ran: 3.3e-3 at the default peak, 0.3; at its low rates it was too strong.
    return psgd.optimizers.kron(learning_rate=schedule, curvature="newton",
                                weight_decay=weight_decay * default_kron_rate() / peak,
                                **options)
  if name == "adamw":
    return optax.adamw(schedule, b2=0.95, weight_decay=weight_decay)
  if name == "muon":
    # Muon orthogonalizes the 2-D weights (the tied embedding too); the rest takes Adam.
    adam_schedule = warmup_cosine(MUON_ADAM_RATE, steps)
    return optax.contrib.muon(schedule, weight_decay=weight_decay,
                              adam_learning_rate=adam_schedule,
                              adam_b2=0.95, adam_weight_decay=0.1)
  raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


class Run:
  """One optimizer's training run: the jitted step and the validation loss."""

  def __init__(self, args, name, peak, seed, train_data, valid_data, tx=None,
               compile_first=True):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    self.name, self.args = name, args
    self.train_data = train_data
    self.rng = np.random.default_rng(seed)
    model = build(args)(nnx.Rngs(seed))
    graphdef, self.params, rest = nnx.split(model, nnx.Param, ...)
    self.tx = make_optimizer(name, peak, args.steps) if tx is None else tx
    self.opt_state = self.tx.init(self.params)

    def loss_of(params, tokens):
      logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), tokens[:, 1:]).mean()

    def step(params, opt_state, tokens):
      loss, grads = jax.value_and_grad(loss_of)(params, tokens)
      # The Newton type fits Q to Hessian-vector products of this batch's loss.
      extra = {"value_fn": lambda p: loss_of(p, tokens)} if name == "kron_newton" else {}
      updates, opt_state = self.tx.update(grads, opt_state, params, **extra)
      return optax.apply_updates(params, updates), opt_state, loss

    tokens = jnp.asarray(self.batch())
    # Kept so that benchmarks/compile_kernels.py can time tracing, lowering and XLA apart.
    self.jitted, self.first_args = jax.jit(step, donate_argnums=(0, 1)), (
        self.params, self.opt_state, tokens)
    if compile_first:
      start = time.perf_counter()
      self.step = self.jitted.lower(*self.first_args).compile()
      self.compile_seconds = time.perf_counter() - start
    # Fixed validation windows: every ``context + 1`` bytes of the held-out text, up to 64.
    width = args.context + 1
    count = min(64, len(valid_data) // width)
    self.valid = jnp.asarray(valid_data[:count * width].reshape(count, width).astype(np.int32))
    self.valid_loss = jax.jit(loss_of)

  def batch(self):
    import numpy as np
    starts = self.rng.integers(0, len(self.train_data) - self.args.context - 1, self.args.batch)
    return np.stack([self.train_data[s:s + self.args.context + 1] for s in starts]).astype(
        np.int32)

  def train_steps(self, count):
    """``count`` steps; returns (mean training loss, seconds)."""
    import jax
    start = time.perf_counter()
    losses = []
    for _ in range(count):
      self.params, self.opt_state, loss = self.step(self.params, self.opt_state, self.batch())
      losses.append(loss)
    mean = float(sum(jax.device_get(losses)) / count)
    return mean, time.perf_counter() - start

  def validate(self):
    return float(self.valid_loss(self.params, self.valid))


def train_run(args, name, peak, seed, data, make_run=None):
  """Train one run on ``data = (train, validation)``; returns a dict of its curves:
  validation loss at ``steps`` and the seconds (compile included) at each of them.
  ``make_run(args, name, peak, seed, data)`` builds the :class:`Run` (benchmarks/lm.py
  adds optimizers through it)."""
  from tqdm import tqdm
  if make_run is None:
    run = Run(args, name, peak, seed, *data)
  else:
    run = make_run(args, name, peak, seed, data)
  steps, valid, seconds = [0], [run.validate()], [run.compile_seconds]
  tokens_per_step = args.batch * args.context
  with tqdm(total=args.steps, desc=f"{name} seed {seed}", leave=False,
            disable=args.no_progress) as bar:
    while steps[-1] < args.steps:
      count = min(args.eval_every, args.steps - steps[-1])
      loss, spent = run.train_steps(count)
      steps.append(steps[-1] + count)
      seconds.append(seconds[-1] + spent)
      valid.append(run.validate())
      bar.update(count)
      bar.set_postfix(loss=f"{loss:.3f}", valid=f"{valid[-1]:.3f}",
                      tok_s=f"{tokens_per_step * count / spent:.0f}")
  return {"steps": steps, "valid": valid, "seconds": seconds, "compile": run.compile_seconds}


def first_crossing(xs, ys, target):
  """The first x where the curve ys(x) reaches ``target`` (linear between points), or None."""
  for i in range(1, len(ys)):
    if ys[i] <= target:
      if ys[i - 1] <= target:
        return float(xs[i - 1])
      fraction = (ys[i - 1] - target) / (ys[i - 1] - ys[i])
      return float(xs[i - 1] + fraction * (xs[i] - xs[i - 1]))
  return None


def summarize(curves, target):
  """name → (final validation loss, steps to ``target``, seconds to it, compile seconds)
  of the mean over seeds of the validation curves (steps and seconds where the mean curve
  first reaches ``target``, linear between validations; None if it never does)."""
  import numpy as np
  rows = {}
  for name, runs in curves.items():
    valid = np.mean([run["valid"] for run in runs], axis=0)
    seconds = np.mean([run["seconds"] for run in runs], axis=0)
    rows[name] = (float(valid[-1]), first_crossing(runs[0]["steps"], valid, target),
                  first_crossing(seconds, valid, target),
                  float(np.mean([run["compile"] for run in runs])))
  return rows


def cell(value, width, spec):
  """``value`` formatted with ``spec`` and right-aligned in ``width``; ``-`` for None."""
  return f"{'-' if value is None else format(value, spec):>{width}}"


def print_table(rows, peaks, target):
  print(f"\nvalidation loss (nats/byte) to reach: {target:.4f} (AdamW's final)")
  print(f"{'optimizer':<13}{'peak lr':>9}{'final valid':>13}{'steps to':>10}{'s to':>8}"
        f"{'compile s':>11}")
  for name, (final, steps, seconds, compile_seconds) in rows.items():
    print(f"{name:<13}{peaks[name]:>9.3g}{final:>13.4f}{cell(steps, 10, '.0f')}"
          f"{cell(seconds, 8, '.1f')}{compile_seconds:>11.2f}")


def save_plot(curves, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for name, runs in curves.items():
    valid = np.mean([run["valid"] for run in runs], axis=0)
    seconds = np.mean([run["seconds"] for run in runs], axis=0)
    axes[0].plot(runs[0]["steps"][1:], valid[1:], label=name)
    axes[1].plot(seconds[1:], valid[1:], label=name)
  axes[0].set_xlabel("step")
  axes[1].set_xlabel("seconds (compile included)")
  axes[0].set_ylabel("validation loss (nats/byte)")
  axes[0].legend()
  fig.suptitle("byte-level GPT on Python's documentation text")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"saved {path}")


def main(argv=None):
  args = parse_args(argv)
  import jax
  import optax.contrib
  if "muon" in args.optimizers and not hasattr(optax.contrib, "muon"):
    print("this optax has no optax.contrib.muon: Muon is left out")
    args.optimizers = [name for name in args.optimizers if name != "muon"]
  data = split_text(load_text())
  peaks = {name: args.learning_rate if args.learning_rate is not None else LEARNING_RATES[name]
           for name in args.optimizers}
  curves = {name: [train_run(args, name, peaks[name], seed, data)
                   for seed in args.seeds] for name in args.optimizers}
  if peaks.get("kron") is None:
    peaks["kron"] = default_kron_rate()
  finals = {name: row[0] for name, row in summarize(curves, 0.0).items()}
  target = finals["adamw"] if "adamw" in finals else min(finals.values())
  print(f"\n{args.layers}-layer byte GPT, d_model {args.width}, context {args.context}, batch "
        f"{args.batch}, {args.steps} steps, seeds {args.seeds} ({jax.devices()[0].platform}); "
        f"{len(data[0])} training bytes")
  rows = summarize(curves, target)
  print_table(rows, peaks, target)
  if not args.no_plot:
    save_plot(curves, args.plot)
  return rows


if __name__ == "__main__":
  main()
