"""The contract every public factory and ready optimizer keeps, on a model with a scalar and
a 5-entry bias: bad steps are skipped, every scale works, x64, checkpoints, optax's tree
utilities and wrappers, and derivatives through ``update``."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd_optax as psgd
from _factories import BARE, ENGINE, FACTORIES, needs_value_fn, sampled

X = jax.random.normal(jax.random.key(0), (16, 4))
Y = jnp.sin(X @ jnp.linspace(-1.0, 1.0, 20).reshape(4, 5))
PARAMS = {"w": 0.3 * jax.random.normal(jax.random.key(1), (4, 5)), "b": jnp.zeros(5),
          "s": jnp.asarray(1.0, jnp.float32)}  # not weakly typed: no retrace


def loss_fn(params, scale=1.0):
  x, y = X.astype(params["w"].dtype), Y.astype(params["w"].dtype)  # float64 under x64
  prediction = params["s"] * jnp.tanh(x @ params["w"] + params["b"])
  return scale * jnp.mean((prediction - y) ** 2)


def _options(name, curvature=None, **engine_options):
  return FACTORIES[name].engine_options(curvature, **engine_options)


def _step_fn(tx, curvature=None):
  """One training step, the gradients given (so a test can poison them) and the loss's
  scale a traced argument: one compile serves every test and scale."""
  def step(params, state, grads, scale):
    loss = lambda p: loss_fn(p, scale)
    extra = {"value_fn": loss} if needs_value_fn(curvature) else {}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, updates
  return step


@functools.lru_cache(maxsize=None)
def _trainer(name, curvature="whitening"):
  """``(tx, jitted step, jitted gradient)`` of an entry as a training step, at update
  probability 1, built once per test process."""
  tx = FACTORIES[name].trainer(**_options(name, curvature, update_probability=1.0))
  gradient = jax.jit(lambda params, scale: jax.grad(loss_fn)(params, scale))
  return tx, jax.jit(_step_fn(tx, curvature)), gradient


def _train(name, curvature, params, state, steps, scale=1.0):
  _, step, gradient = _trainer(name, curvature)
  scale = jnp.float32(scale)
  updates = []
  for _ in range(steps):
    params, state, update = step(params, state, gradient(params, scale), scale)
    updates.append(update)
  return params, state, updates


# One of each kind: the engine, a ready optimizer, the first-order transformations.
SAMPLE = ("kron", "optimizers.kron", "fop", "scalar_hypergradient", "snr")


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact))


@pytest.mark.parametrize("name", FACTORIES)
def test_a_non_finite_step_is_skipped_and_training_goes_on(name):
  """NaN or ±Inf in one step's gradients: zero updates, the state as it was (the PSGD
  engine's call count aside), then clean steps train on."""
  tx, step, _ = _trainer(name)
  params, state, _ = _train(name, "whitening", PARAMS, tx.init(PARAMS), 3)
  before = float(loss_fn(params))
  for bad in (np.nan, np.inf, -np.inf):
    grads = jax.grad(loss_fn)(params)
    grads["w"] = grads["w"].at[1, 2].set(bad)
    new_params, new_state, updates = step(params, state, grads, jnp.float32(1.0))
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates)), (name, bad)
    jax.tree.map(np.testing.assert_array_equal, _without_call_counts(new_state),
                 _without_call_counts(state))
    jax.tree.map(np.testing.assert_array_equal, new_params, params)
    state = new_state
  params, state, updates = _train(name, "whitening", params, state, 20)
  assert _finite(updates) and _finite(state), name
  assert float(loss_fn(params)) < before, (name, before, float(loss_fn(params)))


def _without_call_counts(state):
  """The state with every PSGD engine's call count zeroed (it numbers calls, bad or not)."""
  return jax.tree.map(
      lambda node: (node._replace(count=jnp.zeros([], jnp.int32))
                    if isinstance(node, psgd.PSGDState) else node),
      state, is_leaf=lambda node: isinstance(node, psgd.PSGDState))


SCALES = (1e-20, 1e-30, 1e20, 1e30)


# Whitening pairs for every entry (each group's own fit meets the scale there); the
# Newton and finite-difference pairs for the groups that rescale their pair before the fit,
# each in its own way; secant pairs (the source's own first steps) through one group of each
# rescaling kind. The other combinations repeat a code path and run with -m slow.
SCALE_SAMPLE = {(name, curvature) for name in FACTORIES for curvature in ("whitening", None)}
SCALE_SAMPLE |= {(name, curvature) for name in ("kron", "kron_eq", "lra", "xmat", "splu")
                 for curvature in ("newton", "finite_difference")}
