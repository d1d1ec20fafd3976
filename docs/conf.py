"""Sphinx configuration for the lguest book (the weave).

Run from the project root: sphinx-build -c docs notebooks build/html
(`make docs`).  The chapters execute at build time where /dev/kvm is usable.
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))  # tangle.py, whose rules the captions share

project = "lguest, retold"
author = "the lguest team"
copyright = "2026, the lguest team; after Rusty Russell's lguest (2007)"
extensions = ["myst_nb", "tanglecaption"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]
myst_enable_extensions = ["colon_fence"]
# Anchors for headings, so the glossary can link to the section that explains a word.
myst_heading_anchors = 3
# Jupyter Book's theme, made for executable books.  The chapter's own contents go in
# the left sidebar under the chapter list, not in a right-hand one, so the article is
# wide enough for 100-column code cells at 1280 pixels (docs/_static/lguest.css).
html_theme = "sphinx_book_theme"
html_title = "lguest, retold"
html_static_path = ["_static"]
html_css_files = ["lguest.css"]
html_theme_options = {"secondary_sidebar_items": [], "navbar_persistent": []}
html_sidebars = {"**": ["navbar-logo.html", "search-button-field.html",
                        "sbt-sidebar-nav.html", "page-toc.html"]}

# Execute every chapter on every build: the outputs in the book are the machine's.
KVM_USABLE = os.access("/dev/kvm", os.R_OK | os.W_OK)
nb_execution_mode = "force" if KVM_USABLE else "off"
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
# Outputs in the order the cell wrote them: runs on one stream are joined by
# docs/_ext/tanglecaption.py, not by myst-nb's merge, which puts all of stdout first.
nb_merge_streams = False
# Jupyter kernels run in notebooks/; the package comes from the environment.
nb_execution_in_temp = False
tangle_kvm_usable = KVM_USABLE
