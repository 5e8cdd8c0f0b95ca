"""Group algebra: preconditioning equals the materialized product, Q stays in its group."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd_optax as psgd
from _helpers import single_leaf
from psgd_optax._src.groups.geometry import procrustes_step
from psgd_optax._src.normalize import spd_norm_lower_bound


def _random_factors(group, rng, triangular):
  factors = []
  for factor in group.factors:
    if factor.kind == "dense":
      m = rng.standard_normal((factor.size, factor.size)) + 3 * np.eye(factor.size)
      factors.append(jnp.asarray(np.triu(m) if triangular else m))
    else:
      factors.append(jnp.asarray(rng.uniform(0.5, 2.0, factor.size)))
  return psgd.KronState(tuple(factors), jnp.zeros(len(factors)))


@pytest.mark.parametrize("shape,kinds", [
    ((), ("diagonal",)),
    ((5,), ("dense",)),
    ((5,), ("diagonal",)),
    ((4, 5), ("dense", "diagonal")),
    ((4, 5), ("diagonal", "dense")),
    ((2, 3, 4), ("dense", "diagonal", "dense")),
    ((1, 6, 1), ("dense",)),
    # A dense factor applies QᵀQ formed once where n² < numel (3 here) and Q, Qᵀ otherwise (8).
    ((8, 3), ("dense", "dense")),
])
def test_kron_precondition_equals_materialized_kronecker_product(shape, kinds):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    group = psgd.kron_group(shape, kinds=kinds)
    q = _random_factors(group, rng, triangular=False)
    grad = jnp.asarray(rng.standard_normal(shape))
    blocks = [f.matrix(m).T @ f.matrix(m) for f, m in zip(group.factors, q.factors)]
    dense_p = np.asarray(blocks[0])
    for block in blocks[1:]:
      dense_p = np.kron(dense_p, np.asarray(block))
    expected = (dense_p @ np.asarray(grad).reshape(-1)).reshape(shape)
    np.testing.assert_allclose(group.precondition(q, grad), expected, rtol=1e-12, atol=1e-12)
    assert group.precondition(q, grad).shape == shape


def test_eq_transpose_solve_equals_dense_solve():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    group = psgd.kron_group((3, 4, 2), kinds=("dense", "diagonal", "dense"), geometry="eq")
    q = _random_factors(group, rng, triangular=True)
    v = jnp.asarray(rng.standard_normal((3, 4, 2)))
    solved = v
    for axis, (factor, m) in enumerate(zip(group.factors, q.factors)):
      solved = factor.solve_transpose(m, solved, axis)
    dense_q = np.asarray(group.factors[0].matrix(q.factors[0]))
    for factor, m in zip(group.factors[1:], q.factors[1:]):
      dense_q = np.kron(dense_q, np.asarray(factor.matrix(m)))
    expected = np.linalg.solve(dense_q.T, np.asarray(v).reshape(-1))
    np.testing.assert_allclose(np.asarray(solved).reshape(-1), expected, rtol=1e-10)


def _fit_many(geometry, steps=300, shape=(6, 5)):
  rng = np.random.default_rng(2)
  mixing = jnp.asarray(rng.standard_normal((math.prod(shape),) * 2), jnp.float32)
  tx = psgd.kron(update_probability=1.0, geometry=geometry)

  def body(i, state):
    grad = (mixing @ jax.random.normal(jax.random.key(i), (mixing.shape[0],))).reshape(shape)
    return tx.update(grad, state)[1]

  state = jax.jit(lambda s: jax.lax.fori_loop(0, steps, body, s))(tx.init(jnp.zeros(shape)))
  return single_leaf(state.preconditioner).factors


def test_eq_geometry_keeps_q_upper_triangular_with_positive_diagonal():
  for q in _fit_many("eq"):
    q = np.asarray(q)
    np.testing.assert_array_equal(np.tril(q, -1), 0.0)
    assert np.all(np.diag(q) > 0)


@pytest.mark.parametrize("geometry", ["q0.5eq1.5", "quad"])
def test_inverse_free_geometries_keep_q_symmetric_positive_definite(geometry):
  for q in _fit_many(geometry):
    q = np.asarray(q, np.float64)
    asymmetry = np.linalg.norm(q - q.T) / np.linalg.norm(q)
    assert asymmetry < 1e-3
    assert np.min(np.linalg.eigvalsh(0.5 * (q + q.T))) > 0


def test_diagonal_factors_stay_positive():
  tx = psgd.diag(update_probability=1.0)
  state = tx.init(jnp.zeros(50))
  rng = np.random.default_rng(3)
  for _ in range(200):
    grad = jnp.asarray(rng.standard_normal(50) * np.logspace(-4, 4, 50), jnp.float32)
    _, state = tx.update(grad, state)
  (d,) = single_leaf(state.preconditioner).factors
  assert np.all(np.asarray(d) > 0)


def test_procrustes_step_reduces_asymmetry_and_keeps_qtq():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    spd_root = np.linalg.cholesky(np.cov(rng.standard_normal((8, 40)))).T
    skew = 0.05 * rng.standard_normal((8, 8))
    skew = skew - skew.T
    rotation = np.linalg.solve(np.eye(8) - skew, np.eye(8) + skew)  # Cayley: a rotation near I
    q = jnp.asarray(rotation @ (spd_root.T @ spd_root))  # a rotated SPD matrix
    moved = procrustes_step(q)
    asym = lambda m: float(jnp.linalg.norm(m - m.T))
    assert asym(moved) < 0.9 * asym(q)
    assert float(jnp.trace(moved)) > float(jnp.trace(q))
    np.testing.assert_allclose(moved.T @ moved, q.T @ q, rtol=1e-3, atol=1e-3 * float(jnp.max(q.T @ q)))


def _procrustes_reference(q, max_step=0.125):
  """The rotation written out: R = (Qᵀ − Q)/‖Qᵀ − Q‖_F, a from the exact traces,
  Q + aRQ + a²R²Q/2."""
  generator = q.T - q
  generator = generator / np.linalg.norm(generator)
  rq = generator @ q
  rrq = generator @ rq
  slope, curvature = np.trace(rq), np.trace(rrq)
  angle = min(-slope / curvature, max_step) if curvature < 0 else max_step
  return q + angle * rq + 0.5 * angle ** 2 * rrq


@pytest.mark.parametrize("asymmetry", [1e-3, 0.3, 3.0])  # line-searched, clipped, non-SPD
def test_procrustes_step_matches_the_written_out_rotation(asymmetry):
  # The step never forms RQ or R²Q (it applies I + aR + a²R²/2 to Q and reads the traces
  # elementwise); in float64 it must agree with the direct formula to rounding.
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((12, 12))
    q = a @ a.T / 12 + np.eye(12) + asymmetry * rng.standard_normal((12, 12))
    for scale in (1e-12, 1.0, 1e12):
      moved = np.asarray(procrustes_step(jnp.asarray(scale * q)))
      np.testing.assert_allclose(moved, _procrustes_reference(scale * q), rtol=1e-11,
                                 atol=1e-11 * scale)


def test_procrustes_step_leaves_a_nearly_symmetric_q_finite_and_unrotated():
  # S = (Qᵀ − Q)/max|Q| is tiny here and its products underflow; the step must then not
  # rotate (the slope tr(RQ) is 0 in float32), nor turn 0/0 into NaN.
  q = np.diag(np.linspace(1.0, 2.0, 6)).astype(np.float32)
  q[0, 1] = 1e-30
  moved = procrustes_step(jnp.asarray(q))
  assert np.all(np.isfinite(np.asarray(moved)))
  np.testing.assert_allclose(np.asarray(moved), q, rtol=1e-6, atol=1e-30)
  np.testing.assert_array_equal(np.asarray(procrustes_step(jnp.eye(4))), np.eye(4))


def test_spd_norm_lower_bound_is_a_tight_lower_bound_of_second_moments():
  # The dense factors' step normalizer: T = Σ x xᵀ of any rank, at any scale.
  rng = np.random.default_rng(6)
  for n in (1, 3, 17, 64):
    for _ in range(5):
      a = rng.standard_normal((n, int(rng.integers(1, 3 * n + 1))))
      spd = a @ a.T * 10.0 ** rng.uniform(-15, 15)
      exact = np.linalg.norm(spd, 2)
      bound = float(spd_norm_lower_bound(jnp.asarray(spd, jnp.float32)))
      assert 0.6 * exact <= bound <= exact * (1 + 1e-5)
      assert bound >= np.max(np.diag(spd)) * (1 - 1e-5)
  x = rng.standard_normal(9)
  np.testing.assert_allclose(float(spd_norm_lower_bound(jnp.asarray(np.outer(x, x)))),
                             x @ x, rtol=1e-5)  # exact for rank one
  np.testing.assert_allclose(float(spd_norm_lower_bound(3.0 * jnp.eye(5))), 3.0, rtol=1e-6)
  assert float(spd_norm_lower_bound(jnp.zeros((4, 4)))) == 0.0


def test_factor_kinds_follow_size_skew_and_memory_mode():
  assert psgd.factor_kinds((512, 1024)) == ("dense", "dense")
  assert psgd.factor_kinds((512, 10)) == ("diagonal", "dense")
  assert psgd.factor_kinds((10000, 64)) == ("diagonal", "dense")
  assert psgd.factor_kinds((100, 100), max_size=50) == ("diagonal", "diagonal")
  assert psgd.factor_kinds((64, 128), max_skew=1.0) == ("dense", "diagonal")
  assert psgd.factor_kinds((64, 128), memory_save_mode="one_diag") == ("dense", "diagonal")
  assert psgd.factor_kinds((64, 128), memory_save_mode="all_diag") == ("diagonal", "diagonal")
  assert psgd.factor_kinds((1, 6, 1)) == ("diagonal",)  # 6² > 4·6
  assert psgd.factor_kinds((1, 6, 1), max_skew=6.0) == ("dense",)
  assert psgd.factor_kinds(()) == ("diagonal",)


def test_factor_balancing_keeps_p_and_equalizes_factor_scales():
  group = psgd.kron_group((3, 4))
  q = psgd.KronState((100.0 * jnp.eye(3), 0.01 * jnp.eye(4)), jnp.zeros(2))
  balanced = psgd.KronState(tuple(group._balance(list(q.factors))), q.lipschitz)
  np.testing.assert_allclose(group.materialize(balanced), group.materialize(q), rtol=1e-5)
  np.testing.assert_allclose(jnp.max(balanced.factors[0]), jnp.max(balanced.factors[1]), rtol=1e-5)
