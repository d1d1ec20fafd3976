"""The weave: Sphinx builds the book warning-free, and a real browser can read it.

The book is built with the chapters executed (where /dev/kvm is usable), then
opened in headless Chromium, which renders each page, dumps the resulting DOM and
takes a screenshot.  The checks read the rendered text, as a reader would, and
measure the rendered layout: 100-column code fits at 1280 pixels, and every
tangled cell's caption shows above it.  `make Drivers` and friends, the book as
terminal text, are checked here too.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html import unescape
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
    return visible_text(dom.stdout)


def visible_text(page: str) -> str:
    parser = Text()
    parser.feed(page)
    return re.sub(r"\s+", " ", "".join(parser.parts))


# Run in the page once it has loaded: which code blocks of at most 100 columns
# scroll sideways, and which tangle captions are missing or not above their cell.
MEASURE = """<script>
addEventListener("load", () => {
  const report = {blocks: 0, wide: [], captions: 0, misplaced: []};
  for (const pre of document.querySelectorAll("article pre")) {
    const lines = pre.textContent.replace(/\\n$/, "").split("\\n");
    const columns = Math.max(...lines.map(line => line.length));
    report.blocks += 1;
    if (columns <= 100 && pre.scrollWidth > pre.clientWidth)
      report.wide.push(`${columns} columns in ${pre.clientWidth}px: ${lines[0]}`);
  }
  for (const caption of document.querySelectorAll("article div.tangle-caption")) {
    const box = caption.getBoundingClientRect(), cell = caption.nextElementSibling;
    report.captions += 1;
    if (!box.height || !cell || cell.getBoundingClientRect().top < box.bottom)
      report.misplaced.push(caption.textContent.trim());
  }
  const out = document.createElement("pre");
  out.id = "layout-report";
  out.textContent = JSON.stringify(report);
  document.body.append(out);
});
</script>"""


def measure(page: Path, profile: Path) -> dict:
    """The layout of a page at 1280x1400 in Chromium, as MEASURE reports it."""
    probe = page.with_name("measure-" + page.name)  # beside it, so its links still work
    probe.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                          "--window-size=1280,1400", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    probe.unlink()
    m = re.search(r'<pre id="layout-report"[^>]*>(.*?)</pre>', dom.stdout, re.S)
    assert m, f"{page.name}: the measuring script did not run\n{dom.stderr[-2000:]}"
    return json.loads(unescape(m.group(1)))


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        from lguest.guest import lean_guest
        lean_guest()        # as `make docs` does first: the chapters boot it
    out = tmp_path_factory.mktemp("html")
    result = sphinx(out)
    assert result.returncode == 0, f"sphinx-build -W failed:\n{result.stdout}\n{result.stderr}"
    return out


@pytest.fixture(scope="module")
def book_without_kvm(tmp_path_factory):
    out = tmp_path_factory.mktemp("html-without-kvm")
    result = sphinx(out, "-D", "tangle_kvm_usable=0", "-D", "nb_execution_mode=off")
    assert result.returncode == 0, result.stdout + result.stderr
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


@pytest.mark.kvm
def test_every_page_fits_100_columns_at_1280_pixels_with_captions_above_cells(book, tmp_path):
    assert CHROMIUM, "Debian's chromium is needed for this test: apt-get install chromium"
    pages = sorted(book.glob("[0-9][0-9]_*.html"))
    assert len(pages) == 7
    for page in [book / "index.html", *pages]:
        report = measure(page, tmp_path / "profile")
        assert report["blocks"] > 0 or page.name == "index.html", page.name
        assert not report["wide"], f"{page.name}: code scrolls sideways: {report['wide']}"
        assert not report["misplaced"], f"{page.name}: captions not above their cells: " \
                                        f"{report['misplaced']}"
    assert measure(book / "06_switcher.html", tmp_path / "profile")["captions"] > 10


# What a chapter prints where a run should be but could not: a guest not built.
PLACEHOLDER = re.compile(r"not built yet|no lean guest built|is not built|make lean-guest`, then")


def outputs(page: Path) -> list[str]:
    """The HTML of each executed cell's output on a page: each <div class="cell_output">
    to its own closing tag (the divs nest)."""
    html, found = page.read_text(), []
    for start in re.finditer(r'<div class="cell_output\b', html):
        depth = 0
        for tag in re.finditer(r"<div\b|</div>", html[start.start():]):
            depth += 1 if tag.group(0) == "<div" else -1
            if depth == 0:
                found.append(html[start.start():start.start() + tag.end()])
                break
    return found


def placeholders(page: Path) -> list[str]:
    """The placeholders among a page's outputs (not its prose or code, which may name
    `make lean-guest` as the way to build the guest)."""
    return [m.group(0) for out in outputs(page) for m in PLACEHOLDER.finditer(visible_text(out))]


def pictures(page: Path) -> int:
    """How many pictures a page's outputs hold: images and inline SVG."""
    return sum(len(re.findall(r"<img |<svg", out)) for out in outputs(page))


