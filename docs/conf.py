"""Sphinx configuration of the deep-curvature documentation (``make docs``).

Built offline: no intersphinx inventories are fetched. ``DOCS_GALLERY=0`` skips
running the examples (the gallery pages then show the code only), which is handy
while editing the guide.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the checkout's packages win over an installed copy
sys.path.insert(0, str(HERE))
os.environ.setdefault("MPLBACKEND", "Agg")

import apigen  # noqa: E402

apigen.write(HERE / "api")

project = "deep-curvature"
author = "the deep-curvature developers"
copyright = "the deep-curvature developers, BSD-3-Clause"  # noqa: A001
release = version = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
    "sphinxarg.ext",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "auto_examples/*.ipynb"]
templates_path = ["_templates"]
root_doc = "index"

autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_default_options = {"exclude-members": "__init__, __new__"}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

html_theme = "pydata_sphinx_theme"
html_title = "deep-curvature"
html_static_path: list[str] = []
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "navbar_align": "left",
}
html_show_sourcelink = False

gallery = os.environ.get("DOCS_GALLERY", "1") != "0"
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    # every example is in the gallery; all but the torchrun one are executed
    "filename_pattern": r"/(?!distributed_spectrum)[^/]+\.py$",
    "ignore_pattern": r"__init__\.py",
    "plot_gallery": gallery,
    "reset_argv": "gallery_support.reset_argv",
    "image_scrapers": ("gallery_support.png_scraper",),
    "abort_on_example_error": True,
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "min_reported_time": 1,
    "show_signature": False,
    "write_computation_times": gallery,
}

suppress_warnings: list[str] = []
