"""Test-session set-up: one JAX compilation cache shared by the session's processes.

Most of the suite's time is XLA compiling small training steps, and many tests compile
programs that another test (or another parametrization, xdist worker or subprocess) has
already compiled. JAX's persistent cache keys an executable by its program, options and
JAX/XLA versions, so a hit is the executable a fresh compile would have produced. The cache
lives in a temporary directory made for this session and removed after it, so no run reads
another run's entries; a ``JAX_COMPILATION_CACHE_DIR`` already set by the caller is used
as it is.
"""

import os
import shutil
import tempfile

_OWN_CACHE = "PSGD_OPTAX_TEST_OWNS_JAX_CACHE"


def pytest_configure(config):
  # Runs in the controller before xdist starts its workers (and before any test imports
  # JAX), so the workers and the tests' subprocesses inherit the variables.
  if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="psgd_optax_jax_cache_")
  # Only compiles slower than this are written; the cheap ones cost more to store than to redo.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  os.environ[_OWN_CACHE] = "1"


def pytest_unconfigure(config):
  if hasattr(config, "workerinput") or not os.environ.pop(_OWN_CACHE, None):
    return
  shutil.rmtree(os.environ.pop("JAX_COMPILATION_CACHE_DIR"), ignore_errors=True)
