"""Sphinx configuration for the lguest book (the weave).

Run from the project root: sphinx-build -c docs notebooks build/html
(`make docs`).  The chapters execute at build time where /dev/kvm is usable.
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

project = "lguest, retold"
author = "the lguest team"
copyright = "2026, the lguest team; after Rusty Russell's lguest (2007)"
extensions = ["myst_nb", "tanglecaption"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]
myst_enable_extensions = ["colon_fence"]
html_theme = "alabaster"
html_title = "lguest, retold"
html_static_path = ["_static"]
html_css_files = ["lguest.css"]
html_theme_options = {"page_width": "1100px", "sidebar_width": "230px",
                      "show_relbars": True}

# Execute every chapter on every build: the outputs in the book are the machine's.
KVM_USABLE = os.access("/dev/kvm", os.R_OK | os.W_OK)
nb_execution_mode = "force" if KVM_USABLE else "off"
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# Jupyter kernels run in notebooks/; the package comes from the environment.
nb_execution_in_temp = False
tangle_kvm_usable = KVM_USABLE
