"""The weave: Sphinx builds the book warning-free, and a real browser can read it.

The book is built with the chapters executed (where /dev/kvm is usable), then
opened in headless Chromium, which renders each page, dumps the resulting DOM and
takes a screenshot.  The checks read the rendered text, as a reader would.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


class Text(HTMLParser):
    """The visible text of a page: everything outside <script> and <style>."""

    def __init__(self):
        super().__init__()
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def sphinx(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-c", "docs", *extra, "notebooks", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800)


def chromium(page: Path, shot: Path, profile: Path) -> str:
    """Render a page in headless Chromium: its visible text, and a screenshot."""
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,1400", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    parser = Text()
    parser.feed(dom.stdout)
    return re.sub(r"\s+", " ", "".join(parser.parts))


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    result = sphinx(out)
    assert result.returncode == 0, f"sphinx-build -W failed:\n{result.stdout}\n{result.stderr}"
    return out


@pytest.mark.kvm
def test_the_book_builds_and_reads_in_a_browser(book, tmp_path):
    assert CHROMIUM, "Debian's chromium is needed for this test: apt-get install chromium"
    index = chromium(book / "index.html", tmp_path / "index.png", tmp_path / "profile")
    assert "lguest, retold" in index
    for title in ("Preparation", "Guest", "Drivers", "Launcher", "Host", "Switcher", "Mastery"):
        assert title in index, title
    # A screenshot of a real page is not a blank one: a white PNG is a few hundred bytes.
    assert (tmp_path / "index.png").stat().st_size > 20_000

    switcher = chromium(book / "06_switcher.html", tmp_path / "switcher.png", tmp_path / "profile")
    assert "VI. Switcher" in switcher
    assert "tangles into lguest/switcher.py" in switcher      # the file caption
    assert "#| tangle" not in switcher                        # replaced by the caption
    assert "KVM_EXIT_IO" in switcher and "KVM_EXIT_HLT" in switcher  # real executed output
    assert (tmp_path / "switcher.png").stat().st_size > 20_000


def test_without_kvm_the_book_still_builds_and_says_so(tmp_path):
    result = sphinx(tmp_path / "html", "-D", "tangle_kvm_usable=0", "-D", "nb_execution_mode=off")
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "html" / "06_switcher.html").read_text()
    assert "built on a machine without a usable" in page
    index = (tmp_path / "html" / "index.html").read_text()
    assert "without a usable" not in index    # only chapters carry the note
