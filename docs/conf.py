"""Sphinx configuration: ``python -m sphinx -W --keep-going docs docs/_build/html`` (the ``docs`` extra).

Before reading the pages, the build writes ``docs/_generated/`` (ignored by git): the API lists from each
module's ``__all__``, the commands' option tables from their parsers, and the probes' figures from a real quick
start run (``docs/make_figures.py``, about a minute on 2 CPU cores, done once and reused while its files exist).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import generate  # noqa: E402  (docs/generate.py: the generated parts of the pages)

project = "lightning-probes"
author = "lightning-probes contributors"
copyright = "lightning-probes contributors"  # noqa: A001
release = generate.version()

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "_generated/**/*.md"]
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]
smartquotes = False  # `--option` stays two hyphens

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}
autosummary_generate = False  # the API pages list and document the names themselves (docs/generate.py)
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = "lightning-probes"
html_static_path: list[str] = []

generate.all_generated(HERE)
