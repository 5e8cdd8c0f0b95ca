"""Every Python block of the README runs, in order, in one namespace (as a reader pastes them)."""

from __future__ import annotations

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")


def python_blocks(path):
  with open(path) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_code_blocks_run_in_order():
  blocks = python_blocks(os.path.join(ROOT, "README.md"))
  assert len(blocks) >= 3
  namespace = {"__name__": "readme"}
  for index, block in enumerate(blocks):
    try:
      exec(compile(block, f"README.md block {index}", "exec"), namespace)
    except Exception as error:  # name the block that failed
      raise AssertionError(f"README.md python block {index} failed:\n{block}") from error
  # The blocks train: the quick start's step and the Newton step moved the params.
  assert float(abs(namespace["params"]["w"]).sum()) > 0
  assert bool(namespace["loss"] > 0)
