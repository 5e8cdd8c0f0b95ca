"""Smoke tests of the examples at tiny settings, each asserting the example's quality metric.

The default settings of each example (a few minutes each) are recorded in BENCHMARKS.md;
these runs take seconds and check that every example still runs and still shows its point."""

import os
import sys

import numpy as np
import optax
import pytest

import psgd_optax as psgd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import _rnn_tasks  # noqa: E402
import addition_rnn  # noqa: E402
import autoencoder  # noqa: E402
import delayed_xor  # noqa: E402
import digits  # noqa: E402
import flax_nnx_training  # noqa: E402
import gpt  # noqa: E402
import logistic_regression  # noqa: E402
import rosenbrock  # noqa: E402


def test_rosenbrock_example_newton_psgd_reaches_1e_10_and_first_order_does_not():
  results = rosenbrock.compare(300, learning_rates=(1e-3, 3e-3), progress=False)
  newton = rosenbrock.iterations_to(results["psgd dense newton"])
  assert newton is not None and newton <= 150  # paper 000: about 200; measured 99
  swept = [name for name in results if "(lr " in name]
  assert len(swept) == 5  # whitening PSGD and four first-order methods, best lr each
  assert all(rosenbrock.iterations_to(results[name]) is None for name in swept)


def test_digits_example_scan_cnn_reaches_95_percent_in_300_steps():
  # SCAN exercises affine_pairs on conv and dense kernel/bias pairs; Kron, five times slower
  # per step here, is checked on digits by test_flax_digits.py.
  results = digits.compare(300, 128, [0], ["scan"], progress=False)
  accuracy = results["psgd.scan"][0][1]
  assert accuracy > 0.95, accuracy


def _train_seed_0(task, methods, max_steps, chunk):
  """(steps to success, smoothed-loss curve, seconds) of the one method in ``methods``."""
  (name,) = methods
  return _rnn_tasks.compare(task, methods, (0,), max_steps, chunk, show_progress=False)[name]


def test_gpt_example_kron_at_its_default_rate_beats_byte_frequencies_within_60_steps():
  # A 2-layer, 64-wide byte GPT at context 32, batch 8. Untrained: ln 256 = 5.55 nats per
  # byte; the held-out text's byte frequencies alone (a unigram model) give 3.32. The ready
  # kron at its default rate must use the context within 60 steps: measured 2.92 (AdamW at
  # its 1e-3: 3.42).
  rows = gpt.main(["--steps", "60", "--batch", "8", "--layers", "2", "--width", "64",
                   "--heads", "2", "--context", "32", "--eval-every", "20",
                   "--optimizers", "kron", "--no-plot", "--no-progress"])
  final = rows["kron"][0]
  assert final < 3.2, final


def test_delayed_xor_example_lra_solves_length_8_within_2000_steps():
  lra = {name: value for name, value in delayed_xor.methods().items() if "lra" in name}
  solved_at, _, _ = _train_seed_0(_rnn_tasks.delayed_xor(8), lra, 2000, 500)
  assert solved_at[0] is not None  # measured: 1068 steps


@pytest.mark.slow  # the benchmarks' resumable runs; the library's resume: test_checkpoint.py
def test_rnn_trainer_resumed_from_a_checkpoint_is_the_uninterrupted_run(tmp_path):
  """The delayed-XOR benchmark's rows take core-hours and resume from per-chunk checkpoints;
  a run stopped after 100 steps and resumed to 150 must be bit-identical to one 150-step run
  (PSGD's fit coin and probes depend on the step count, so a wrong restored count or key would
  show)."""
  # Whitening diag (no HVP through the RNN's scan) keeps the compile short.
  tx, layout = optax.chain(psgd.diag(update_probability=0.5), optax.scale(-0.01)), None
  task, seeds, path = _rnn_tasks.delayed_xor(4), (0, 1), str(tmp_path / "run.npz")
  _, uninterrupted, _ = _rnn_tasks.train_seeds(tx, layout, task, seeds, 150, chunk=50)
  _rnn_tasks.train_seeds(tx, layout, task, seeds, 100, chunk=50, checkpoint=path)
  _, resumed, _ = _rnn_tasks.train_seeds(tx, layout, task, seeds, 150, chunk=50, checkpoint=path)
  assert resumed.shape == (3, 2)
  np.testing.assert_array_equal(resumed, uninterrupted)
  other_seeds = pytest.raises(ValueError, match="different setup")
  with other_seeds:
    _rnn_tasks.train_seeds(tx, layout, task, (0, 1, 2), 200, chunk=50, checkpoint=path)


