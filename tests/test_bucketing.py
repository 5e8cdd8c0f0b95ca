"""Bucketing: same-shaped leaves run as one vmapped stack, with the same results."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd_optax as psgd

PARAMS = {f"block{i}": {"kernel": jnp.zeros((6, 5)), "bias": jnp.zeros(5)} for i in range(3)}
PARAMS["head"] = jnp.zeros((5, 3))


def _grads(step, params=None):
  """Random gradients for ``params`` (default ``PARAMS``), a different scale per leaf."""
  params = PARAMS if params is None else params
  key = jax.random.fold_in(jax.random.key(0), step)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.normal(k, leaf.shape) * (i + 1)
                            for i, (k, leaf) in enumerate(zip(keys, leaves))])


def _close(actual, expected):
  np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-6)


def _caller_pairs(step):
  """Probes and their products given by the caller, so that both runs fit the same pairs
  (the engine draws its own probes one block per bucket, so a bucketed run and a leaf-by-leaf
  one draw different probes)."""
  vector = _grads(100 + step)
  return {"vector": vector, "hvp": jax.tree.map(lambda v: 2.0 * v + 0.3 * jnp.roll(v, 1), vector)}


@pytest.mark.parametrize("family,curvature", [
    # Kron's whitening fit integrates its probe out, so it needs no pairs from the caller.
    (lambda **kw: psgd.kron(**kw), "whitening"),
    pytest.param(lambda **kw: psgd.lra(rank=2, **kw), "newton", marks=pytest.mark.slow),
])
def test_bucketing_gives_the_same_updates_and_state(family, curvature):
  bucketed = family(update_probability=1.0, bucketing=True, curvature=curvature)
  per_leaf = family(update_probability=1.0, bucketing=False, curvature=curvature)
  s1, s2 = bucketed.init(PARAMS), per_leaf.init(PARAMS)
  step1, step2 = jax.jit(bucketed.update), jax.jit(per_leaf.update)
  for t in range(5):
    pairs = _caller_pairs(t) if curvature == "newton" else {}
    u1, s1 = step1(_grads(t), s1, PARAMS, **pairs)
    u2, s2 = step2(_grads(t), s2, PARAMS, **pairs)
  jax.tree.map(_close, u1, u2)
  jax.tree.map(_close, psgd.preconditioner_per_leaf(s1, PARAMS),
               psgd.preconditioner_per_leaf(s2, PARAMS))


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


def test_fit_is_traced_once_per_bucket_with_the_per_leaf_layout():
  tx = psgd.preconditioner(lambda shape, leaves=None: CountingGroup(psgd.kron_group(shape)),
                           update_probability=1.0, state_layout="per_leaf")
  state = tx.init(PARAMS)
  TRACES.clear()
  jax.jit(tx.update).lower(_grads(0), state, PARAMS)
  assert len(TRACES) == 3


@pytest.mark.parametrize("state_layout", ["per_leaf", "per_bucket"])
def test_bucket_batch_size_loops_over_a_bucket_with_the_same_results(state_layout):
  """``bucket_batch_size=1`` runs a bucket's leaves one per loop trip (each trip the
  unbatched math of ``bucketing=False``), 2 runs vmapped pairs and then the odd leaf; both
  agree with ``bucketing=False`` to float32 rounding (XLA compiles a loop body on its own,
  so not bit for bit), and the fit is still traced once per bucket."""
  reference = psgd.kron(update_probability=1.0, bucketing=False)
  looped = {size: psgd.kron(update_probability=1.0, bucket_batch_size=size,
                            state_layout=state_layout) for size in (1, 2)}
  s_ref = reference.init(PARAMS)
  states = {size: tx.init(PARAMS) for size, tx in looped.items()}
  for t in range(4):
    u_ref, s_ref = jax.jit(reference.update)(_grads(t), s_ref, PARAMS)
    for size, tx in looped.items():
      u, states[size] = jax.jit(tx.update)(_grads(t), states[size], PARAMS)
      jax.tree.map(_close, u, u_ref)
  for size in looped:
    jax.tree.map(_close, psgd.preconditioner_per_leaf(states[size], PARAMS),
                 psgd.preconditioner_per_leaf(s_ref, PARAMS))
  counting = psgd.preconditioner(
      lambda shape, leaves=None: CountingGroup(psgd.kron_group(shape)),
      update_probability=1.0, bucket_batch_size=1, state_layout=state_layout)
  TRACES.clear()
  jax.jit(counting.update).lower(_grads(0), counting.init(PARAMS), PARAMS)
  assert len(TRACES) == 3


@pytest.mark.parametrize("size", [0, 1.5, True, "1"])
def test_bucket_batch_size_must_be_a_positive_int(size):
  with pytest.raises(ValueError, match="bucket_batch_size must be None or an int"):
    psgd.kron(bucket_batch_size=size)


# Two stacked (layer-axis) leaves that share a bucket beside the unstacked ones.
STACKED_PARAMS = dict(PARAMS, layers_a=jnp.zeros((2, 6, 5)), layers_b=jnp.zeros((2, 6, 5)))
IS_STACKED = lambda path, leaf: "layers" in jax.tree_util.keystr(path)


def _stacked_grads(step):
  return _grads(step, STACKED_PARAMS)


def _quadratic(params):
  return sum(0.5 * jnp.sum((i + 1.0) * leaf ** 2)
             for i, leaf in enumerate(jax.tree.leaves(params)))


@pytest.mark.parametrize("curvature", [pytest.param("whitening", marks=pytest.mark.slow),
                                       "newton"])
def test_per_bucket_layout_gives_the_per_leaf_layouts_updates_and_states(curvature):
  """Same math, other storage: updates and every leaf's state are bitwise equal."""
  options = dict(curvature=curvature, update_probability=0.5, stacked=IS_STACKED)
  by_bucket = psgd.kron(**options)  # the default layout
  by_leaf = psgd.kron(state_layout="per_leaf", **options)
  s1, s2 = by_bucket.init(STACKED_PARAMS), by_leaf.init(STACKED_PARAMS)
  extra = {"value_fn": _quadratic} if curvature == "newton" else {}
  params = STACKED_PARAMS
  for t in range(6):
    grads = _stacked_grads(t)
    u1, s1 = by_bucket.update(grads, s1, params, **extra)
    u2, s2 = by_leaf.update(grads, s2, params, **extra)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, u1)
  per_leaf = psgd.preconditioner_per_leaf(s1, STACKED_PARAMS)
  assert jax.tree.structure(per_leaf) == jax.tree.structure(s2.preconditioner)
  jax.tree.map(np.testing.assert_array_equal, per_leaf, s2.preconditioner)
  # A per-leaf state passes through unchanged.
  assert psgd.preconditioner_per_leaf(s2, STACKED_PARAMS) is s2.preconditioner


