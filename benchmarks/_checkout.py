"""Import another checkout's ``psgd_optax`` beside this one, in the same process.

Before/after numbers are only comparable when both are measured in one run on the same
machine, interleaved, so that both see the same load and the same allocator state. Two
versions of one package cannot share a name in ``sys.modules``: the other checkout is
imported first, its modules are renamed ``psgd_optax_baseline…`` (their code keeps the
module objects it bound at import), and then this checkout's ``psgd_optax`` imports as
usual. Pure Python, so nothing else is needed.

    baseline = load_baseline("/path/to/old/checkout")   # before `import psgd_optax`
    import psgd_optax as psgd
"""

from __future__ import annotations

import importlib
import os
import sys


def load_baseline(checkout: str, name: str = "psgd_optax"):
  """``checkout``'s ``name`` package, imported under ``name + "_baseline"``."""
  if name in sys.modules:
    raise RuntimeError(f"load the baseline before importing {name} itself")
  root = os.path.abspath(checkout)
  if not os.path.isdir(os.path.join(root, name)):
    raise ValueError(f"{root} holds no {name} package")
  sys.path.insert(0, root)
  try:
    module = importlib.import_module(name)
  finally:
    sys.path.remove(root)
  for key in [key for key in sys.modules if key == name or key.startswith(name + ".")]:
    sys.modules[key.replace(name, name + "_baseline", 1)] = sys.modules.pop(key)
  if not module.__file__.startswith(root):
    raise RuntimeError(f"imported {module.__file__}, not the baseline in {root}")
  return module
