#!/usr/bin/env python3
"""Tangle the lguest book into the lguest program.

The chapters in notebooks/NN_name.md are the only source.  A code block whose
first line is a directive such as

    #| tangle: lguest/switcher.py

is appended to that file under build/.  Blocks are taken in a fixed order
(chapter by file name, then position in the chapter), every file is built in
memory first, and a file is written only when its bytes change.  Beside the
files we write two records:

  build/lguest/tangle_map.json   which notebook line each generated line came
                                 from (for tracebacks and failing tests);
  build/.tangle-manifest.json    the sha256 of everything we wrote, so that a
                                 hand edit under build/ is refused, not lost.

Usage: python tangle.py [--check] [--quiet]
  --check   write nothing; exit 1 if any generated file would change.

This file is the one piece of Python outside the notebooks: something has to
read them before there is a package.  It uses only the standard library.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
NOTEBOOKS = ROOT / "notebooks"
OUT = ROOT / "build"
MAP_FILE = "lguest/tangle_map.json"
MANIFEST = OUT / ".tangle-manifest.json"

CHAPTER_NAME = re.compile(r"^\d\d_[a-z_]+\.md$")
# A directive: a comment leader, a bar, a key, a colon, a value.
DIRECTIVE = re.compile(r"^(#|//|;|--)\|\s*([A-Za-z][\w-]*)\s*:\s*(.*?)\s*$")
FENCE_OPEN = re.compile(r"^(`{3,}|~{3,})\s*(.*?)\s*$")
KNOWN_DIRECTIVES = {"tangle"}

# How each kind of file spells a comment, for the header and the markers.
COMMENT = {
    ".py": "#", ".sh": "#", ".cfg": "#", ".config": "#", ".txt": "#", ".mk": "#",
    "": "#",  # scripts without an extension, such as a guest's init
    ".c": "//", ".h": "//", ".S": "//", ".ld": "//", ".lds": "//",
}


class TangleError(Exception):
    """A problem in the book, reported as notebook:line: what is wrong."""


@dataclass
class Chunk:
    notebook: str        # "notebooks/06_switcher.md"
    line: int            # notebook line of the chunk's first code line
    directive_line: int  # notebook line of its directive
    lang: str            # "python", or the fence's language
    text: str            # the code, directive removed, ending in "\n"


@dataclass
class Output:
    path: str                                   # relative to build/
    chunks: list[Chunk] = field(default_factory=list)


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def chapters(notebooks: Path = NOTEBOOKS) -> list[Path]:
    """The chapters, in reading order: the NN_ prefix decides, not the file system."""
    return sorted(p for p in notebooks.iterdir() if CHAPTER_NAME.match(p.name))


def fenced_blocks(lines: list[str]):
    """Yield (info, body_start_index, body_lines) for each top-level fenced block.

    A fence of N backticks is closed only by a line of at least N of the same
    character and nothing else, so blocks nested inside a MyST directive (say a
    ````{note}` with a ``` block inside) stay inside it and are not tangled.
    """
    i = 0
    while i < len(lines):
        m = FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2)
        closing = re.compile("^" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}\s*$")
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            j += 1
        yield info, i + 1, lines[i + 1:j]
        i = j + 1


def skip_options(body: list[str]) -> int:
    """Index of the first code line after a MyST directive's options.

    Options come as `:key: value` lines or as a YAML block between `---` lines.
    """
    k = 0
    if body and body[0].strip() == "---":
        k = 1
        while k < len(body) and body[k].strip() != "---":
            k += 1
        return k + 1
    while k < len(body) and re.match(r"^:[\w-]+:", body[k]):
        k += 1
    return k


def read_chapter(path: Path) -> list[tuple[str, Chunk]]:
    """Find the tangled blocks of one chapter: [(destination, chunk), ...]."""
    name = rel(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for info, start, body in fenced_blocks(lines):
        is_cell = info.startswith("{code-cell}")
        if info.split(None, 1)[0] in ("{code-cell}", "{code-block}", "{code}"):
            lang = info.split(None, 1)[1] if " " in info else ""
            k = skip_options(body)
        elif info.startswith("{"):
            continue  # another MyST directive: prose, not code
        else:
            lang, k = info, 0
        if is_cell:
            lang = "python"
        code = body[k:]
        first = start + k  # index of the first code line
        heads = []  # the directive lines at the top of the block
        while len(heads) < len(code):
            m = DIRECTIVE.match(code[len(heads)])
            if not m:
                break
            heads.append(m)
        where = f"{name}:{first + 1}"
        dest = None
        for n, m in enumerate(heads):
            leader, key, value = m.groups()
            at = f"{name}:{first + n + 1}"
            if key not in KNOWN_DIRECTIVES:
                raise TangleError(f"{at}: unknown directive '{key}' (the only one is "
                                  f"'{leader}| tangle: PATH')")
            if is_cell and leader != "#":
                raise TangleError(f"{at}: a Python cell's directive starts with '#|'")
            dest = check_destination(value, at)
        for n, line in enumerate(code[len(heads):], start=len(heads)):
            m = DIRECTIVE.match(line)
            if m and m.group(2) == "tangle":
                raise TangleError(f"{name}:{first + n + 1}: a tangle directive must be "
                                  "the first line of its block")
        if dest is None:
            continue
        text = "\n".join(code[len(heads):]).rstrip("\n") + "\n"
        found.append((dest, Chunk(name, first + len(heads) + 1, first + 1,
                                  lang or "python", text)))
    return found


def destination(line: str) -> str | None:
    """The file a block's first line sends it to, if that line is a tangle directive."""
    m = DIRECTIVE.match(line)
    return m.group(3) if m and m.group(2) == "tangle" and m.group(3) else None


