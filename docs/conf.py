"""Sphinx configuration of the nngeo_ops documentation site.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` after ``pip install -e ".[docs]"``.
Markdown pages are read by MyST; the notebooks of ``notebooks/`` (linked as ``docs/gallery``) are
executed at build time by myst-nb, so the rendered outputs are always those of the current code.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("MPLBACKEND", "Agg")

import nngeo_ops  # noqa: E402

project = "nngeo_ops"
author = "the nngeo_ops developers"
copyright = "2026, the nngeo_ops developers"  # noqa: A001
release = nngeo_ops.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**/.ipynb_checkpoints"]
root_doc = "index"

# The docstrings are written in the NumPy / Google styles that napoleon reads.
napoleon_google_docstring = True
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": True, "undoc-members": False}
# Type hints name torch / scipy classes that intersphinx cannot always resolve (aliases such as
# ``torch.Tensor`` documented under another path); a missing link is not an error in the text.
nitpicky = False
# Type hints such as `dtype` match attributes of several classes; an ambiguous link is not an error.
suppress_warnings = ["myst.header", "misc.highlighting_failure", "ref.python"]

_INVENTORIES = {
    "python": ("https://docs.python.org/3", None),
    "torch": ("https://docs.pytorch.org/docs/stable", None),
    "numpy": ("https://numpy.org/doc/stable", None),
    "scipy": ("https://docs.scipy.org/doc/scipy", None),
}


def _online(host: str = "docs.python.org") -> bool:
    """Whether the inventories can be fetched: CI and the developers' machines have no web access,
    where intersphinx would only warn (an error under ``-W``) and link nothing."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=2).close()
    except OSError:
        return False
    return True


intersphinx_mapping = _INVENTORIES if _online() else {}
intersphinx_timeout = 5

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

nb_execution_mode = os.environ.get("NNGEO_DOCS_EXECUTE", "force")
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_merge_streams = True

html_theme = "furo" if __import__("importlib.util").util.find_spec("furo") else "alabaster"
html_title = f"nngeo_ops {release}"
html_static_path: list[str] = []
