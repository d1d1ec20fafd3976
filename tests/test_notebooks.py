"""Every chapter runs top to bottom in a real Jupyter kernel, as a reader would run it.

The chapters are jupytext MyST files; `make notebooks` (tools/chapter_notebooks.py)
turns each into a notebook and nbconvert runs every cell in the chapter's own kernel,
`lguest` (ipykernel plus chapter I's rule that a tangled cell's code is already in
the package), just as Jupyter's "Run All" would, and writes the .ipynb with its
outputs.  This test runs each chapter once through that same code, into a temporary
directory, so passing it means `make notebooks` works.  A failure names the chapter,
the cell and the notebook line where that cell starts.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import chapter_notebooks  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
CHAPTERS = chapter_notebooks.tangle.chapters(NOTEBOOKS)


def test_there_are_seven_chapters_each_asking_for_the_lguest_kernel():
    names = [c.stem.split("_", 1)[1] for c in CHAPTERS]
    assert names == ["preparation", "guest", "drivers", "launcher", "host", "switcher", "mastery"]
    for chapter in CHAPTERS:
        assert jupytext.read(chapter).metadata["kernelspec"]["name"] == "lguest", chapter.name


@pytest.mark.kvm
@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_runs_top_to_bottom(chapter, tmp_path):
    try:
        written = chapter_notebooks.write(chapter, tmp_path)
    except chapter_notebooks.ChapterFailed as e:
        pytest.fail(str(e), pytrace=False)
    assert written == tmp_path / f"{chapter.stem}.ipynb"
    nb = nbformat.read(written, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "lguest"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count for cell in code), "every cell ran"
    assert any(cell.outputs for cell in code), "and the notebook keeps what they printed"


OOPS = """\
---
kernelspec:
  display_name: Python 3 (lguest)
  language: python
  name: lguest
---

# Oops

```{code-cell} ipython3
x = 1
```

Prose, then a cell with options that fails on its second line.

```{code-cell} ipython3
:tags: [demo]

x = 2
raise RuntimeError('oops')
```
"""


def test_a_failing_cell_is_named_by_its_chapter_line(tmp_path):
    chapter = tmp_path / "08_oops.md"
    chapter.write_text(OOPS)
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / "08_oops.ipynb"
    stale.write_text("an old notebook")
    with pytest.raises(chapter_notebooks.ChapterFailed) as failed:
        chapter_notebooks.write(chapter, tmp_path / "out")
    line = OOPS.splitlines().index("x = 2") + 1    # where the failing cell's code starts
    assert str(failed.value).startswith(f"{chapter}:{line}: code cell 3 failed:")
    assert "RuntimeError: oops" in re.sub(r"\x1b\[[\d;]*m", "", str(failed.value))  # less colour
    assert not stale.exists()    # no notebook passes for a chapter that failed


ORDER = OOPS.split("# Oops")[0] + """\
# Order

```{code-cell} ipython3
import sys, time
print("one")
time.sleep(0.3)
print("two")
print("three, on stderr", file=sys.stderr)
print("four")
print("five, on stderr", file=sys.stderr)
```
"""


def test_the_kernel_keeps_stdout_and_stderr_in_the_order_they_were_written(tmp_path):
    chapter = tmp_path / "08_order.md"
    chapter.write_text(ORDER)
    nb = nbformat.read(chapter_notebooks.write(chapter, tmp_path), as_version=4)
    said = [(out["name"], line) for out in nb.cells[-1].outputs
            for line in out["text"].splitlines()]
    assert said == [("stdout", "one"), ("stdout", "two"), ("stderr", "three, on stderr"),
                    ("stdout", "four"), ("stderr", "five, on stderr")]