def class_joined(dest: str, code: str, classes: dict[str, str]) -> str | None:
    """The class a tangled cell adds to, for captions like "x.py, in class Uart8250".

    Call it for each tangled cell of a chapter in document order, with `code` the
    cell without its directive.  `classes` remembers, per file, the last top-level
    class begun so far, and is updated.  A Python cell whose first line of code
    (after blank lines and comments) is indented continues that class; any other
    cell joins no class (None).  Tangling itself does not need this: the weave and
    tools/chapter_text.py do, and both ask here.
    """
    if not dest.endswith(".py"):
        return None
    first = next((s for s in code.splitlines() if s.strip() and not s.lstrip().startswith("#")), "")
    if first[:1] in (" ", "\t"):
        return classes.get(dest)
    for node in top_level(code):
        if isinstance(node, ast.ClassDef):
            classes[dest] = node.name
    return None


def check_destination(value: str, where: str) -> str:
    if not value:
        raise TangleError(f"{where}: 'tangle:' needs a path, such as lguest/host/machine.py")
    p = Path(value)
    if p.is_absolute() or ".." in p.parts or value.endswith("/"):
        raise TangleError(f"{where}: '{value}' must be a file path inside build/, "
                          "such as lguest/host/machine.py")
    if value in (MAP_FILE, ".tangle-manifest.json"):
        raise TangleError(f"{where}: '{value}' is written by tangle.py itself")
    return value


def comment_for(path: str) -> str:
    suffix = Path(path).suffix
    if suffix not in COMMENT:
        raise TangleError(f"tangle does not know how to write a comment in '{path}' "
                          f"(known endings: {', '.join(s or '(none)' for s in COMMENT)})")
    return COMMENT[suffix]


def top_level(text: str) -> list[ast.stmt]:
    """The top-level statements of a piece of Python, or none if it does not parse
    alone (a real syntax error is reported when the whole file is compiled)."""
    try:
        return ast.parse(text).body
    except SyntaxError:
        return []


def has_docstring(text: str) -> bool:
    body = top_level(text)
    return bool(body) and isinstance(body[0], ast.Expr) and \
        isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)


def assemble(out: Output) -> tuple[str, list[list]]:
    """The text of one generated file and its line map.

    The map holds [first_line, last_line, notebook, notebook_line] per chunk:
    generated line first_line + k came from notebook line notebook_line + k.
    """
    c = comment_for(out.path)
    first = out.chunks[0]
    shebang = ""
    body0 = first.text
    if body0.startswith("#!"):
        shebang, body0 = body0.split("\n", 1)[0] + "\n", body0.split("\n", 1)[1]
    names = []
    for ch in out.chunks:
        if ch.notebook not in names:
            names.append(ch.notebook)
    lines = [shebang.rstrip("\n")] if shebang else []
    lines.append(f"{c} {out.path}: generated by tangle.py from {', '.join(names)}.")
    lines.append(f"{c} Edit the notebook, not this file.")
    spans = []
    for n, ch in enumerate(out.chunks):
        text = body0 if n == 0 else ch.text
        nb_line = ch.line + (1 if n == 0 and shebang else 0)
        lines.append("")
        lines.append(f"{c} {ch.notebook}:{ch.directive_line}")
        start = len(lines) + 1
        body = text.rstrip("\n").split("\n") if text.strip() else []
        lines.extend(body)
        if body:
            spans.append([start, len(lines), ch.notebook, nb_line])
    return "\n".join(lines) + "\n", spans


def notebook_line(spans: list[list], line: int) -> str | None:
    for start, end, notebook, nb_line in spans:
        if start <= line <= end:
            return f"{notebook}:{nb_line + line - start}"
    return None