SCALE_SAMPLE |= {(name, "secant") for name in ("kron", "lra", "splu")}


@pytest.mark.parametrize("name,curvature", [
    pytest.param(name, curvature, marks=() if (name, curvature) in SCALE_SAMPLE
                 else pytest.mark.slow)
    for name, entry in FACTORIES.items() for curvature in (entry.curvatures or (None,))])
def test_every_gradient_scale_gives_the_same_steps(name, curvature):
  """The loss scaled by 1e-30 … 1e30 (gradients and curvature alike): every update and
  state stays finite, and a preconditioner whose ``P g`` is scale free (every PSGD family
  and ready optimizer) takes the steps it takes at scale 1, to float32 rounding. Zero
  gradients give zero updates."""
  tx = _trainer(name, curvature or "whitening")[0]
  steps = {}
  for scale in (1.0, 0.0) + SCALES:
    _, state, steps[scale] = _train(name, curvature or "whitening", PARAMS, tx.init(PARAMS), 4,
                                    scale)
    assert _finite(steps[scale]) and _finite(state), (name, curvature, scale)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(steps[0.0][0])), name
  if FACTORIES[name].scale_free:
    # The first two steps (each unit's first two fits: LRA's U and V, sparse LU's L and U
    # both move). Later ones may part at a tie the rounding of another scale breaks.
    for scale in SCALES:
      for t in range(2):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(b))),
            err_msg=f"scale {scale}, step {t}"), steps[scale][t], steps[1.0][t])


@pytest.mark.parametrize("name", sampled(FACTORIES, SAMPLE + ("diag", "lra", "splu", "scan")))
def test_x64_with_injected_hyperparameters(name):
  """float64 params under ``jax_enable_x64``, the default float32 state, every numeric
  option injected (so it arrives as a float64 array)."""
  factory = FACTORIES[name]
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), PARAMS)
    numeric = dict(precond_lr=0.2, update_probability=0.9) if factory.curvatures else {}
    tx = factory.injected(**numeric)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
    for _ in range(3):
      updates, state = step(params, state)
      params = optax.apply_updates(params, updates)
    assert all(u.dtype == jnp.float64 for u in jax.tree.leaves(updates)), name
    assert _finite(updates), name


def _psgd_states(state):
  return [node for node in jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, psgd.PSGDState))
          if isinstance(node, psgd.PSGDState)]


# One entry per kind of state (the other entries hold the same containers).
CHECKPOINT_SAMPLE = ("kron", "kron_eq", "lra", "xmat", "splu", "scan", "affine_pairs_scan",
                     "optimizers.with_preconditioner", "fop", "scalar_hypergradient", "snr")


@pytest.mark.parametrize("name", sampled(FACTORIES, CHECKPOINT_SAMPLE))
def test_default_state_checkpoints_with_orbax(name, tmp_path):
  """No default configuration holds a zero-size array (Orbax refuses them); a restored
  state equals the saved one and steps on bitwise like it."""
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = _trainer(name)[0]
  state = tx.init(PARAMS)
  assert all(leaf.size > 0 for leaf in jax.tree.leaves(state)), name
  params, state, _ = _train(name, "whitening", PARAMS, state, 1)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "state", state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tx.init(PARAMS))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "state", abstract)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  jax.tree.map(np.testing.assert_array_equal, _train(name, "whitening", params, restored, 1),
               _train(name, "whitening", params, state, 1))


@pytest.mark.parametrize("name", FACTORIES)
def test_map_params_touches_only_params_shaped_state(name):
  tx = FACTORIES[name](**_options(name, "secant" if name in ENGINE else None))
  state = tx.init(PARAMS)
  marked = optax.tree.map_params(tx, lambda p: jnp.full(p.shape, 7.0, p.dtype), state)
  assert jax.tree.structure(marked) == jax.tree.structure(state)
  for psgd_state, marked_state in zip(_psgd_states(state), _psgd_states(marked)):
    # The factors are not params-shaped: untouched. The secant memory is (but not in
    # affine_pairs' joined layout).
    jax.tree.map(np.testing.assert_array_equal, marked_state.preconditioner,
                 psgd_state.preconditioner)
    memory_marked = all(bool(jnp.all(m == 7.0)) for m in
                        jax.tree.leaves(marked_state.curvature.params))
    assert memory_marked == (name != "affine_pairs_scan"), name
  changed = [a for a, b in zip(jax.tree.leaves(marked), jax.tree.leaves(state))
             if not np.array_equal(a, b)]
  params_shapes = {np.shape(p) for p in jax.tree.leaves(PARAMS)}
  assert all(np.shape(a) in params_shapes and bool(jnp.all(a == 7.0)) for a in changed), name
  # The way shardings are derived: a spec for params-shaped entries, one for the rest.
  specs = optax.tree.map_params(tx, lambda _: "params", state,
                                transform_non_params=lambda _: "other")
  assert set(jax.tree.leaves(specs)) <= {"params", "other"}


