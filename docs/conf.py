"""Sphinx configuration of the dualmode documentation site.

Build it with `python -m sphinx -W --keep-going -b html docs docs/_build/html` (what .ci/run does).
"""

import os
import sys

# Document the dualmode of this checkout, not an installed copy.
sys.path.insert(0, os.path.abspath(".."))

import dualmode

project = "dualmode"
release = dualmode.__version__
version = release
copyright = "the dualmode authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: $...$ and $$...$$ math, ::: fences for notes, anchors for headings down to ###.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# The docstrings are Google style ("Args:", "Returns:", "Raises:", "Example:") with `code` in single backticks.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
default_role = "literal"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_class_signature = "separated"

html_theme = "furo"
html_title = f"dualmode {release}"
