"""jit + NamedSharding on an 8-device explicit mesh: stable state layouts, same training.

The mesh needs 8 (fake CPU) devices, which JAX fixes when its backend starts, so the checks
run in a fresh interpreter. Params are sharded ``P(None, "x")`` (and the bias ``P("x")``);
for every case the state's shardings must be the same after ``init``, after jitted
updates and from ``init`` on ``ShapeDtypeStruct``s, params-shaped state must carry the
params' sharding, and 20 training steps must match the same run on one device. The
sharded-state case trains as a loop that donates its params and state, and every donated
buffer must be reused.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

import psgd_optax as psgd

CHECK = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import psgd_optax as psgd
    import warnings

    # A donated step must reuse every buffer it is given (state and params keep their layout).
    warnings.filterwarnings("error", message=".*donated buffers were not usable")
    steps = 20
    key = jax.random.key(0)
    inputs = jax.random.normal(key, (steps, 32, 16))
    targets = jnp.sin(inputs[..., :8] * 2.0)
    params = {"w": 0.3 * jax.random.normal(jax.random.fold_in(key, 1), (16, 32)),
              "b": jnp.zeros(32),
              "out": 0.3 * jax.random.normal(jax.random.fold_in(key, 2), (32, 8)),
              "blocks": 0.3 * jax.random.normal(jax.random.fold_in(key, 3), (8, 8, 8))}
    specs = {"w": P(None, "x"), "b": P("x"), "out": P("x", None), "blocks": P(None, None, "x")}

    def mm(a, b):
      # On the mesh, products that contract a sharded axis must name their output layout.
      on_mesh = not jax.sharding.get_abstract_mesh().empty
      return jnp.matmul(a, b, out_sharding=P() if on_mesh else None)

    def loss(params, x, y):
      hidden = jnp.tanh(x @ params["w"] + params["b"])
      block = lambda out, weight: (out + jnp.tanh(mm(out, weight)), None)
      out, _ = jax.lax.scan(block, mm(hidden, params["out"]), params["blocks"])
      return jnp.mean((out - y) ** 2)

    stacked = {"w": False, "b": False, "out": False, "blocks": True}
    # A small fit step: the mesh runs reduce in another float32 order than one device, and
    # the default precond_lr (0.5) grows that rounding past the comparison's 1e-6 over 20
    # steps; at 0.1 it stays at rounding level, so the check stays tight.
    fit = dict(precond_lr=0.1)
    cases = {
        "kron": lambda: optax.chain(psgd.kron(stacked=stacked, **fit), optax.scale(-0.05)),
        "kron_newton": lambda: optax.chain(
            psgd.kron(curvature="newton", update_probability=0.5, **fit), optax.scale(-0.2)),
        "ready_secant": lambda: psgd.optimizers.kron(
            learning_rate=0.02, curvature="secant", weight_decay=1e-3, **fit),
        "sharded": lambda: optax.chain(
            psgd.kron(stacked=stacked, preconditioner_sharding=P("x"), max_skew=4.0, **fit),
            optax.scale(-0.05)),
        "lra_diag": lambda: optax.chain(psgd.lra(rank=2, **fit), optax.scale(-0.05)),
        "fop_snr": lambda: optax.chain(psgd.snr(), psgd.fop(0.05), optax.scale(-0.05)),
    }

    def layout(tree):  # shapes, dtypes and shardings, which outlive a donated state
      return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          tree)

    def train(params, tx, needs_value_fn, donate):
      def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        extra = {"value_fn": lambda p: loss(p, x, y)} if needs_value_fn else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state
      step = jax.jit(step, donate_argnums=(0, 1) if donate else ())
      params = jax.tree.map(jnp.copy, params)  # the caller's stay valid when donating
      state = jax.jit(tx.init)(params)
      layouts = [layout(state)]
      for t in range(steps):
        params, state = step(params, state, inputs[t], targets[t])
        if t in (0, steps - 1):
          layouts.append(layout(state))
      return params, state, layouts

    def check(case):
      tx = cases[case]()
      needs_value_fn = case == "kron_newton"
      donate = case == "sharded"  # as a training loop runs it
      plain_params, plain_state, _ = train(params, tx, needs_value_fn, donate)

      mesh = jax.make_mesh((8,), ("x",))  # axis types: Explicit (the default)
      with jax.set_mesh(mesh):
        sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                               params, specs)
        abstract_state = jax.eval_shape(tx.init, layout(sharded))
        mesh_params, mesh_state, layouts = train(sharded, tx, needs_value_fn, donate)

      def spec(sharding):
        # Layouts compared as partition specs (trailing Nones dropped); ShapeDtypeStructs
        # of constants carry no sharding, i.e. replicated.
        entries = list(sharding.spec) if sharding is not None else []
        while entries and entries[-1] is None:
          entries.pop()
        return tuple(entries)

      def specs_of(tree):
        return [spec(leaf.sharding) for leaf in jax.tree.leaves(tree)]

      first = specs_of(layouts[0])
      same = lambda other: first == specs_of(other)
      stable = all(same(state) for state in layouts[1:]) and same(abstract_state)
      psgd_states = [node for node in jax.tree.leaves(
          mesh_state, is_leaf=lambda node: hasattr(node, "preconditioner"))
                     if hasattr(node, "preconditioner")]
      factors = jax.tree.leaves([s.preconditioner for s in psgd_states])
      # Params-shaped state leaves (momentum, secant memory, ...) carry the params' sharding.
      param_shardings = {tuple(a.shape): a.sharding for a in jax.tree.leaves(sharded)}
      params_shaped = [(leaf, param_shardings[tuple(leaf.shape)])
                       for leaf in jax.tree.leaves(mesh_state)
                       if tuple(leaf.shape) in param_shardings and leaf.ndim > 0
                       and not any(leaf is factor for factor in factors)]
      follows_params = all(spec(leaf.sharding) == spec(target) for leaf, target in params_shaped)
      param_layout = specs_of(mesh_params) == specs_of(sharded)
      p_error = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))
                                 - 1e-5 * np.abs(np.asarray(b))))
                    for a, b in zip(jax.tree.leaves(mesh_params), jax.tree.leaves(plain_params)))
      q_error = max(float(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float))))
                    for a, b in zip(jax.tree.leaves(mesh_state), jax.tree.leaves(plain_state)))
      moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                  for a, b in zip(jax.tree.leaves(plain_params), jax.tree.leaves(params)))
      # Every stored array leads with its stack's member axis: the layers of the stacked
      # blocks (8 members), or one member for the other leaves, whose rows are 8 or more.
      sharded_factors = sorted({str(spec(leaf.sharding)) for leaf in factors
                                if leaf.ndim >= 2 and (leaf.shape[0] % 8 == 0
                                                       or leaf.shape[1] % 8 == 0)})
      return {"stable": stable, "follows_params": follows_params,
              "params_shaped": len(params_shaped), "param_layout": param_layout,
              "p_error": p_error, "q_error": q_error, "moved": moved,
              "factor_specs": sharded_factors}

    print(json.dumps({case: check(case) for case in sys.argv[1:]}))
""")


