"""Sphinx configuration: ``python -m sphinx -W -b html docs docs/_build/html``."""

from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.abspath(".."))

import psgd_optax  # noqa: E402

# The gallery shows the repository's notebooks; Sphinx reads only files under docs/, so the
# build copies them in (docs/notebooks is not kept in git).
_HERE = os.path.dirname(os.path.abspath(__file__))
shutil.copytree(os.path.join(_HERE, "..", "notebooks"), os.path.join(_HERE, "notebooks"),
                dirs_exist_ok=True)

project = "psgd_optax"
author = "psgd_optax developers"
copyright = "psgd_optax developers"  # noqa: A001 (Sphinx reads this name)
release = version = psgd_optax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx-mathjax-offline",  # MathJax served from the built site: math renders offline
    "myst_nb",
]

# The notebooks are shown with the outputs stored in them (tests/test_notebooks.py runs them).
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3  # BENCHMARKS.md links to its own sections, GitHub-style
# .rst first: autosummary writes its generated API stubs (docs/api, not kept in git) in RST.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

autosummary_generate = True
autodoc_default_options = {"members": False, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
highlight_language = "none"  # unlabeled blocks (tables a script printed) stay plain text
html_theme = "furo"
html_title = f"psgd_optax {release}"
