"""Data parallelism with ``axis_name``: Q identical on every replica, training equal to one device.

JAX fixes the number of CPU devices when its backend starts, so the check runs in a fresh
interpreter with 4 fake CPU devices.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import psgd_optax as psgd

CHECK = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import jax.numpy as jnp, numpy as np, optax
    from jax.sharding import PartitionSpec as P
    import psgd_optax as psgd

    curvature, mapper = sys.argv[1], sys.argv[2]
    devices, per_device, steps = 4, 8, 50
    key = jax.random.key(0)
    inputs = jax.random.normal(key, (steps, devices * per_device, 6))
    targets = jnp.sin(inputs @ jnp.linspace(-1.0, 1.0, 6 * 3).reshape(6, 3))
    params = {"w": 0.1 * jnp.ones((6, 3)), "b": jnp.zeros(3)}

    def loss(params, x, y):
      return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)

    def make(axis_name):
      # precond_lr 0.1: the replicas average their gradients in another float32 order than
      # the single device's batch mean; a small fit step keeps that rounding at its own
      # size over 50 steps (the default 0.5 grows it to ~1e-4 of Q), so the comparison
      # below can stay tight.
      return optax.chain(psgd.kron(curvature=curvature, update_probability=0.5,
                                   precond_lr=0.1, axis_name=axis_name), optax.scale(-0.05))

    def train_step(tx, params, state, x, y, axis_name):
      grads = jax.grad(loss)(params, x, y)
      if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)  # the caller averages the step
      updates, state = tx.update(grads, state, params, value_fn=lambda p: loss(p, x, y))
      return optax.apply_updates(params, updates), state

    # One device, the whole batch.
    single = make(None)
    p1, s1 = params, single.init(params)
    step1 = jax.jit(lambda p, s, x, y: train_step(single, p, s, x, y, None))
    for t in range(steps):
      p1, s1 = step1(p1, s1, inputs[t], targets[t])

    # Four replicas, each with its own quarter of the batch.
    multi = make("data")
    replicate = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * devices), tree)
    split = lambda a: a.reshape(devices, per_device, *a.shape[1:])
    step = lambda p, s, x, y: train_step(multi, p, s, x, y, "data")
    if mapper == "pmap":
      stepn = jax.pmap(step, axis_name="data")
      pn, sn = replicate(params), replicate(multi.init(params))
      for t in range(steps):
        pn, sn = stepn(pn, sn, split(inputs[t]), split(targets[t]))
    else:
      mesh = jax.make_mesh((devices,), ("data",))
      per_replica = lambda p, s, x, y: jax.tree.map(
          lambda a: a[None], step(jax.tree.map(lambda a: a[0], p),
                                  jax.tree.map(lambda a: a[0], s), x[0], y[0]))
      stepn = jax.jit(jax.shard_map(per_replica, mesh=mesh, in_specs=P("data"),
                                    out_specs=P("data")))
      shard = lambda tree: jax.device_put(tree, jax.NamedSharding(mesh, P("data")))
      pn, sn = shard(replicate(params)), shard(replicate(multi.init(params)))
      for t in range(steps):
        pn, sn = stepn(pn, sn, shard(split(inputs[t])), shard(split(targets[t])))

    q = [np.asarray(leaf) for leaf in jax.tree.leaves(sn[0].preconditioner)]
    identical = all(bool((leaf == leaf[0]).all()) for leaf in q)
    q_single = [np.asarray(leaf) for leaf in jax.tree.leaves(s1[0].preconditioner)]
    q_error = max(float(np.max(np.abs(a[0] - b)) / (np.max(np.abs(b)) + 1e-30))
                  for a, b in zip(q, q_single))
    # assert_allclose's measure: how far |a − b| exceeds rtol·|b| (rtol 1e-5).
    p_error = max(float(np.max(np.abs(np.asarray(a)[i] - np.asarray(b))
                               - 1e-5 * np.abs(np.asarray(b))))
                  for a, b in zip(jax.tree.leaves(pn), jax.tree.leaves(p1))
                  for i in range(devices))
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
    print(json.dumps({"identical": identical, "q_error": q_error, "p_error": p_error,
                      "moved": moved}))
""")


def _run_check(curvature, mapper):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", CHECK, curvature, mapper], env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("curvature,mapper", [("newton", "shard_map"), ("whitening", "pmap")])
def test_replicas_keep_identical_q_and_match_single_device_training(curvature, mapper):
  """4 replicas with different data: after 50 steps Q is bit-identical on all of them, and
  params match one device trained on the concatenated batch (Newton: each replica's HVP of
  its own quarter is averaged by the engine)."""
  result = _run_check(curvature, mapper)
  assert result["identical"], result
  assert result["moved"] > 1e-2, result  # the runs did train
  assert result["q_error"] < 1e-4, result
  assert result["p_error"] < 1e-6, result  # rtol 1e-5, atol 1e-6


def test_axis_name_must_name_an_axis():
  with pytest.raises(ValueError, match="axis_name"):
    psgd.kron(axis_name=3)
  with pytest.raises(ValueError, match="axis_name"):
    psgd.kron(axis_name=("x", ""))
