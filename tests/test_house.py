"""The house: the package's rooms are where the book says, and they lean on each other
in one direction only.

These read the tangled package as source (with ast), so they need no KVM and no guest.
"""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import lguest

PACKAGE = lguest.PACKAGE
ROOT = PACKAGE.parent.parent
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
# Names that each command or tiny guest has one of, by design: every `lguest` verb has
# its own main and usage text, every tiny guest its own kernel.
ONE_PER_ROOM = {"main", "USAGE", "kernel_code"}


def relative(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_preparation_chapters_map_names_every_room_of_the_package():
    text = (ROOT / "notebooks" / "01_preparation.md").read_text()
    table = [line for line in text.splitlines() if re.match(r"\| [IVX]+\. ", line)]
    rooms = set(re.findall(r"`(lguest/[\w/.]*)`", "\n".join(table)))
    assert rooms, "no map of the package in chapter I"
    for room in rooms:
        assert (PACKAGE.parent / room).exists(), f"chapter I's map names {room}, which is not built"
    for module in MODULES:
        name = relative(module)
        assert any(name == room or name.startswith(room.rstrip("/") + "/") for room in rooms), \
            f"{name} is in no room of chapter I's map"


def test_host_drivers_and_launcher_never_import_the_tiny_guests_or_the_doctor():
    for module in MODULES:
        name = relative(module)
        if not name.startswith(("lguest/host/", "lguest/drivers/", "lguest/launcher/",
                                "lguest/guest/", "lguest/x86.py", "lguest/switcher.py")):
            continue
        imports = imported_modules(module)
        assert not any(i == "lguest.tiny" or i.startswith("lguest.tiny.") for i in imports), name
        if name != "lguest/launcher/main.py":      # the front door's launcher asks the doctor
            assert "lguest.doctor" not in imports, name


def test_lower_rooms_do_not_reach_up():
    rules = {"lguest/x86.py": ("lguest.",),                      # facts only
             "lguest/switcher.py": ("lguest.host", "lguest.launcher", "lguest.drivers"),
             "lguest/drivers/": ("lguest.launcher", "lguest.guest"),    # may use the host
             "lguest/host/": ("lguest.launcher", "lguest.drivers", "lguest.guest"),
             "lguest/guest/": ("lguest.launcher", "lguest.host", "lguest.drivers")}
    for module in MODULES:
        name = relative(module)
        for room, forbidden in rules.items():
            if name.startswith(room):
                bad = [i for i in imported_modules(module) if i.startswith(forbidden)]
                assert not bad, f"{name} imports {bad}"


def test_every_fact_is_defined_once():
    defined = defaultdict(list)
    for module in MODULES:
        for node in ast.parse(module.read_text()).body:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    elements = target.elts if isinstance(target, ast.Tuple) else [target]
                    for e in elements:
                        if isinstance(e, ast.Name):
                            defined[e.id].append(relative(module))
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined[node.name].append(relative(module))
    twice = {n: where for n, where in defined.items() if len(where) > 1 and n not in ONE_PER_ROOM}
    assert not twice, f"defined in more than one module: {twice}"


def test_imports_sit_at_the_top_or_say_why_not():
    """An import inside a function is allowed only with a comment saying why, just above."""
    for module in MODULES:
        lines = module.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    above = lines[inner.lineno - 2].strip()
                    assert above.startswith("#"), \
                        f"{relative(module)}:{inner.lineno}: an import inside {node.name}() " \
                        "with no comment above it saying why"