@pytest.mark.parametrize("name", sampled(FACTORIES, ("kron", "fop", "snr")))
def test_tuple_params_and_optax_masked(name):
  """A tuple params tree gives the updates the same leaves give in a dict; under
  ``optax.masked`` the masked-out leaf passes through."""
  as_dict = {"a": PARAMS["w"], "b": PARAMS["b"]}
  as_tuple = (PARAMS["w"], PARAMS["b"])
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, as_dict)
  tx = FACTORIES[name](**_options(name, update_probability=1.0))
  updates_dict, _ = tx.update(grads, tx.init(as_dict), as_dict)
  updates_tuple, _ = tx.update((grads["a"], grads["b"]), tx.init(as_tuple), as_tuple)
  for a, b in zip(jax.tree.leaves(updates_dict), jax.tree.leaves(updates_tuple)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  masked = optax.masked(tx, {"a": True, "b": False})
  updates, _ = masked.update(grads, masked.init(as_dict), as_dict)
  np.testing.assert_array_equal(updates["b"], grads["b"])
  assert _finite(updates["a"])


def _unrolled_losses(tx, steps):
  """params → the loss after each of ``steps`` updates (one scan: its body compiles once)."""
  def run(params):
    def step(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), loss_fn(params)
    return jax.lax.scan(step, (params, tx.init(params)), length=steps)[1]
  return run


@pytest.mark.parametrize("name", sampled(FACTORIES, ("kron", "fop", "snr")))
def test_derivative_through_unrolled_updates_matches_finite_differences(name):
  """Meta-learning and unrolled optimization differentiate through ``update``: the
  derivative of the loss after 1 and 3 updates along a direction, in float64, equals the
  central difference."""
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), PARAMS)
    direction = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float64)
                                                .reshape(p.shape) + 1.0), params)
    tx = FACTORIES[name].trainer(precond_dtype="float64",
                                 **_options(name, update_probability=1.0))
    losses = jax.jit(_unrolled_losses(tx, 3))  # after 1, 2 and 3 updates
    jacobian = jax.jit(jax.jacrev(lambda p: losses(p)[jnp.array([0, 2])]))(params)
    assert _finite(jacobian), name
    along = sum(jnp.tensordot(j, d, axes=d.ndim) for j, d in zip(jax.tree.leaves(jacobian),
                                                                  jax.tree.leaves(direction)))
    eps = 1e-5
    shifted = lambda sign: jax.tree.map(lambda p, d: p + sign * eps * d, params, direction)
    central = (losses(shifted(1)) - losses(shifted(-1)))[jnp.array([0, 2])] / (2 * eps)
    np.testing.assert_allclose(along, central, rtol=1e-4, atol=1e-9, err_msg=name)


def _optax_rosenbrock(params):
  """optax's own test target (``alias_test``): from (0, 0), minimum at (1, 1)."""
  return (1.0 - params[0]) ** 2 + 100.0 * (params[1] - params[0] ** 2) ** 2


