"""Smoke tests of the examples at tiny settings, asserting their quality metric."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import rosenbrock  # noqa: E402


def test_rosenbrock_example_newton_psgd_reaches_1e_10_and_first_order_does_not():
  results = rosenbrock.compare(300, learning_rates=(1e-3, 3e-3), progress=False)
  newton = rosenbrock.iterations_to(results["psgd dense newton"])
  assert newton is not None and newton <= 300  # paper 000: about 200
  swept = [name for name in results if "(lr " in name]
  assert len(swept) == 5  # whitening PSGD and four first-order methods, best lr each
  assert all(rosenbrock.iterations_to(results[name]) is None for name in swept)