def check_python(out: Output, text: str, spans: list[list]) -> None:
    for n, ch in enumerate(out.chunks[1:], start=1):
        if has_docstring(ch.text):
            head = out.chunks[0]
            raise TangleError(
                f"{ch.notebook}:{ch.line}: {out.path} already has its header (module "
                f"docstring) from {head.notebook}:{head.line}; a file has one header, in "
                "its first cell")
    try:
        compile(text, f"build/{out.path}", "exec", dont_inherit=True)
    except SyntaxError as e:
        where = notebook_line(spans, e.lineno or 0) or f"build/{out.path}:{e.lineno}"
        raise TangleError(f"{where}: Python syntax error in a cell for {out.path}: {e.msg}") from None


def build(notebooks: Path = NOTEBOOKS) -> dict[str, bytes]:
    """Everything tangle writes, as {path under build/: bytes}, built in memory."""
    outputs: dict[str, Output] = {}
    errors = []
    for chapter in chapters(notebooks):
        try:
            for dest, chunk in read_chapter(chapter):
                outputs.setdefault(dest, Output(dest)).chunks.append(chunk)
        except TangleError as e:
            errors.append(str(e))
    files: dict[str, bytes] = {}
    tangle_map: dict[str, list] = {}
    for path in sorted(outputs):
        out = outputs[path]
        try:
            text, spans = assemble(out)
            if path.endswith(".py"):
                check_python(out, text, spans)
        except TangleError as e:
            errors.append(str(e))
            continue
        files[path] = text.encode("utf-8")
        tangle_map[path] = spans
    if errors:
        raise TangleError("\n".join(errors))
    if any(p.startswith("lguest/") for p in files):
        files[MAP_FILE] = map_json(tangle_map).encode()
    return files


def map_json(tangle_map: dict[str, list]) -> str:
    """The line map as JSON, one span per line so that a diff of it is readable."""
    files = []
    for path in sorted(tangle_map):
        spans = ",\n  ".join(json.dumps(s) for s in tangle_map[path])
        files.append(f" {json.dumps(path)}: [\n  {spans}\n ]")
    return "{\n" + ",\n".join(files) + "\n}\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_manifest() -> dict[str, str]:
    try:
        return json.loads(MANIFEST.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def plan(files: dict[str, bytes]) -> tuple[list[str], list[str], list[str]]:
    """What writing would do: (files to write, files to delete, hand-edited files)."""
    manifest = load_manifest()
    write, delete, edited = [], [], []
    for path, data in files.items():
        target = OUT / path
        if target.exists():
            current = target.read_bytes()
            if current == data:
                continue
            if path in manifest and manifest[path] != sha256(current):
                edited.append(path)
                continue
            if path not in manifest:
                edited.append(path)  # something we did not write sits in our place
                continue
        write.append(path)
    for path in sorted(set(manifest) - set(files)):
        target = OUT / path
        if target.exists():
            if sha256(target.read_bytes()) != manifest[path]:
                edited.append(path)
            else:
                delete.append(path)
    return write, delete, edited


def main(argv: list[str]) -> int:
    check = "--check" in argv
    quiet = "--quiet" in argv
    unknown = [a for a in argv if a not in ("--check", "--quiet")]
    if unknown:
        print(f"tangle: unknown option {unknown[0]}; usage: python tangle.py [--check] [--quiet]",
              file=sys.stderr)
        return 2
    try:
        files = build()
    except TangleError as e:
        for line in str(e).splitlines():
            print(f"tangle: {line}", file=sys.stderr)
        return 1
    write, delete, edited = plan(files)
    if edited:
        for path in edited:
            print(f"tangle: build/{path} was edited by hand; move the change into its "
                  "notebook (the marker above each block names the line), then delete "
                  "the file and tangle again", file=sys.stderr)
        return 1
    if check:
        for path in write:
            print(f"tangle: build/{path} would change")
        for path in delete:
            print(f"tangle: build/{path} would be removed")
        return 1 if write or delete else 0
    for path in write:
        target = OUT / path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tangle-tmp")
        tmp.write_bytes(files[path])
        if files[path].startswith(b"#!"):
            tmp.chmod(0o755)
        os.replace(tmp, target)
    for path in delete:
        (OUT / path).unlink()
    manifest = {path: sha256(data) for path, data in sorted(files.items())}
    if write or delete or load_manifest() != manifest:
        OUT.mkdir(exist_ok=True)
        MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if not quiet:
        print(f"tangle: {len(files)} files from {len(chapters())} chapters; "
              f"{len(write)} written, {len(delete)} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
