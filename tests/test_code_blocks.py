"""Every Python block of the README and of the docs pages runs, in order, in one namespace per
file, as a reader pastes them. A docs page runs in a fresh process with 8 CPU devices, so the
sharding recipe runs as printed."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
DOC_PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))

# Runs the blocks of the file argv[1] in order; names the block that fails.
RUNNER = r'''
import os, re, sys
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                            "--xla_force_host_platform_device_count=8"]))
path = sys.argv[1]
blocks = re.findall(r"```python\n(.*?)```", open(path).read(), flags=re.S)
namespace = {"__name__": "docs"}
for index, block in enumerate(blocks):
  try:
    exec(compile(block, f"{os.path.basename(path)} block {index}", "exec"), namespace)
  except Exception:
    print(f"block {index} failed:\n{block}")
    raise
'''


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


@pytest.mark.parametrize("page", [p for p in DOC_PAGES if python_blocks(p)],
                         ids=os.path.basename)
def test_docs_code_blocks_run_in_order(page):
  done = subprocess.run([sys.executable, "-c", RUNNER, page], capture_output=True, text=True,
                        cwd=ROOT, timeout=600)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