def test_per_bucket_state_is_keyed_by_leaf_indices_and_stacked():
  state = psgd.kron(state_layout="per_bucket", stacked=IS_STACKED).init(STACKED_PARAMS)
  # Flatten order: block0/bias, block0/kernel, ..., block2/kernel, head, layers_a, layers_b.
  assert sorted(state.preconditioner) == ["leaves_0_2_4", "leaves_1_3_5", "leaves_6",
                                          "leaves_7_8"]
  assert sorted(state.scale_set) == sorted(state.preconditioner)
  assert [f.shape for f in state.preconditioner["leaves_1_3_5"].factors] == [(3, 6, 6),
                                                                            (3, 5, 5)]
  assert [f.shape for f in state.preconditioner["leaves_6"].factors] == [(5, 5), (3, 3)]
  # Bucket axis, then layer axis.
  assert [f.shape for f in state.preconditioner["leaves_7_8"].factors] == [(2, 2, 6, 6),
                                                                          (2, 2, 5, 5)]
  assert state.scale_set["leaves_7_8"].shape == (2, 2)
  abstract = jax.eval_shape(psgd.kron(state_layout="per_bucket", stacked=IS_STACKED).init,
                            STACKED_PARAMS)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)


def test_per_bucket_layout_without_bucketing_keeps_every_leaf_alone():
  by_bucket = psgd.kron(update_probability=1.0, bucketing=False)
  by_leaf = psgd.kron(update_probability=1.0, bucketing=False, state_layout="per_leaf")
  s1, s2 = by_bucket.init(PARAMS), by_leaf.init(PARAMS)
  assert sorted(s1.preconditioner) == sorted(f"leaves_{i}" for i in range(7))
  for t in range(3):
    u1, s1 = by_bucket.update(_grads(t), s1, PARAMS)
    u2, s2 = by_leaf.update(_grads(t), s2, PARAMS)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)
  jax.tree.map(np.testing.assert_array_equal, psgd.preconditioner_per_leaf(s1, PARAMS),
               s2.preconditioner)


