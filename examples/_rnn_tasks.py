"""Long-memory RNN tasks of the PSGD papers and a trainer that runs many seeds at once.

Shared by ``examples/delayed_xor.py``, ``examples/addition_rnn.py`` and
``benchmarks/delayed_xor.py``. A task is a :class:`Task`: how to draw a batch, the loss of a
vanilla tanh RNN on it, and the loss below which a run counts as solved.

* Delayed XOR (Li 2018, Experiment 2; Li et al. 2023, Table 8): random ±1 values in channel 0
  and two markers in channel 1, one in the first 10% of the sequence and one in 10–50%; the
  target is the XOR of the two marked values; logistic loss of the final output.
* Addition (Hochreiter & Schmidhuber 1997; Li 2018, Experiment 1): values uniform in [0, 1]
  and two markers, one in each half; the target is the mean of the two marked values; squared
  error of the final output.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from _common import save_curves

HIDDEN = 30


class Task(NamedTuple):
  name: str
  length: int
  batch: int
  make_batch: Callable  # key -> (inputs (batch, length, 2), targets (batch,))
  loss_fn: Callable  # (params, inputs, targets) -> scalar
  success_loss: float  # a run is solved when its smoothed loss falls below this
  start_loss: float  # the smoothed loss starts here (about the loss of a blind guess)


def _marker_position(key, batch, length, start, width):
  """Positions uniform in [start·length, (start + width)·length)."""
  return jnp.floor(jax.random.uniform(key, (batch,)) * width * length
                   + start * length).astype(int)


def _with_markers(values, first, second):
  rows = jnp.arange(values.shape[0])
  markers = jnp.zeros_like(values).at[rows, first].set(1.0).at[rows, second].set(1.0)
  return jnp.stack([values, markers], axis=-1)


def rnn_output(params, inputs):
  """Final output of a tanh RNN with ``HIDDEN`` units on inputs (batch, length, 2)."""
  def cell(hidden, x):
    return jnp.tanh(x @ params["w_in"] + hidden @ params["w_rec"] + params["b"]), None
  start = jnp.zeros((inputs.shape[0], HIDDEN), inputs.dtype)
  final, _ = jax.lax.scan(cell, start, jnp.swapaxes(inputs, 0, 1))
  return (final @ params["w_out"])[:, 0] + params["b_out"]


def init_params(key):
  """Small input and output weights, an orthogonal recurrent matrix."""
  keys = jax.random.split(key, 3)
  recurrent, _ = jnp.linalg.qr(jax.random.normal(keys[1], (HIDDEN, HIDDEN)))
  return {"w_in": 0.1 * jax.random.normal(keys[0], (2, HIDDEN)), "w_rec": recurrent,
          "b": jnp.zeros(HIDDEN), "w_out": 0.1 * jax.random.normal(keys[2], (HIDDEN, 1)),
          "b_out": jnp.zeros([])}


def delayed_xor(length: int, batch: int = 128) -> Task:
  def make_batch(key):
    key_values, key_first, key_second = jax.random.split(key, 3)
    values = jax.random.choice(key_values, jnp.asarray([-1.0, 1.0]), (batch, length))
    first = _marker_position(key_first, batch, length, 0.0, 0.1)
    second = _marker_position(key_second, batch, length, 0.1, 0.4)
    rows = jnp.arange(batch)
    targets = jnp.where(values[rows, first] == values[rows, second], -1.0, 1.0)
    return _with_markers(values, first, second), targets

  def loss_fn(params, inputs, targets):
    return jnp.mean(jax.nn.softplus(-targets * rnn_output(params, inputs)))

  return Task(f"delayed XOR, length {length}", length, batch, make_batch, loss_fn,
              success_loss=0.1, start_loss=0.7)


def addition(length: int, batch: int = 1) -> Task:
  def make_batch(key):
    key_values, key_first, key_second = jax.random.split(key, 3)
    values = jax.random.uniform(key_values, (batch, length))
    first = _marker_position(key_first, batch, length, 0.0, 0.5)
    second = _marker_position(key_second, batch, length, 0.5, 0.5)
    rows = jnp.arange(batch)
    targets = 0.5 * (values[rows, first] + values[rows, second])
    return _with_markers(values, first, second), targets

  def loss_fn(params, inputs, targets):
    return jnp.mean((rnn_output(params, inputs) - targets) ** 2)

  # A blind guess of 0.5 has mean squared error 1/24 ≈ 0.042.
  return Task(f"addition, length {length}, batch {batch}", length, batch, make_batch, loss_fn,
              success_loss=5e-3, start_loss=0.25)


def _state_axes(state):
  """vmap axes of an optimizer state: every leaf batched over seeds except the step counts.

  The counts are the same for every seed, and keeping them unbatched keeps the PSGD engine's
  update coin (a function of the count and the optimizer's seed) unbatched, so its
  ``lax.cond`` stays a branch under ``vmap`` instead of becoming a select that would pay for
  every skipped fit."""
  def axis(path, _):
    last = path[-1] if path else None
    return None if getattr(last, "name", None) == "count" else 0
  return jax.tree_util.tree_map_with_path(axis, state)


def _save_carry(path, carry, curve):
  """Write the trainer's carry (and the curve so far) to ``path`` atomically, as .npz."""
  leaves = [jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
            else leaf for leaf in jax.tree.leaves(carry)]
  arrays = {f"leaf_{index}": np.asarray(leaf) for index, leaf in enumerate(leaves)}
  arrays["curve"] = np.stack(curve)
  partial = path + ".partial.npz"
  np.savez(partial, **arrays)
  os.replace(partial, path)


def _load_carry(path, carry):
  """The carry saved at ``path``, checked leaf by leaf against the shapes of a fresh one."""
  with np.load(path) as saved:
    leaves, treedef = jax.tree.flatten(carry)
    if len(saved.files) != len(leaves) + 1:
      raise ValueError(f"{path} holds {len(saved.files) - 1} arrays; this run's trainer state"
                       f" has {len(leaves)}: it was written by a different method or setup")
    restored = []
    for index, leaf in enumerate(leaves):
      array = saved[f"leaf_{index}"]
      is_key = jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
      if array.shape[:len(leaf.shape)] != leaf.shape or not (is_key or array.dtype == leaf.dtype):
        raise ValueError(f"{path}: array {index} is {array.dtype}{array.shape}, this run needs"
                         f" {leaf.dtype}{leaf.shape}: it was written by a different setup")
      # Keys were saved as their raw data; key() made them with the default implementation.
      restored.append(jax.random.wrap_key_data(array) if is_key else jnp.asarray(array))
    return jax.tree.unflatten(treedef, restored), list(saved["curve"])


@functools.lru_cache(maxsize=16)
def _trainer(tx, value_fn_layout, task: Task, smoothing_rate):
  """The jitted ``(init_states, run_chunk)`` of :func:`train_seeds`, cached so that repeated
  runs of one method (a resumed run, a sweep over seed sets) compile once."""
  sample_params = init_params(jax.random.key(0))
  axes = _state_axes(jax.eval_shape(tx.init, sample_params))

  def one_seed(params, state, key):
    inputs, targets = task.make_batch(key)
    loss, grads = jax.value_and_grad(task.loss_fn)(params, inputs, targets)
    batch_loss = lambda p: task.loss_fn(p, inputs, targets)
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
    step, keys, params, state, smooth, batch_solved_at, solved_at = carry
    keys, batch_keys = jnp.split(jax.vmap(jax.random.split)(keys), 2, axis=1)
    params, state, loss = all_seeds(params, state, batch_keys[:, 0])
    # A diverged seed counts as a failure (its smoothed loss stays high) without stopping
    # the others.
    smooth = (1 - smoothing_rate) * smooth + smoothing_rate * jnp.nan_to_num(loss, nan=10.0)
    step = step + 1
    solved_at = jnp.where((solved_at < 0) & (smooth < task.success_loss), step, solved_at)
    # The authors' demos stop at the first batch whose own loss is below the threshold: a
    # looser criterion, kept beside ours to compare with the papers' success rates.
    batch_solved_at = jnp.where((batch_solved_at < 0) & (loss < task.success_loss), step,
                                batch_solved_at)
    return step, keys[:, 0], params, state, smooth, batch_solved_at, solved_at

  @jax.jit
  def run_chunk(carry, limit):
    not_done = lambda carry: (carry[0] < limit) & jnp.any(carry[-1] < 0)
    return jax.lax.while_loop(not_done, one_step, carry)

  return jax.jit(jax.vmap(tx.init, out_axes=axes)), run_chunk


def train_seeds(tx, value_fn_layout, task: Task, seeds, max_steps, chunk=5000, progress=None,
                smoothing_rate=0.01, checkpoint=None):
  """Train one RNN per seed, all seeds together; return each seed's steps to success.

  The seeds are ``vmap``ped inside one jitted ``lax.while_loop`` that stops when every seed
  has succeeded or the budget is spent. It runs in chunks of ``chunk`` steps so that
  ``progress(step, solved_at, smoothed_losses)`` can report between them. Each seed's run is
  the run it would have alone (its own initialization and data; the optimizer's seed, hence
  its probes and update coin, is the same for all, as it would be in separate runs).

  Args:
    tx: the optimizer.
    value_fn_layout: ``None`` (first order), ``"tree"`` (pass ``value_fn`` of the params) or
      ``"flat"`` (under ``optax.flatten`` the inner transformation sees the flat vector).
    task: the :class:`Task`.
    seeds: integer seeds.
    max_steps: the step budget.
    chunk: steps between progress reports.
    progress: optional callback, see above.
    smoothing_rate: the loss is smoothed as ``s ← (1 − rate)·s + rate·loss``.
    checkpoint: optional ``.npz`` path. The whole state (step, data keys, parameters,
      optimizer states, smoothed losses, steps to success, curve) is written there after every
      chunk, and a run that finds the file resumes from it. The chunks are the same jitted
      program either way, so a resumed run is the run it would have been uninterrupted. The
      caller keys the path by method, task, seeds and chunk.

  Returns:
    ``(solved_at, curve, batch_solved_at)``: each seed's steps to success (``None`` for a
    failure), the smoothed losses at each report as an array (reports, seeds), and each
    seed's first step whose own batch loss was below the threshold (the authors' demos'
    criterion; ``None`` if none was by the end of the run).
  """
  seeds = jnp.asarray(seeds)
  params = jax.vmap(lambda seed: init_params(jax.random.fold_in(jax.random.key(0), seed)))(
      seeds)
  init_states, run_chunk = _trainer(tx, value_fn_layout, task, smoothing_rate)
  def fresh_carry():
    return (jnp.asarray(0),
            jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(1), seed))(seeds),
            params, init_states(params),
            jnp.full(seeds.shape, task.start_loss), jnp.full(seeds.shape, -1),
            jnp.full(seeds.shape, -1))

  if checkpoint is not None and os.path.exists(checkpoint):
    carry, curve = _load_carry(checkpoint, jax.eval_shape(fresh_carry))
  else:
    carry, curve = fresh_carry(), []
  as_steps = lambda counts: [int(steps) if steps >= 0 else None for steps in np.asarray(counts)]
  solved_at = as_steps(carry[-1])
  for limit in range(chunk, max_steps + chunk, chunk):
    if limit <= int(carry[0]):  # done before a resume
      continue
    if all(steps is not None for steps in solved_at):
      break
    carry = run_chunk(carry, min(limit, max_steps))
    solved_at = as_steps(carry[-1])
    curve.append(np.asarray(carry[-3]))
    if checkpoint is not None:
      _save_carry(checkpoint, carry, curve)
    if progress is not None:
      progress(int(carry[0]), solved_at, curve[-1])
  return solved_at, np.stack(curve), as_steps(carry[-2])


