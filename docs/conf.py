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

import importlib  # noqa: E402

import apigen  # noqa: E402
import gallery_support  # noqa: E402

apigen.write(HERE / "api")
HOMES = apigen.homes(apigen.all_packages())

project = "deep-curvature"
author = "the deep-curvature developers"
copyright = "the deep-curvature developers, BSD-3-Clause"
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
    "filename_pattern": gallery_support.FILENAME_PATTERN,
    "ignore_pattern": gallery_support.IGNORE_PATTERN,
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


def resolve_alias(app, env, node, contnode):  # type: ignore[no-untyped-def]
    """Resolve ``nets.KFAC`` to the page of ``nets.optim.KFAC`` (one page per object)."""
    if node.get("refdomain") != "py":
        return None
    module_name, _, name = str(node.get("reftarget", "")).rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None
    home = HOMES.get(id(obj))
    if home is None or home == module_name:
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], f"{home}.{name}", node, contnode
    )


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("missing-reference", resolve_alias)
