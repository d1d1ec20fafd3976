"""Show where each tangled cell lands, and say when the chapters could not run.

A code block whose first line is a tangle directive (`#| tangle: lguest/x.py`)
loses that line on the page and gains a caption naming the file instead, and the
class when the cell adds methods to one begun earlier: "tangles into
lguest/drivers/uart.py, in class Uart8250".  tangle.py decides both, as it does for
`make Drivers`.  Where the book was built without /dev/kvm, each chapter opens with
a note saying its outputs are missing, so a reader is never misled by an empty page.
"""
import re

from docutils import nodes

import tangle  # the project root is on sys.path (docs/conf.py)

CHAPTER = re.compile(r"^\d\d_")


def caption_tangled_cells(app, doctree):
    classes = {}  # file -> the last class begun in it, for tangle.class_joined
    for block in list(doctree.findall(nodes.literal_block)):
        text = block.astext()
        first, _, rest = text.partition("\n")
        dest = tangle.destination(first)
        if dest is None:
            continue
        joined = tangle.class_joined(dest, rest, classes)
        block.rawsource = rest
        block.children = [nodes.Text(rest)]
        caption = nodes.container(classes=["tangle-caption"])
        para = nodes.paragraph()
        para += nodes.Text("tangles into ")
        para += nodes.inline(text=dest, classes=["tangle-file"])
        if joined:
            para += nodes.Text(", in class ")
            para += nodes.inline(text=joined, classes=["tangle-class"])
        caption += para
        # Above the cell as a whole when the block is a notebook cell's input.
        anchor = block
        parent = block.parent
        if isinstance(parent, nodes.container) and "cell_input" in parent.get("classes", []):
            anchor = parent.parent if isinstance(parent.parent, nodes.container) else parent
        anchor.parent.insert(anchor.parent.index(anchor), caption)


def join_streams(app, doctree):
    """Join each run of outputs on one stream into one block, keeping the order in which a
    cell wrote to stdout and stderr (myst-nb's nb_merge_streams would put all of stdout
    first; the lguest kernel sends them in order, chapter I)."""
    for block in list(doctree.findall(nodes.literal_block)):
        kind = [c for c in block.get("classes", []) if c in ("stream", "stderr")]
        if not kind or "output" not in block["classes"] or block.parent is None:
            continue
        before = block.previous_sibling()
        if isinstance(before, nodes.literal_block) and kind[0] in before.get("classes", []) \
                and "output" in before["classes"]:
            text = before.astext().rstrip("\n") + "\n" + block.astext()
            before.rawsource = text
            before.children = [nodes.Text(text)]
            block.parent.remove(block)


def prepare_chapter(app, docname, source):
    if not CHAPTER.match(docname):
        return
    if app.config.tangle_kvm_usable:
        return
    text = source[0]
    note = ("\n```{warning}\nThis copy of the book was built on a machine without a "
            "usable `/dev/kvm`, so its chapters were not executed and the outputs of their "
            "code cells are missing. Build it where KVM works (`make docs`) to see them.\n```\n")
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("# "):
            lines.insert(i + 1, note)
            break
    source[0] = "\n".join(lines)


def setup(app):
    app.add_config_value("tangle_kvm_usable", True, "env")
    app.connect("source-read", prepare_chapter)
    app.connect("doctree-read", caption_tangled_cells)
    app.connect("doctree-read", join_streams)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
