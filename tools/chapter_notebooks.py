#!/usr/bin/env python3
"""Run the chapters into Jupyter notebooks, outputs and all: `make notebooks`.

Each chapter, a jupytext MyST file, becomes build/notebooks/NN_name.ipynb.  jupytext
turns it into a notebook and nbconvert's ExecutePreprocessor runs every cell, top to
bottom, in the chapters' own Jupyter kernel `lguest` (installed by `make install`),
from notebooks/ as the book and Jupyter would.  A reader can open the result in any
notebook viewer and see what the machine said, without running anything.

A cell that fails is reported as notebook:line (the chapter's line, not the .ipynb's),
and its chapter gets no notebook.  tests/test_notebooks.py runs each chapter through
this same code, so a passing test suite means `make notebooks` works.

Usage: chapter_notebooks.py [NN ...]   (default: every chapter)
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient.exceptions import CellExecutionError
from nbconvert.preprocessors import ExecutePreprocessor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tangle  # noqa: E402  (the book's own reader: which files are chapters, where cells start)

NOTEBOOKS = ROOT / "notebooks"
OUT = ROOT / "build" / "notebooks"
KERNEL = "lguest"
TIMEOUT = 900  # seconds for one cell, as for the book (docs/conf.py)


class ChapterFailed(Exception):
    """A chapter could not run; the message starts with notebook:line."""


def cell_line(chapter: Path, index: int) -> int:
    """The chapter line where code cell `index` of its notebook starts.

    jupytext keeps no line numbers, but its code cells are the chapter's top-level
    ```{code-cell} blocks, in order; the code starts after their options.
    """
    nb_index = sum(1 for c in jupytext.read(chapter).cells[:index] if c.cell_type == "code")
    lines = chapter.read_text(encoding="utf-8").splitlines()
    starts = []
    for info, start, body in tangle.fenced_blocks(lines):
        if info.startswith("{code-cell}"):
            k = tangle.skip_options(body)
            while k < len(body) - 1 and not body[k].strip():
                k += 1
            starts.append(start + k + 1)
    return starts[nb_index] if nb_index < len(starts) else 0


class ChapterRunner(ExecutePreprocessor):
    """nbconvert's runner, telling which chapter line a failing cell came from."""

    def __init__(self, chapter: Path, **kw):
        super().__init__(**kw)
        self.chapter = chapter

    def preprocess_cell(self, cell, resources, index):
        try:
            return super().preprocess_cell(cell, resources, index)
        except CellExecutionError as e:
            where = f"{tangle.rel(self.chapter)}:{cell_line(self.chapter, index)}"
            raise ChapterFailed(f"{where}: code cell {index} failed:\n{e}") from None


def check_kernel() -> None:
    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        raise ChapterFailed(f"the chapters run in the Jupyter kernel '{KERNEL}', which is not "
                            "installed here; `make install` installs it") from None


def execute(chapter: Path) -> nbformat.NotebookNode:
    """The chapter as a notebook, every cell run in the lguest kernel."""
    nb = jupytext.read(chapter)
    ChapterRunner(chapter, kernel_name=KERNEL, timeout=TIMEOUT).preprocess(
        nb, {"metadata": {"path": str(NOTEBOOKS)}})
    nb.metadata.pop("jupytext", None)  # it described the .md; this is an .ipynb
    return nb


def write(chapter: Path, out: Path = OUT) -> Path:
    """Run a chapter and write out/NN_name.ipynb; a failure leaves no notebook there."""
    target = out / (chapter.stem + ".ipynb")
    try:
        nb = execute(chapter)
    except BaseException:
        target.unlink(missing_ok=True)  # an old notebook would pass for this chapter's
        raise
    out.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, target)
    return target


def main(argv: list[str]) -> int:
    chapters = tangle.chapters(NOTEBOOKS)
    chosen = [c for c in chapters if not argv or c.name[:2] in argv]
    if len(chosen) != len(argv or chapters):
        print("usage: chapter_notebooks.py [NN ...]   (NN: 01 to "
              f"{chapters[-1].name[:2]}; none for all)", file=sys.stderr)
        return 2
    try:
        check_kernel()
    except ChapterFailed as e:
        print(f"notebooks: {e}", file=sys.stderr)
        return 1
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("notebooks: /dev/kvm is not usable here, so chapters that run guests will fail",
              file=sys.stderr)
    failed = 0
    for chapter in chosen:
        start = time.monotonic()
        try:
            target = write(chapter)
        except ChapterFailed as e:
            print(f"notebooks: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"notebooks: {tangle.rel(target)} ({time.monotonic() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
