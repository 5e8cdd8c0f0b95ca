"""Whole-model LRA and XMat on the digits CNN, one change at a time, paired with Adam.

    python benchmarks/digits_variants.py                       # every variant, seeds 0-19
    python benchmarks/digits_variants.py --variants adam lra lra_decay0 --seeds 10

The CNN, data split, batch and cosine schedule of ``examples/digits.py`` (600 steps, batch
128, the split drawn per seed); LRA (rank 10) and XMat over the whole model
(``optax.flatten``) inside the ready optimizers' chain, as in the example, with one option
changed per variant. Each seed's test error is paired with Adam's on the same split and
initialization, so a variant's difference from Adam is measured with the split's difficulty
taken out: prints per variant the mean test error, its spread over seeds, the mean paired
difference from Adam with its standard error, and on how many seeds it beats Adam.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS, BATCH, WEIGHT_DECAY = 600, 128, 1e-4


def variants():
  """name → (optimizer factory of the step count, whether it takes ``value_fn``)."""
  import optax
  import psgd_optax as psgd

  def ready(preconditioner, peak):
    return lambda steps: psgd.optimizers.with_preconditioner(
        optax.flatten(preconditioner), optax.cosine_decay_schedule(peak, steps),
        weight_decay=WEIGHT_DECAY)

  def paper(preconditioner_of):
    # Paper 002, E.1: learning rate 0.1 → 0.001 and preconditioner step 0.1 → 0.01, both
    # exponential; preconditioned gradient clipped at norm 10; no momentum; rank 5.
    def make(steps):
      decay = lambda start, end: optax.exponential_decay(start, steps, end / start)
      return optax.chain(optax.flatten(preconditioner_of(decay(0.1, 0.01))),
                         optax.clip_by_global_norm(10.0),
                         optax.scale_by_learning_rate(decay(0.1, 1e-3)))
    return make

  from _lra_authors_order import lra_authors_order
  newton = dict(curvature="newton")
  return {
      "adam": (lambda steps: optax.adamw(optax.cosine_decay_schedule(3e-2, steps),
                                         weight_decay=WEIGHT_DECAY), False),
      "lra": (ready(psgd.lra(rank=10), 1e-2), False),
      "lra_lr3e-2": (ready(psgd.lra(rank=10), 3e-2), False),
      "lra_precond_lr1": (ready(psgd.lra(rank=10, precond_lr=1.0), 1e-2), False),
      "lra_decay0": (ready(psgd.lra(rank=10, lipschitz_decay=0.0), 1e-2), False),
      "lra_decay0_p1": (ready(psgd.lra(rank=10, lipschitz_decay=0.0, update_probability=1.0),
                              1e-2), False),
      # The authors' code's factor order, Q = (I + UVᵀ)diag(d) (benchmarks/_lra_authors_order.py).
      "lra_authors_order": (ready(lra_authors_order(rank=10), 1e-2), False),
      "lra_authors_order_decay0": (ready(lra_authors_order(rank=10, lipschitz_decay=0.0), 1e-2),
                                   False),
      # The authors' 2022 UVd class (Q = I at first, U and V drawn 10× larger, steps normalized
      # by their generators' exact norms), whitening in the ready chain and in paper 002's recipe.
      "lra_authors_code": (ready(lra_authors_order(rank=10, lipschitz_decay=0.0, init_scale=1.0,
                                                   authors_code=True), 1e-2), False),
      "lra_paper_authors_code": (paper(lambda step: lra_authors_order(
          rank=5, precond_lr=step, update_probability=1.0, lipschitz_decay=0.0, init_scale=1.0,
          authors_code=True, **newton)), True),
      "lra_newton": (ready(psgd.lra(rank=10, **newton), 0.1), True),
      "lra_paper": (paper(lambda step: psgd.lra(rank=5, precond_lr=step,
                                                update_probability=1.0, **newton)), True),
      # LRA's diagonal part alone (rank 0): what the low-rank part adds.
      "diag": (ready(psgd.diag(geometry="eq"), 1e-2), False),
      "xmat": (ready(psgd.xmat(), 1e-2), False),
      "xmat_lr3e-2": (ready(psgd.xmat(), 3e-2), False),
      "xmat_precond_lr0.1": (ready(psgd.xmat(precond_lr=0.1), 1e-2), False),
      "xmat_decay0": (ready(psgd.xmat(lipschitz_decay=0.0), 1e-2), False),
      "xmat_newton": (ready(psgd.xmat(**newton), 0.1), True),
      "xmat_paper": (paper(lambda step: psgd.xmat(precond_lr=step, update_probability=1.0,
                                                  **newton)), True),
  }


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--variants", nargs="+", default=None,
                      help="which variants (adam always runs, as the pair); default: all")
  parser.add_argument("--seeds", type=int, default=20, help="seeds 0 … N−1")
  args = parser.parse_args(argv)
  return args


def test_error(make, takes_value_fn, seed):
  """Test error (%) of the example's CNN trained with ``make(STEPS)`` on seed's split."""
  import digits
  import jax
  import jax.flatten_util
  import jax.numpy as jnp
  import optax
  from flax import nnx

  x_train, x_test, y_train, y_test = (jnp.asarray(a) for a in digits.load_data(seed))
  model = digits.CNN(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, make(STEPS), wrt=nnx.Param)

  def loss_of(model, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

  @nnx.jit
  def step(model, optimizer, key):
    idx = jax.random.choice(key, x_train.shape[0], (BATCH,), replace=False)
    xb, yb = x_train[idx], y_train[idx]
    loss, grads = nnx.value_and_grad(loss_of)(model, xb, yb)
    if takes_value_fn:  # under optax.flatten, value_fn receives the flat vector
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      unravel = jax.flatten_util.ravel_pytree(params)[1]
      optimizer.update(model, grads, value_fn=lambda flat: loss_of(
          nnx.merge(graphdef, unravel(flat), rest), xb, yb))
    else:
      optimizer.update(model, grads)
    return loss

  for key in jax.random.split(jax.random.key(seed), STEPS):
    step(model, optimizer, key)
  return 100 * (1 - float(jnp.mean(jnp.argmax(model(x_test), -1) == y_test)))


def main(argv=None):
  args = parse_args(argv)
  import numpy as np
  table = variants()
  names = ["adam"] + [n for n in (args.variants or table) if n != "adam"]
  unknown = [n for n in names if n not in table]
  if unknown:
    raise SystemExit(f"unknown variants {unknown}; choose from {list(table)}")
  seeds = list(range(args.seeds))
  errors = {}
  print(f"digits CNN, {STEPS} steps, batch {BATCH}, seeds 0-{seeds[-1]}; test error %")
  print(f"{'variant':<20}{'mean':>7}{'± (seeds)':>10}{'vs adam':>9}{'± (paired)':>11}"
        f"{'beats adam':>11}")
  for name in names:
    make, takes_value_fn = table[name]
    errors[name] = np.array([test_error(make, takes_value_fn, seed) for seed in seeds])
    difference = errors[name] - errors["adam"]
    paired = difference.std(ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1 else float("nan")
    print(f"{name:<20}{errors[name].mean():>7.2f}{errors[name].std():>10.2f}"
          f"{difference.mean():>+9.2f}{paired:>11.2f}"
          f"{f'{int((difference < 0).sum())}/{len(seeds)}':>11}", flush=True)


if __name__ == "__main__":
  main()
