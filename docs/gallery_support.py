"""What sphinx-gallery needs to run ``examples/`` as the scripts they are (used by ``conf.py``).

Each example is a plain command-line script (the test suite runs it with ``--quick``).
In the build it runs with the arguments of :data:`ARGUMENTS` and writes its files
into ``_build/gallery-output/<example>``; :func:`png_scraper` then shows every PNG
the script wrote during a code cell under that cell, so the figures in the docs are
the files the script itself makes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "_build" / "gallery-output"

# Command-line arguments of each example in the build; ``{out}`` is its output folder.
# An example not listed runs with ``--quick --out {out}`` (the settings of the tests).
ARGUMENTS: dict[str, list[str]] = {
    "theorems_on_random_matrices.py": ["{out}/theorems_on_random_matrices.png"],
}
DEFAULT_ARGUMENTS = ["--quick", "--out", "{out}"]

# Examples shown but not executed in the build (they need a launcher); every other
# ``examples/*.py`` is executed. Both patterns are matched against the full path.
NOT_EXECUTED = ("distributed_spectrum.py",)
FILENAME_PATTERN = r"/(?!" + "|".join(n.replace(".", r"\.") for n in NOT_EXECUTED) + r")[^/]+\.py$"
IGNORE_PATTERN = r"__init__\.py"


def output_folder(src_file: str) -> Path:
    """The folder an example writes into during the build."""
    return OUTPUT / Path(src_file).stem


def reset_argv(gallery_conf: dict[str, Any], script_vars: dict[str, Any]) -> list[str]:
    """``sys.argv[1:]`` for an example (sphinx-gallery's ``reset_argv``)."""
    src_file = script_vars["src_file"]
    out = output_folder(src_file)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    _seen.pop(src_file, None)
    arguments = ARGUMENTS.get(Path(src_file).name, DEFAULT_ARGUMENTS)
    return [a.format(out=out) for a in arguments]


_seen: dict[str, dict[Path, float]] = {}


def png_scraper(block: Any, block_vars: dict[str, Any], gallery_conf: dict[str, Any]) -> str:
    """Show the PNG files an example wrote (or rewrote) during the last code cell."""
    from sphinx_gallery.scrapers import figure_rst

    src_file = block_vars["src_file"]
    seen = _seen.setdefault(src_file, {})
    out = output_folder(src_file)
    fresh = []
    for path in sorted(out.rglob("*.png")) if out.exists() else []:
        stamp = os.stat(path).st_mtime_ns
        if seen.get(path) != stamp:
            seen[path] = stamp
            fresh.append(path)
    images = []
    for path in fresh:
        target = next(block_vars["image_path_iterator"])
        shutil.copyfile(path, target)
        images.append(target)
    return figure_rst(images, gallery_conf["src_dir"])
