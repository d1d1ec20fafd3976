#!/usr/bin/env python3
"""Print a chapter of the book as plain text, for `make Preparation!` and friends.

The original lguest's Makefile printed its quest's parts to the terminal; this does
the same for our chapters: prose and code, without the notebook front matter or the
MyST syntax.  Usage: chapter_text.py NN | all
"""
from __future__ import annotations

import re
import shutil
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
sys.path.insert(0, str(ROOT))
import tangle  # noqa: E402  (the book's own reader: fences, directives, captions)


def inline(text: str) -> str:
    """Markdown and MyST inline markup, reduced to what reads well as text."""
    text = re.sub(r"\{[\w:-]+\}`([^`]*)`", r"\1", text)        # {role}`x`
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"[\1]", text)      # images
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)         # links
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])", r"\1", text)
    return text


def table(rows: list[str], width: int) -> list[str]:
    """A Markdown table as aligned columns; the last column wraps."""
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows
             if not re.match(r"^\|[\s|:-]+\|$", r.strip())]
    n = max(len(r) for r in cells)
    cells = [r + [""] * (n - len(r)) for r in cells]
    widths = [max(len(r[k]) for r in cells) for k in range(n - 1)]
    lead = 2 + sum(w + 2 for w in widths)
    out = []
    if lead + 20 > width:
        # Too wide for columns: each row as its first cell, the rest indented below.
        for r in cells[1:]:
            out.append("  " + r[0])
            for c in r[1:]:
                out.extend(textwrap.wrap(c, width, initial_indent=" " * 6,
                                         subsequent_indent=" " * 6))
        return out
    for r in cells:
        last = textwrap.wrap(r[-1], max(width - lead, 20)) or [""]
        head = "  " + "".join(c.ljust(w + 2) for c, w in zip(r, widths))
        out.append(head + last[0])
        out.extend(" " * lead + more for more in last[1:])
    return out


def strip_front_matter(lines: list[str]) -> list[str]:
    if lines and lines[0].strip() == "---":
        for i in range(1, len(lines)):
            if lines[i].strip() == "---":
                return lines[i + 1:]
    return lines


def render(path: Path, width: int) -> str:
    lines = strip_front_matter(path.read_text().splitlines())
    out: list[str] = []
    para: list[str] = []
    classes: dict[str, str] = {}  # file -> the last class begun in it (tangle.class_joined)

    def flush():
        if para:
            text = inline(" ".join(s.strip() for s in para))
            out.extend(textwrap.wrap(text, width) or [""])
            out.append("")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        m = tangle.FENCE_OPEN.match(line)
        if m:
            flush()
            fence, info = m.group(1), m.group(2)
            close = re.compile("^" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}\s*$")
            j = i + 1
            while j < len(lines) and not close.match(lines[j]):
                j += 1
            body = lines[i + 1:j]
            i = j + 1
            kind = info.split(None, 1)[0] if info else ""
            if kind in ("{code-cell}", "{code-block}", "{code}"):
                while body and re.match(r"^:[\w-]+:", body[0]):
                    body = body[1:]
            elif kind.startswith("{") and kind.strip("{}") in (
                    "note", "warning", "tip", "important", "admonition", "hint"):
                out.append(kind.strip("{}").capitalize() + ":")
                out.extend("  " + inline(b) for b in body)
                out.append("")
                continue
            elif kind in ("{toctree}",):
                continue
            dest = tangle.destination(body[0]) if body else None
            if dest:
                body = body[1:]
                joined = tangle.class_joined(dest, "\n".join(body), classes)
                out.append(f"    [{dest}, in class {joined}]" if joined else f"    [{dest}]")
            out.extend(("    " + b).rstrip() for b in body)
            out.append("")
            continue
        if line.startswith("#"):
            flush()
            level = len(line) - len(line.lstrip("#"))
            title = inline(line.lstrip("#").strip())
            out.append(title)
            out.append(("=" if level == 1 else "-") * len(title))
            out.append("")
        elif line.lstrip().startswith(("- ", "* ")) or re.match(r"^\s*\d+\.\s", line) \
                or line.startswith("|"):
            flush()
            # A list item or table row: keep it on its own, joined with its continuation.
            item = [line.rstrip()]
            while i + 1 < len(lines) and lines[i + 1].startswith("  ") \
                    and not lines[i + 1].lstrip().startswith(("- ", "* ")):
                i += 1
                item.append(lines[i].strip())
            text = inline(" ".join(item))
            if text.startswith("|"):
                rows = [text]
                while i + 1 < len(lines) and lines[i + 1].startswith("|"):
                    i += 1
                    rows.append(inline(lines[i].rstrip()))
                out.extend(table(rows, width))
                out.append("")
            else:
                lead = re.match(r"^\s*(\S+\s)", text).group(1)
                out.extend(textwrap.wrap(text, width, subsequent_indent=" " * len(lead)))
        elif not line.strip():
            flush()
            if out and out[-1] != "":
                out.append("")
        else:
            para.append(line)
        i += 1
    flush()
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    chapters = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.md"))
    if len(argv) != 1 or (argv[0] != "all" and not any(c.name.startswith(argv[0] + "_") for c in chapters)):
        print("usage: chapter_text.py NN|all   (NN: 01 to 07)", file=sys.stderr)
        return 2
    width = min(shutil.get_terminal_size((80, 24)).columns, 88) - 2
    chosen = chapters if argv[0] == "all" else [c for c in chapters if c.name.startswith(argv[0] + "_")]
    try:
        sys.stdout.write("\n\n".join(render(c, width) for c in chosen))
    except BrokenPipeError:  # `make Beer | head` is a fine thing to do
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
