"""Build glue: the package is generated, so tangle before setuptools looks for it.

`pip install .` and `pip install -e .` both run this file first.  It tangles the
notebooks into build/lguest, then hands setuptools a package that now exists and
the Switcher chapter's cffi build script, so the KVM module is compiled too.
"""
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
(HERE / "build" / "setuptools").mkdir(parents=True, exist_ok=True)
rc = subprocess.call([sys.executable, str(HERE / "tangle.py"), "--quiet"], cwd=HERE)
if rc != 0:
    sys.exit("lguest: tangling the notebooks failed (see the lines above)")

setup(
    package_dir={"": "build"},
    packages=find_packages("build", include=["lguest", "lguest.*"]),
    package_data={"lguest": ["tangle_map.json", "guest/init", "guest/provision/lean.config"]},
    cffi_modules=["build/lguest/switcher_build.py:ffibuilder"],
    # setuptools' own scratch space, kept apart from what tangle writes.
    options={"build": {"build_base": "build/setuptools"},
             "egg_info": {"egg_base": "build/setuptools"}},
)