def _run_checks(*cases):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", CHECK, *cases], env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_layouts_and_training(case, result):
  assert result["stable"], (case, result)  # init == jitted update == abstract init
  assert result["param_layout"], (case, result)  # updated params keep their sharding
  assert result["follows_params"], (case, result)
  assert result["moved"] > 1e-2, (case, result)  # the runs did train
  assert result["p_error"] < 1e-6, (case, result)  # rtol 1e-5, atol 1e-6
  if case == "sharded":
    # The stack of the 8 layers' factors is split over "x" along its member axis; a stack of
    # one member (the 16×16 and 32×32 factors, the 32-entry diagonal) along its rows.
    assert result["factor_specs"] == ["('x',)", "(None, 'x')"], (case, result)
  else:
    assert result["factor_specs"] == ["()"], (case, result)  # replicated by default


@pytest.mark.parametrize("case", ["kron_newton", "sharded",
                                  pytest.param("ready_secant", marks=pytest.mark.slow)])
def test_state_layout_is_stable_and_training_matches_one_device(case):
  """One interpreter per case, so that pytest-xdist spreads the cases over its workers."""
  result = _run_checks(case)[case]
  _assert_layouts_and_training(case, result)
  if case == "ready_secant":
    assert result["params_shaped"] >= 8, result  # momentum, secant memory


@pytest.mark.slow
def test_more_state_layouts_are_stable_and_training_matches_one_device():
  results = _run_checks("kron", "lra_diag", "fop_snr")
  for case, result in results.items():
    _assert_layouts_and_training(case, result)
  assert results["fop_snr"]["params_shaped"] >= 12, results  # SNR moments, FOP's previous g


def test_preconditioner_sharding_is_checked():
  with pytest.raises(ValueError, match="preconditioner_sharding"):
    psgd.kron(preconditioner_sharding="x")
  psgd.kron(preconditioner_sharding=P("x"))
  psgd.kron(preconditioner_sharding=lambda shape: P("x") if shape[0] >= 1024 else None)