@pytest.mark.parametrize("name", sampled(BARE, ("kron", "dense", "diag", "lra")))
def test_the_bare_chain_solves_optax_rosenbrock_test(name):
  """``optax.chain(psgd.X(), optax.scale(-1e-3))`` as optax's alias tests run an optimizer:
  10000 steps from (0, 0) end within 3e-2 of (1, 1), without a clip."""
  tx = optax.chain(FACTORIES[name](), optax.scale(-1e-3))

  @jax.jit
  def run(params):
    def body(_, carry):
      params, state = carry
      updates, state = tx.update(jax.grad(_optax_rosenbrock)(params), state, params)
      return optax.apply_updates(params, updates), state
    return jax.lax.fori_loop(0, 10000, body, (params, tx.init(params)))[0]

  np.testing.assert_allclose(run(jnp.zeros(2)), jnp.ones(2), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", sampled(BARE, ("kron",)))
def test_the_bare_chain_trains_an_mlp_whose_first_gradients_are_tiny(name):
  """A digits MLP (4×4-pooled images, 32 hidden units) whose output layer starts near 0:
  the hidden layer's first gradients are ~1e-3 of what they become. Every bare family at lr
  1e-2, without a clip, never raises the loss above its start and ends 10× below it (before
  the whitened step was bounded, the loss rose to 4–35 and ended at 1.6–35)."""
  from sklearn.datasets import load_digits
  images, labels = load_digits(return_X_y=True)
  pooled = images.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16)
  x, y = jnp.asarray(pooled[:256] / 16.0, jnp.float32), jnp.asarray(labels[:256])
  keys = jax.random.split(jax.random.key(0))
  params = {"w1": jax.random.normal(keys[0], (16, 32)) / 4, "b1": jnp.zeros(32),
            "w2": 1e-3 * jax.random.normal(keys[1], (32, 10)), "b2": jnp.zeros(10)}

  def loss(p):
    logits = jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx = optax.chain(FACTORIES[name](), optax.scale(-1e-2))

  @jax.jit
  def run(params):
    def body(carry, _):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), value
    (params, _), losses = jax.lax.scan(body, (params, tx.init(params)), length=150)
    return losses, loss(params)

  losses, final = run(params)
  assert float(jnp.max(losses)) <= float(losses[0]) * 1.01, (name, losses)
  assert float(final) < 0.1 * float(losses[0]), (name, float(final))


@pytest.mark.parametrize("name", sampled(BARE, ("kron", "diag")))
def test_the_bare_chain_survives_a_shift_of_the_data_scale(name):
  """Linear regression trained to convergence, then inputs ×100 and a new teacher: the bare
  chain at lr 1e-3 … 1e-2 stays finite and learns the new target (NaN within 4 steps before
  the whitened step was bounded)."""
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (64, 8))
  teachers = [jax.random.normal(k, (8,)) for k in keys[1:]]
  loss = lambda p, x, w: jnp.mean((x @ p["w"] + p["b"] - x @ w) ** 2)
  tx = FACTORIES[name]()

  @jax.jit
  def run(params, state, x, teacher, lr):  # the chain's optax.scale(-lr), lr traced
    def body(carry, _):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params, x, teacher)
      directions, state = tx.update(grads, state, params)
      return (jax.tree.map(lambda p, d: p - lr * d, params, directions), state), value
    return jax.lax.scan(body, (params, state), length=3000)

  for lr in (1e-3, 3e-3, 1e-2):
    params = {"w": jnp.zeros(8), "b": jnp.zeros(())}
    (params, state), first = run(params, tx.init(params), x, teachers[0], lr)
    assert float(first[-1]) < 1e-2 * float(first[0]), (name, lr, float(first[-1]))
    _, second = run(params, state, 100.0 * x, teachers[1], lr)
    assert bool(jnp.all(jnp.isfinite(second))), (name, lr)
    assert float(second[-1]) < 0.1 * float(second[0]), (name, lr, float(second[-1]))


@pytest.mark.parametrize("name", FACTORIES)
def test_complex_params_are_refused_at_init(name):
  tx = FACTORIES[name](**_options(name))
  with pytest.raises(ValueError, match="real parameters"):
    tx.init({"w": jnp.ones((3, 2), jnp.complex64), "b": jnp.zeros(2)})


@pytest.mark.parametrize("name", sampled(FACTORIES, ("kron", "fop")))
def test_a_donated_step_reuses_every_state_buffer_and_equals_the_plain_step(name):
  """Training loops jit their step with params and state donated: every state buffer must
  be reusable (same shape and dtype, none held twice: no warning, inputs consumed), and
  reusing them must not change the result (beyond float32 rounding: the donated program is
  compiled on its own, and XLA may order a reduction differently in it)."""
  tx = _trainer(name)[0]
  step = lambda p, s: _step_fn(tx)(p, s, jax.grad(loss_fn)(p), 1.0)[:2]
  plain, donated = jax.jit(step), jax.jit(step, donate_argnums=(0, 1))
  expected = (PARAMS, tx.init(PARAMS))
  carry = jax.tree.map(jnp.copy, expected)
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=".*donated buffers were not usable")
    for _ in range(3):
      consumed = jax.tree.leaves(carry)
      expected, carry = plain(*expected), donated(*carry)
      assert all(leaf.is_deleted() for leaf in consumed)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12),
               carry, expected)