def test_per_bucket_layout_rejects_what_it_cannot_hold():
  with pytest.raises(ValueError, match="state_layout must be one of"):
    psgd.kron(state_layout="bucketed")
  per_leaf_state = psgd.kron(state_layout="per_leaf").init(PARAMS)
  with pytest.raises(ValueError, match="another state_layout"):
    psgd.kron(state_layout="per_bucket").update(_grads(0), per_leaf_state, PARAMS)
  other_params = dict(PARAMS, extra=jnp.zeros(3))
  state = psgd.kron(state_layout="per_bucket").init(PARAMS)
  with pytest.raises(ValueError, match="built for other params"):
    psgd.kron(state_layout="per_bucket").update(
        jax.tree.map(jnp.ones_like, other_params), state, other_params)


def test_per_bucket_state_restores_from_an_orbax_checkpoint_bitwise(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = psgd.kron(state_layout="per_bucket", update_probability=1.0, stacked=IS_STACKED)
  step = jax.jit(tx.update)

  def run(state, start, stop):
    for t in range(start, stop):
      _, state = step(_stacked_grads(t), state, STACKED_PARAMS)
    return state

  full = run(tx.init(STACKED_PARAMS), 0, 6)
  half = run(tx.init(STACKED_PARAMS), 0, 3)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "step3", half)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tx.init(STACKED_PARAMS))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "step3", abstract)
  jax.tree.map(np.testing.assert_array_equal, run(restored, 3, 6), full)


def test_per_bucket_state_keeps_its_structure_under_nnx_optimizer():
  """nnx.Optimizer hands a per-leaf state's group NamedTuples back as nnx States (a new
  structure, so a jitted step compiles twice); a per-bucket state comes back as it went."""
  nnx = pytest.importorskip("flax.nnx")
  optax = pytest.importorskip("optax")
  model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 4, rngs=nnx.Rngs(1)))
  optimizer = nnx.Optimizer(
      model, optax.chain(psgd.kron(state_layout="per_bucket"), optax.scale(-0.1)),
      wrt=nnx.Param)
  before = jax.tree.structure(nnx.as_pure(optimizer.opt_state))
  traces = []

  @nnx.jit
  def train_step(model, optimizer, x):
    traces.append(1)
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  for _ in range(3):
    train_step(model, optimizer, jnp.ones((2, 4)))
  assert jax.tree.structure(nnx.as_pure(optimizer.opt_state)) == before
  assert len(traces) == 1


@pytest.mark.parametrize("family", [
    lambda **kw: psgd.lra(rank=2, **kw),  # has init_from_unit, whose stored init is stacked
    pytest.param(psgd.xmat, marks=pytest.mark.slow),
    pytest.param(psgd.butterfly, marks=pytest.mark.slow),
    pytest.param(lambda **kw: psgd.splu(order=2, **kw), marks=pytest.mark.slow),
    pytest.param(psgd.dense, marks=pytest.mark.slow),
    pytest.param(psgd.diag, marks=pytest.mark.slow),
    pytest.param(psgd.scan, marks=pytest.mark.slow),
])
def test_every_group_runs_in_the_per_bucket_layout(family):
  """States bitwise equal to the per-leaf layout's; updates equal up to the rounding of a
  batched product against separate ones (measured ≤ 1.2e-7)."""
  by_bucket = family(update_probability=0.5)  # the default layout
  by_leaf = family(update_probability=0.5, state_layout="per_leaf")
  s1, s2 = by_bucket.init(PARAMS), by_leaf.init(PARAMS)
  for t in range(4):
    u1, s1 = by_bucket.update(_grads(t), s1, PARAMS)
    u2, s2 = by_leaf.update(_grads(t), s2, PARAMS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), u1, u2)
  jax.tree.map(np.testing.assert_array_equal, psgd.preconditioner_per_leaf(s1, PARAMS),
               s2.preconditioner)
