"""Every chapter runs top to bottom in a real Jupyter kernel, as a reader would run it.

The chapters are jupytext MyST files; jupytext turns each into a notebook and
nbclient executes every cell in the chapter's own kernel, `lguest` (ipykernel plus
chapter I's rule that a tangled cell's code is already in the package), just as
Jupyter's "Run All" would.  A failure names the chapter, the
cell and the notebook line where that cell starts.
"""
from __future__ import annotations

from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CHAPTERS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.md"))


def cell_line(chapter: Path, source: str) -> int:
    """The notebook line of a cell's first line (jupytext keeps no line numbers)."""
    first = source.splitlines()[0] if source.strip() else ""
    lines = chapter.read_text().splitlines()
    for n, line in enumerate(lines, start=1):
        if line == first and n > 1 and lines[n - 2].startswith("```{code-cell}"):
            return n
    return 0


def test_there_are_seven_chapters_each_asking_for_the_lguest_kernel():
    names = [c.stem.split("_", 1)[1] for c in CHAPTERS]
    assert names == ["preparation", "guest", "drivers", "launcher", "host", "switcher", "mastery"]
    for chapter in CHAPTERS:
        assert jupytext.read(chapter).metadata["kernelspec"]["name"] == "lguest", chapter.name


@pytest.mark.kvm
@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_runs_top_to_bottom(chapter):
    nb = jupytext.read(chapter)
    client = NotebookClient(nb, timeout=900,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, index)
            except CellExecutionError as e:
                where = f"{chapter.relative_to(ROOT)}:{cell_line(chapter, cell.source)}"
                pytest.fail(f"{where}: code cell {index} failed:\n{e}", pytrace=False)