@pytest.mark.kvm
def test_every_chapter_shows_its_runs_and_mastery_its_timeline(book):
    pages = sorted(book.glob("[0-9][0-9]_*.html"))
    assert len(pages) == 7
    found = {page.name: placeholders(page) for page in pages}
    assert not any(found.values()), f"placeholders where a run should be: {found}"
    assert pictures(book / "07_mastery.html") > 0, "chapter VII has no timeline picture"
    bare = [page.name for page in pages if not pictures(page)]
    assert not bare, f"chapters without a figure drawn while the book was built: {bare}"


def test_without_kvm_the_book_still_builds_and_says_so(book_without_kvm):
    page = (book_without_kvm / "06_switcher.html").read_text()
    assert "built on a machine without a usable" in page
    index = (book_without_kvm / "index.html").read_text()
    assert "without a usable" not in index    # only chapters carry the note


# The cell of chapter III that continues the UART's class begun two cells earlier.
UART_READ = "def read(self, offset: int, size: int = 1) -> int:"


def test_a_caption_names_the_class_a_cell_joins(book_without_kvm):
    text = visible_text((book_without_kvm / "03_drivers.html").read_text())
    assert f"tangles into lguest/drivers/uart.py, in class Uart8250 {UART_READ}" in text
    # The cell that begins the class names only its file.
    assert "tangles into lguest/drivers/uart.py class Uart8250:" in text


def test_make_drivers_names_the_class_a_cell_joins():
    result = subprocess.run([sys.executable, "tools/chapter_text.py", "03"], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    n = lines.index(f"        {UART_READ}")
    assert lines[n - 1] == "    [lguest/drivers/uart.py, in class Uart8250]"
    assert "    [lguest/drivers/uart.py]" in lines    # the cell that begins the class
    assert not any("#| tangle" in line for line in lines)


STREAMS = """\
---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3 (lguest)
  language: python
  name: lguest
---

# Streams

```{code-cell} ipython3
import sys, time
print("one")
time.sleep(0.3)
print("two")
print("three, on stderr", file=sys.stderr)
print("four")
```
"""


def test_a_page_shows_stdout_and_stderr_in_the_order_a_cell_wrote_them(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "index.md").write_text(STREAMS)
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", "-c", "docs",
         "-D", "nb_execution_mode=force", str(tmp_path / "src"), str(tmp_path / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "html" / "index.html").read_text()
    blocks = re.findall(r'<div class="output (stream|stderr)[^>]*>.*?<pre>(.*?)</pre>', page, re.S)
    said = [(kind, visible_text(text).strip()) for kind, text in blocks]
    # One block for each run on one stream: "one" and "two" together, though sent apart.
    assert said == [("stream", "one two"), ("stderr", "three, on stderr"), ("stream", "four")]
