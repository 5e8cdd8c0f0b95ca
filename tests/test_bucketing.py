"""Bucketing: same-shaped leaves run as one vmapped stack, with the same results."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd_optax as psgd

PARAMS = {f"block{i}": {"kernel": jnp.zeros((6, 5)), "bias": jnp.zeros(5)} for i in range(3)}
PARAMS["head"] = jnp.zeros((5, 3))


def _grads(step):
  key = jax.random.fold_in(jax.random.key(0), step)
  leaves, treedef = jax.tree.flatten(PARAMS)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.normal(k, leaf.shape) * (i + 1)
                            for i, (k, leaf) in enumerate(zip(keys, leaves))])


@pytest.mark.parametrize("family", [
    lambda **kw: psgd.kron(**kw),
    pytest.param(lambda **kw: psgd.lra(rank=2, **kw), marks=pytest.mark.slow),
])
def test_bucketing_gives_the_same_updates_and_state(family):
  bucketed = family(update_probability=1.0, bucketing=True)
  per_leaf = family(update_probability=1.0, bucketing=False)
  s1, s2 = bucketed.init(PARAMS), per_leaf.init(PARAMS)
  step1, step2 = jax.jit(bucketed.update), jax.jit(per_leaf.update)
  for t in range(5):
    u1, s1 = step1(_grads(t), s1, PARAMS)
    u2, s2 = step2(_grads(t), s2, PARAMS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), u1, u2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
               s1.preconditioner, s2.preconditioner)


TRACES = []


@dataclasses.dataclass(frozen=True)
class CountingGroup:
  """A Kron group that records each time its ``update`` is traced."""
  inner: psgd.KronGroup

  def init(self, scale, dtype):
    return self.inner.init(scale, dtype)

  def precondition(self, q, g):
    return self.inner.precondition(q, g)

  def update(self, q, v, h, lr, *, integrate_probe):
    TRACES.append(1)
    return self.inner.update(q, v, h, lr, integrate_probe=integrate_probe)

  def materialize(self, q):
    return self.inner.materialize(q)


@pytest.mark.parametrize("bucketing,expected", [(True, 3), (False, 7)])
def test_fit_is_traced_once_per_bucket(bucketing, expected):
  """3 kernels (6, 5), 3 biases (5,) and a head (5, 3): 3 buckets, 7 leaves."""
  tx = psgd.preconditioner(lambda shape, leaves=None: CountingGroup(psgd.kron_group(shape)),
                           update_probability=1.0, bucketing=bucketing)
  state = tx.init(PARAMS)
  TRACES.clear()
  jax.jit(tx.update).lower(_grads(0), state, PARAMS)
  assert len(TRACES) == expected