def test_addition_example_kron_beats_a_blind_guess_by_half_within_3000_steps():
  name, tx, layout = addition_rnn.methods()["kron"]
  kron = {name: (tx, layout)}
  _, curve, _ = _train_seed_0(_rnn_tasks.addition(10, 1), kron, 3000, 1000)
  assert curve[-1, 0] < 0.5 / 24, curve[:, 0]  # a blind guess scores 1/24; measured 0.017


def test_logistic_regression_example_psgd_lra_ends_below_sgd_at_its_best_learning_rate():
  # SGD's best rate of the example's sweep; PSGD's P needs a few hundred updates to pay off
  # (measured at 500 steps, seed 0: PSGD 0.0081, SGD 0.0097; L-BFGS's minimum 0.0068).
  results = logistic_regression.compare(500, [0], sgd_lrs=(1.0,), names=["psgd", "sgd"],
                                        progress=False)
  final = {name: runs[0][0][-1] for name, runs in results.items()}
  errors = {name: runs[0][1] for name, runs in results.items()}
  assert final["psgd.lra(rank=10) newton"] < 0.9 * final["sgd lr=1"], final
  assert max(errors.values()) < 0.05, errors


def test_autoencoder_example_scan_reconstructs_digits():
  # SCAN (conv and transposed-conv pairs through affine_pairs) compiles and runs in a third
  # of Kron's time; measured test MSE after 150 steps 0.0082 (0.0041 after 300) against
  # 0.116 over the first 10 steps.
  results = autoencoder.compare(150, 128, [0], ["scan"], progress=False)
  losses, test_error, _ = results["psgd.scan"][0]
  assert test_error < 0.2 * float(np.mean(losses[:10])), (test_error, losses[:10])


def test_flax_nnx_training_example_newton_type_reaches_95_percent():
  # The whitening type through nnx.Optimizer is checked by test_flax_digits.py.
  _, accuracy = flax_nnx_training.train(True, 300, progress=False)
  assert accuracy > 0.95, accuracy


HELP_PROBE = r'''
import runpy, sys
sys.path.insert(0, sys.argv[1])
path = sys.argv[2]
sys.argv = [path, "--help"]
try:
  runpy.run_path(path, run_name="__main__")
except SystemExit:
  pass
print("JAX IMPORTED" if "jax" in sys.modules else "JAX NOT IMPORTED")
'''

EXAMPLES = ("addition_rnn", "autoencoder", "delayed_xor", "digits", "flax_nnx_training", "gpt",
            "logistic_regression", "rosenbrock")


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_help_answers_before_jax_loads_with_the_shared_flags(name):
  import subprocess
  directory = os.path.join(os.path.dirname(__file__), "..", "examples")
  done = subprocess.run([sys.executable, "-c", HELP_PROBE, directory,
                         os.path.join(directory, f"{name}.py")],
                        capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  for flag in ("--steps", "--seeds", "--optimizers", "--learning-rate", "--no-plot"):
    assert flag in done.stdout, (name, flag)
  assert "(default:" in done.stdout  # the help shows the defaults
  assert done.stdout.rstrip().endswith("JAX NOT IMPORTED"), done.stdout[-300:]
