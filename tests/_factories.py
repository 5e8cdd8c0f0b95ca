"""The one list of every public factory and ready optimizer that the contract tests run.

Each entry builds the transformation with its *default* options (what a user gets first)
plus the test's ``**options``; ``curvatures`` lists the curvature types it supports (``()``
for the first-order transformations, which take gradients only).
"""

import dataclasses
from typing import Callable

import optax
import pytest

import psgd_optax as psgd

CURVATURES = ("whitening", "newton", "finite_difference", "secant")


@dataclasses.dataclass(frozen=True)
class Entry:
  factory: Callable[..., optax.GradientTransformation]  # the public factory
  args: tuple = ()  # its fixed arguments, as (name, value) pairs
  curvatures: tuple = CURVATURES
  scale_free: bool = True  # P g does not change when the loss is scaled
  direction: bool = True  # returns a direction (positive sign), not a step
  wrap: Callable = None  # a wrapper around the factory's transformation

  def __call__(self, **options):
    tx = self.factory(**dict(self.args), **options)
    return tx if self.wrap is None else self.wrap(tx)

  def injected(self, **options):
    """The factory under ``optax.inject_hyperparams``, numeric options injected."""
    tx = optax.inject_hyperparams(self.factory)(**dict(self.args), **options)
    return tx if self.wrap is None else self.wrap(tx)

  def engine_options(self, curvature=None, **options):
    """The PSGD engine's ``options`` (and ``curvature``) for an engine entry; nothing for the
    first-order transformations, which take none of them."""
    if not self.curvatures:
      return {}
    return dict(options, curvature=curvature or "whitening")

  def trainer(self, learning_rate=0.05, **options):
    """The transformation as a training step: a direction is scaled by ``-learning_rate``."""
    tx = self(**options)
    return optax.chain(tx, optax.scale(-learning_rate)) if self.direction else tx


LR = (("learning_rate", 1e-2),)

FACTORIES = {
    "kron": Entry(psgd.kron),
    "kron_eq": Entry(psgd.kron, (("geometry", "eq"),)),
    "kron_quad": Entry(psgd.kron, (("geometry", "quad"),)),
    "dense": Entry(psgd.dense),
    "diag": Entry(psgd.diag),
    "lra": Entry(psgd.lra),
    "xmat": Entry(psgd.xmat),
    "butterfly": Entry(psgd.butterfly),
    "splu": Entry(psgd.splu),
    "scan": Entry(psgd.scan),
    "scaw": Entry(psgd.scaw),
    "affine_pairs_scan": Entry(psgd.scan, wrap=psgd.affine_pairs),
    "optimizers.kron": Entry(psgd.optimizers.kron, LR, direction=False),
    "optimizers.dense": Entry(psgd.optimizers.dense, LR, direction=False),
    "optimizers.diag": Entry(psgd.optimizers.diag, LR, direction=False),
    "optimizers.with_preconditioner": Entry(
        psgd.lra, direction=False,
        wrap=lambda tx: psgd.optimizers.with_preconditioner(tx, learning_rate=1e-2)),
    "fop": Entry(psgd.fop, LR, curvatures=(), scale_free=False),
    "scalar_hypergradient": Entry(psgd.scalar_hypergradient, LR, curvatures=(),
                                  scale_free=False),
    "per_parameter_hypergradient": Entry(psgd.per_parameter_hypergradient, LR, curvatures=(),
                                         scale_free=False),
    "snr": Entry(psgd.snr, curvatures=(), scale_free=False),
}
ENGINE = [name for name, entry in FACTORIES.items() if entry.curvatures]
BARE = ["kron", "dense", "diag", "lra", "xmat", "butterfly", "splu", "scan", "scaw"]


def needs_value_fn(curvature):
  return curvature in ("newton", "finite_difference")


def sampled(names, default):
  """``names`` as pytest params: those in ``default`` run by default, the rest with -m slow
  (the contract holds for every entry; the default run keeps to its time budget)."""
  return [name if name in default else pytest.param(name, marks=pytest.mark.slow)
          for name in names]
