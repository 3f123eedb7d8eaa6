"""Sphinx configuration of the softce_multi documentation (``nox -s docs``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import softce_multi

project = "softce_multi"
author = "the softce_multi authors"
project_copyright = "2026, the softce_multi authors"
release = softce_multi.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # Bundles MathJax into _static/mathjax and points mathjax_path there, so the formulas
    # render without a network connection.
    "sphinx-mathjax-offline",
    "sphinx_copybutton",
]

# Docstrings are numpydoc style; the JAX adapter's follow JAX's own (Google) style.
napoleon_numpy_docstring = True
napoleon_google_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
# The docstrings state types and shapes; the annotations (``Array = Any``) would add nothing.
autodoc_typehints = "none"

exclude_patterns = ["_build"]
# furo's code blocks scroll sideways, so a long line is never clipped.
html_theme = "furo"
html_title = f"softce_multi {release}"

# The copy button leaves out the prompts of doctest and shell blocks, and the output lines of
# a block that has prompts.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
