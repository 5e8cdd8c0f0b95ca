"""Every public factory and ready optimizer (the one list in ``_factories``) behaves like an
optax transformation: extra arguments, ``inject_hyperparams``, dtypes, abstract ``init``,
``MultiSteps``, schedules, and the Newton type's curvature arguments."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd_optax as psgd
from _factories import FACTORIES, sampled

# Explicit float32: optax.ema keeps the weak type of a weakly typed leaf in its state.
PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4),
          "b": jnp.full((4,), 0.5, jnp.float32), "s": jnp.asarray(2.0, jnp.float32)}


def loss_fn(params):
  out = jnp.tanh(jnp.ones((2, 3)) @ params["w"] + params["b"]) * params["s"]
  return jnp.sum((out - 0.3) ** 2) + 0.1 * jnp.sum(params["w"] ** 2)


# Cheap contracts run for every entry of the one list; those that compile a step per entry
# and curvature run for a sample by default and for every entry with -m slow.
SAMPLE = ("kron", "kron_eq", "dense", "lra", "optimizers.kron", "fop", "snr")


def _slow_unless(default: bool):
  return () if default else pytest.mark.slow


def _extra(curvature):
  return {"value_fn": loss_fn} if curvature in ("newton", "finite_difference") else {}


def _run(tx, curvature, steps=3, params=PARAMS):
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, **_extra(curvature)))
  outputs = []
  for _ in range(steps):
    grads = jax.grad(loss_fn)(params)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    outputs.append(updates)
  return outputs, state


@pytest.mark.parametrize("name,curvature", [
    *[pytest.param(name, "whitening", marks=_slow_unless(name in SAMPLE)) for name in FACTORIES],
    ("kron", "newton"), ("kron", "finite_difference"),
    pytest.param("kron", "secant", marks=pytest.mark.slow),
    ("optimizers.diag", "finite_difference"),
    pytest.param("lra", "secant", marks=pytest.mark.slow)])
def test_unknown_extra_args_are_accepted_without_recompiling(name, curvature):
  tx = FACTORIES[name](**FACTORIES[name].engine_options(curvature, update_probability=1.0))
  state = tx.init(PARAMS)
  traces = []

  @jax.jit
  def step(grads, state, params, unrelated):
    traces.append(1)
    return tx.update(grads, state, params, unrelated_arg=unrelated, another=3,
                     **_extra(curvature))

  grads = jax.grad(loss_fn)(PARAMS)
  updates1, state = step(grads, state, PARAMS, jnp.asarray(1.0))
  updates2, state = step(grads, state, PARAMS, jnp.asarray(7.0))
  assert len(traces) == 1
  assert jax.tree.all(jax.tree.map(lambda u: bool(jnp.all(jnp.isfinite(u))), updates2))


@pytest.mark.parametrize("factory,kwargs", [
    (psgd.kron, {"precond_lr": 0.2, "damping": 1e-5, "update_probability": 0.5}),
    (psgd.dense, {"precond_lr": 0.3, "update_probability": 1.0}),
    (psgd.diag, {"precond_lr": 0.3, "lipschitz_decay": 0.5}),
    (psgd.lra, {"rank": 2, "precond_lr": 0.3}),
    pytest.param(psgd.splu, {"order": 2, "update_probability": 1.0}, marks=pytest.mark.slow),
    pytest.param(psgd.xmat, {"precond_lr": 0.3, "damping": 1e-4, "damping_type": "traditional"},
                 marks=pytest.mark.slow),
    pytest.param(psgd.scan, {"precond_lr": 0.3}, marks=pytest.mark.slow),
    (psgd.optimizers.kron, {"learning_rate": 0.01, "momentum": 0.5, "weight_decay": 1e-3}),
    pytest.param(psgd.optimizers.dense, {"learning_rate": 0.01, "precond_lr": 0.2},
                 marks=pytest.mark.slow),
    (psgd.optimizers.diag, {"learning_rate": 0.01, "max_update_rms": 1.0}),
])
def test_inject_hyperparams_gives_identical_updates(factory, kwargs):
  plain, _ = _run(factory(**kwargs), "whitening", steps=4)
  injected, state = _run(optax.inject_hyperparams(factory)(**kwargs), "whitening", steps=4)
  # The first two updates agree to rounding; later ones through a model whose gradients
  # amplify a rounding-level difference in the params (measured for scan: 4e-7 of a leaf's
  # largest entry after step 2, 3e-4 of it in a near-cancelling bias entry after step 3).
  for t, (a, b) in enumerate(zip(plain, injected)):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        x, y, rtol=1e-6, atol=1e-7 if t < 2 else 1e-3 * float(jnp.max(jnp.abs(y)))), a, b)
  numeric = {k for k, v in kwargs.items() if not isinstance(v, str)}  # strings stay static
  assert numeric <= set(state.hyperparams)


@pytest.mark.parametrize("name,dtype", [
    *[pytest.param(name, jnp.bfloat16,
                   marks=_slow_unless(name in SAMPLE + ("diag", "xmat", "splu", "scan")))
      for name in FACTORIES],
    # float32 params are every other test's params: checked again with -m slow.
    pytest.param("kron", jnp.float32, marks=pytest.mark.slow),
    pytest.param("optimizers.kron", jnp.float32, marks=pytest.mark.slow)])
def test_updates_keep_param_dtype_and_state_stays_float32(name, dtype):
  params = jax.tree.map(lambda p: p.astype(dtype), PARAMS)
  tx = FACTORIES[name](**FACTORIES[name].engine_options("newton", update_probability=1.0))
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params)
  updates, new_state = jax.jit(lambda g, s: tx.update(g, s, params, value_fn=loss_fn))(grads, state)
  assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)
  for leaf in jax.tree.leaves(new_state):
    if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != dtype:
      assert leaf.dtype == jnp.float32
  q_dtypes = {leaf.dtype for leaf in jax.tree.leaves(
      [s.preconditioner for s in jax.tree.leaves(new_state, is_leaf=lambda x: isinstance(x, psgd.PSGDState)) if isinstance(s, psgd.PSGDState)])}
  assert q_dtypes == ({jnp.dtype(jnp.float32)} if FACTORIES[name].curvatures else set())
  assert all(jnp.all(jnp.isfinite(u.astype(jnp.float32))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", sampled(FACTORIES, SAMPLE))
def test_state_dtypes_and_shapes_are_stable_across_update_and_lax_cond(name):
  tx = FACTORIES[name](**FACTORIES[name].engine_options(update_probability=0.5))
  state = tx.init(PARAMS)
  grads = jax.grad(loss_fn)(PARAMS)
  _, new_state = tx.update(grads, state, PARAMS)
  spec = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert spec(new_state) == spec(state)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  # Both branches of a cond must agree: this fails to trace if update changed any dtype.
  chosen = jax.jit(lambda p: jax.lax.cond(p, lambda: tx.update(grads, state, PARAMS)[1],
                                          lambda: state))(True)
  assert spec(chosen) == spec(state)


@pytest.mark.parametrize("name", FACTORIES)
def test_init_on_shape_dtype_structs(name):
  tx = FACTORIES[name]()
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), PARAMS)
  concrete = tx.init(PARAMS)
  from_structs = tx.init(abstract)
  traced = jax.eval_shape(tx.init, abstract)
  spec = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)
  assert spec(from_structs) == spec(concrete) == spec(traced)


@pytest.mark.parametrize("name", sampled(FACTORIES, ("kron", "diag", "optimizers.kron")))
def test_multisteps_accumulates_then_applies(name):
  tx = optax.MultiSteps(FACTORIES[name](**FACTORIES[name].engine_options(update_probability=1.0)),
                        every_k_schedule=3)
  state = tx.init(PARAMS)
  grads = jax.grad(loss_fn)(PARAMS)
  step = jax.jit(tx.update)
  applied = []
  for _ in range(6):
    updates, state = step(grads, state, PARAMS)
    applied.append(any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates)))
  assert applied == [False, False, True, False, False, True]


@pytest.mark.parametrize("option", ["precond_lr", "update_probability"])
def test_schedule_of_a_constant_equals_the_constant(option):
  value = 0.3
  constant, _ = _run(psgd.kron(**{option: value}), "whitening", steps=5)
  scheduled, _ = _run(psgd.kron(**{option: optax.constant_schedule(value)}), "whitening",
                      steps=5)
  for a, b in zip(constant, scheduled):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)


def test_learning_rate_schedule_in_ready_optimizer():
  schedule = optax.linear_schedule(0.1, 0.0, 4)
  updates, _ = _run(psgd.optimizers.kron(learning_rate=schedule), "whitening", steps=5)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates[-1]))
  assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates[0]))


def test_newton_without_curvature_source_names_both_ways():
  tx = psgd.kron(curvature="newton")
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match=r"value_fn=.*hvp=.*vector="):
    tx.update(PARAMS, state, PARAMS)
  with pytest.raises(ValueError, match="vector="):
    tx.update(PARAMS, state, PARAMS, hvp=PARAMS)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(PARAMS, state, None, value_fn=loss_fn)


def test_newton_with_caller_hvp_equals_newton_with_value_fn():
  """Supplying (vector, H·vector) yourself gives the same fit as value_fn does."""
  hessian = jnp.diag(jnp.arange(1.0, 7.0))
  quadratic = lambda x: 0.5 * x @ hessian @ x
  x = jnp.ones(6)
  by_value_fn = psgd.dense(curvature="newton", update_probability=1.0)
  by_hvp = psgd.dense(curvature="newton", update_probability=1.0)
  s1, s2 = by_value_fn.init(x), by_hvp.init(x)
  for t in range(5):
    _, s1 = by_value_fn.update(hessian @ x, s1, x, value_fn=quadratic)
    vector = jax.random.normal(jax.random.key(t), (6,))
    _, s2 = by_hvp.update(hessian @ x, s2, x, hvp=hessian @ vector, vector=vector)
  group = psgd.dense_group((6,))
  p1, p2 = (group.materialize(psgd.preconditioner_per_leaf(s, x)) for s in (s1, s2))
  # Different probes, same target: both approach H⁻¹ at the same rate.
  err = lambda p: float(jnp.linalg.norm(p @ hessian - jnp.eye(6)))
  assert abs(err(p1) - err(p2)) < 0.5 * max(err(p1), err(p2)) + 1e-3


def test_value_fn_hvp_runs_only_on_fitting_steps():
  calls = []

  def counted_loss(params):
    jax.debug.callback(lambda: calls.append(1))
    return loss_fn(params)

  tx = psgd.kron(curvature="newton", update_probability=0.1, seed=3)
  state = tx.init(PARAMS)
  grads = jax.grad(loss_fn)(PARAMS)
  step = jax.jit(lambda g, s: tx.update(g, s, PARAMS, value_fn=counted_loss))
  fits = 0
  for _ in range(200):
    before = state.preconditioner
    _, state = step(grads, state)
    jax.effects_barrier()
    fits += int(any(bool(jnp.any(a != b)) for a, b in
                    zip(jax.tree.leaves(before), jax.tree.leaves(state.preconditioner))))
  assert 5 <= fits <= 45  # ~10% of 200 steps (plus the forced first fit)
  assert 0 < len(calls) <= 2 * fits