def psgd_newton(preconditioner, learning_rate=0.01):
  """The papers' recipe: Newton-type P·g, clipped to norm 1, times the learning rate."""
  return optax.chain(preconditioner, optax.clip_by_global_norm(1.0),
                     optax.scale(-learning_rate))


def compare(task: Task, methods, seeds, max_steps, chunk, show_progress=True):
  """Train every method of ``methods`` (name → (tx, value_fn_layout)) on ``task``.

  Returns name → (steps to success of each seed, smoothed-loss curve (reports, seeds),
  seconds)."""
  results = {}
  for name, (tx, layout) in methods.items():
    bar = tqdm(total=max_steps, desc=name, leave=False, disable=not show_progress)

    def progress(step, solved_at, losses, bar=bar):
      bar.update(step - bar.n)
      bar.set_postfix(solved=f"{sum(s is not None for s in solved_at)}/{len(solved_at)}",
                      loss=f"{np.median(losses):.3g}")

    began = time.perf_counter()
    solved_at, curve, _ = train_seeds(tx, layout, task, seeds, max_steps, chunk, progress)
    bar.close()
    results[name] = (solved_at, curve, time.perf_counter() - began)
  return results


def report(task: Task, results, seeds, max_steps, chunk, plot_path=None):
  """Print the results table of :func:`compare` and save the loss curves as a PNG."""
  print(f"\n{task.name}: solved = smoothed loss < {task.success_loss:g} within {max_steps}"
        f" steps; seeds {list(seeds)} ({jax.devices()[0].platform})")
  print(f"{'method':<34}{'solved':>8}{'median steps':>14}{'final loss':>12}{'seconds':>9}"
        "  steps of each seed")
  for name, (solved_at, curve, seconds) in results.items():
    wins = [steps for steps in solved_at if steps is not None]
    median = f"{np.median(wins):.0f}" if wins else "-"
    print(f"{name:<34}{len(wins):>5}/{len(solved_at):<2}{median:>14}"
          f"{np.median(curve[-1]):>12.3g}{seconds:>9.1f}  "
          f"{' '.join(str(steps or '-') for steps in solved_at)}")
  if plot_path:
    save_curves({name: np.median(curve, axis=1) for name, (_, curve, _) in results.items()},
                plot_path, xlabel="step", ylabel="smoothed training loss (median over seeds)",
                title=f"{task.name} (success below {task.success_loss:g})",
                steps={name: chunk * np.arange(1, len(curve) + 1)
                       for name, (_, curve, _) in results.items()})
