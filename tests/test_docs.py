"""The documentation site: every public name has an API page, and the site builds cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psgd_optax as psgd

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")


def _documented_names():
  with open(os.path.join(DOCS, "api.md")) as f:
    text = f.read()
  blocks = re.findall(r"\.\. autosummary::\n((?:   .*\n|\n)*)", text)
  return {line.strip() for block in blocks for line in block.splitlines()
          if line.strip() and not line.strip().startswith(":")}


def test_every_public_name_has_an_api_page():
  public = {name for name in psgd.__all__ if name != "optimizers"}
  public |= {f"optimizers.{name}" for name in psgd.optimizers.__all__}
  documented = _documented_names()
  assert not public - documented, f"missing from docs/api.md: {sorted(public - documented)}"
  assert not documented - public, f"not public: {sorted(documented - public)}"


def test_every_public_function_and_class_has_a_runnable_example():
  """Each API page shows an ``Example:`` (run by the doctests of the default test command);
  the constants (tuples of names) are shown by value."""
  lacking = []
  for name in sorted(psgd.__all__):
    target = getattr(psgd, name)
    if name == "optimizers" or isinstance(target, tuple):
      continue
    if ">>>" not in (target.__doc__ or ""):
      lacking.append(name)
  lacking += [f"optimizers.{name}" for name in psgd.optimizers.__all__
              if ">>>" not in (getattr(psgd.optimizers, name).__doc__ or "")]
  assert not lacking, f"no example in the docstring of {lacking}"


def test_the_docs_build_without_warnings(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", DOCS,
       str(tmp_path / "html"), "-d", str(tmp_path / "doctrees")],
      capture_output=True, text=True)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  page = (tmp_path / "html" / "api" / "psgd_optax.kron.html").read_text()
  assert "Kronecker" in page and "\\arg\\min_P" in page  # the docstring and its math


def test_the_version_is_written_in_one_place():
  """pyproject.toml reads ``psgd_optax.__version__``; CITATION.cff and the changelog's
  newest entry must say the same."""
  with open(os.path.join(DOCS, "..", "CITATION.cff")) as f:
    cited = re.search(r"^version: (\S+)$", f.read(), flags=re.M).group(1)
  with open(os.path.join(DOCS, "..", "CHANGELOG.md")) as f:
    newest = re.search(r"^## (\S+)", f.read(), flags=re.M).group(1)
  assert cited == newest == psgd.__version__
  with open(os.path.join(DOCS, "..", "pyproject.toml")) as f:
    assert 'version = { attr = "psgd_optax._src.version.__version__" }' in f.read()
