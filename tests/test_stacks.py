"""The one layout: units of one shape share a stack, run through one vmapped fit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd_optax as psgd

PARAMS = {f"block{i}": {"kernel": jnp.zeros((6, 5)), "bias": jnp.zeros(5)} for i in range(3)}
PARAMS["head"] = jnp.zeros((5, 3))
# Two stacked (layer-axis) leaves whose layers join the (6, 5) kernels' stack.
STACKED_PARAMS = dict(PARAMS, layers_a=jnp.zeros((2, 6, 5)), layers_b=jnp.zeros((2, 6, 5)))
IS_STACKED = lambda path, leaf: "layers" in jax.tree_util.keystr(path)


def _grads(step, params=None):
  """Random gradients for ``params`` (default ``PARAMS``), a different scale per leaf."""
  params = PARAMS if params is None else params
  key = jax.random.fold_in(jax.random.key(0), step)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.normal(k, leaf.shape) * (i + 1)
                            for i, (k, leaf) in enumerate(zip(keys, leaves))])


def _caller_pairs(step, params=None):
  """Probes and their products given by the caller, so that a stacked run and a run of
  each leaf alone fit the same pairs (the engine draws its probes one block per stack)."""
  vector = _grads(100 + step, params)
  return {"vector": vector, "hvp": jax.tree.map(lambda v: 2.0 * v + 0.3 * jnp.roll(v, 1), vector)}


def test_plan_stacks_units_by_shape_in_flatten_order():
  state = psgd.kron(stacked=IS_STACKED).init(STACKED_PARAMS)
  # Flatten order: block0/bias, block0/kernel, ..., block2/kernel, head, layers_a, layers_b.
  assert len(state.preconditioner) == len(state.scale_set) == 3
  assert [f.shape for f in state.preconditioner[0].factors] == [(3, 5)]  # biases: one factor
  # Three kernels and the two layers of each stacked leaf: seven members.
  assert [f.shape for f in state.preconditioner[1].factors] == [(7, 6, 6), (7, 5, 5)]
  assert [f.shape for f in state.preconditioner[2].factors] == [(1, 5, 5), (1, 3, 3)]
  assert [s.shape for s in state.scale_set] == [(3,), (7,), (1,)]
  abstract = jax.eval_shape(psgd.kron(stacked=IS_STACKED).init, STACKED_PARAMS)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  per_leaf = psgd.preconditioner_per_leaf(state, STACKED_PARAMS, stacked=IS_STACKED)
  assert [f.shape for f in per_leaf["layers_b"].factors] == [(2, 6, 6), (2, 5, 5)]
  assert [f.shape for f in per_leaf["block1"]["kernel"].factors] == [(6, 6), (5, 5)]


@pytest.mark.parametrize("family", [
    lambda **kw: psgd.kron(**kw),
    pytest.param(lambda **kw: psgd.lra(rank=2, **kw), marks=pytest.mark.slow),
    pytest.param(psgd.xmat, marks=pytest.mark.slow),
    pytest.param(lambda **kw: psgd.splu(order=2, **kw), marks=pytest.mark.slow),
    pytest.param(psgd.dense, marks=pytest.mark.slow),
    pytest.param(psgd.scan, marks=pytest.mark.slow),
])
def test_a_stack_member_equals_its_leaf_fitted_alone(family):
  """Same pairs, same math: each leaf's state and update equal those of the leaf run
  through its own transformation, up to the rounding of a batched product (≤ 1e-5)."""
  options = dict(curvature="newton", update_probability=0.5, stacked=IS_STACKED)
  together = family(**options)
  state = together.init(STACKED_PARAMS)
  names = list(STACKED_PARAMS)
  alone = {name: family(curvature="newton", update_probability=0.5,
                        stacked={name: name.startswith("layers")}) for name in names}
  alone_states = {name: alone[name].init({name: STACKED_PARAMS[name]}) for name in names}
  step = jax.jit(together.update)
  for t in range(4):
    grads, pairs = _grads(t, STACKED_PARAMS), _caller_pairs(t, STACKED_PARAMS)
    updates, state = step(grads, state, STACKED_PARAMS, **pairs)
    for name in names:
      pick = lambda tree: {name: tree[name]}
      leaf_updates, alone_states[name] = alone[name].update(
          pick(grads), alone_states[name], pick(STACKED_PARAMS),
          hvp=pick(pairs["hvp"]), vector=pick(pairs["vector"]))
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                   updates[name], leaf_updates[name])
  per_leaf = psgd.preconditioner_per_leaf(state, STACKED_PARAMS, stacked=IS_STACKED)
  for name in names:
    own = psgd.preconditioner_per_leaf(alone_states[name], {name: STACKED_PARAMS[name]},
                                       stacked={name: name.startswith("layers")})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 per_leaf[name], own[name])


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


def test_fit_is_traced_once_per_stack():
  """3 kernels (6, 5) and the 4 layers of two stacked leaves, 3 biases (5,) and a head
  (5, 3): 3 stacks for 9 leaves."""
  tx = psgd.preconditioner(lambda shape, leaves=None: CountingGroup(psgd.kron_group(shape)),
                           update_probability=1.0, stacked=IS_STACKED)
  state = tx.init(STACKED_PARAMS)
  TRACES.clear()
  jax.jit(tx.update).lower(_grads(0, STACKED_PARAMS), state, STACKED_PARAMS)
  assert len(TRACES) == 3


def test_a_state_that_does_not_fit_is_refused_with_one_clear_error():
  state = psgd.kron().init(PARAMS)
  grads = _grads(0)
  other_params = dict(PARAMS, extra=jnp.zeros(3))
  with pytest.raises(ValueError, match="does not fit these params"):
    psgd.kron().update(jax.tree.map(jnp.ones_like, other_params), state, other_params)
  with pytest.raises(ValueError, match="does not fit these params"):  # another group
    psgd.diag().update(grads, state, PARAMS)
  with pytest.raises(ValueError, match="psgd_optax 0.1"):  # the old dict layout
    old = state._replace(preconditioner={"leaves_0_2_4": state.preconditioner[0]})
    psgd.kron().update(grads, old, PARAMS)
  # X-shape and butterfly states have the same shapes and other fields.
  xmat_state = psgd.xmat().init(PARAMS)
  with pytest.raises(ValueError, match="does not fit these params"):
    psgd.butterfly().update(grads, xmat_state, PARAMS)


def test_stacked_state_restores_from_an_orbax_checkpoint_bitwise(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = psgd.kron(update_probability=1.0, stacked=IS_STACKED)
  step = jax.jit(tx.update)

  def run(state, start, stop):
    for t in range(start, stop):
      _, state = step(_grads(t, STACKED_PARAMS), state, STACKED_PARAMS)
    return state

  full = run(tx.init(STACKED_PARAMS), 0, 6)
  half = run(tx.init(STACKED_PARAMS), 0, 3)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "step3", half)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tx.init(STACKED_PARAMS))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "step3", abstract)
  jax.tree.map(np.testing.assert_array_equal, run(restored, 3, 6), full)


@pytest.mark.parametrize("saved,restored_into", [
    (lambda: psgd.kron(), lambda: psgd.kron(geometry="eq")),
    (lambda: psgd.xmat(), lambda: psgd.butterfly())])
def test_orbax_refuses_a_state_of_other_structural_options(saved, restored_into, tmp_path):
  """SPD Kron factors would be read as triangular ones, X-shape couplings as butterfly
  ones: same shapes, other meaning. The states' field names differ, so Orbax refuses."""
  ocp = pytest.importorskip("orbax.checkpoint")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "state", saved().init(PARAMS))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, restored_into().init(PARAMS))
  with ocp.StandardCheckpointer() as checkpointer, pytest.raises(ValueError,
                                                                  match="do not match"):
    checkpointer.restore(tmp_path / "state", abstract)


def test_state_keeps_its_structure_under_nnx_optimizer():
  """nnx.Optimizer hands the state back in its own containers; a state whose structure
  changed would make a jitted step compile twice."""
  nnx = pytest.importorskip("flax.nnx")
  optax = pytest.importorskip("optax")
  model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 4, rngs=nnx.Rngs(1)))
  optimizer = nnx.Optimizer(model, optax.chain(psgd.kron(), optax.scale(-0.1)), wrt=nnx.Param)
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


def test_zero_size_leaves_pass_through():
  params = {"w": jnp.zeros((3, 4)), "empty": jnp.zeros((0, 5))}
  tx = psgd.kron()
  state = tx.init(params)
  assert len(state.preconditioner) == 1
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert updates["empty"].shape == (0, 5)
