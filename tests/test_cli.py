"""The front door: help, and one line (no traceback) for a user's mistake."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LGUEST = Path(sys.executable).parent / "lguest"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_help_from_the_script_and_from_python_m():
    for cmd in ([str(LGUEST), "--help"], [sys.executable, "-m", "lguest", "--help"]):
        result = run(*cmd)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: lguest [--verbose] [MEM] [KERNEL]")
        assert "lguest doctor" in result.stdout


def test_a_user_mistake_is_one_line_without_a_traceback():
    result = run(str(LGUEST), "64m", "/no/such/kernel")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lguest: ")


def test_make_prints_chapters_as_plain_text():
    result = run("make", "-s", "-C", str(ROOT), "Preparation!")
    assert result.returncode == 0
    text = result.stdout
    assert text.startswith("I. Preparation\n==============\n")
    for myst in ("```", "{code-cell}", "jupytext:", "format_name: myst"):
        assert myst not in text
    assert not any(line.strip().startswith("#| tangle") for line in text.splitlines())
    assert "[lguest/__init__.py]" in text          # a tangled cell says where it goes
    assert "make Guest" in text                     # and the chapter ends with a door
    beer = run("make", "-s", "-C", str(ROOT), "Beer").stdout
    for title in ("I. Preparation", "II. Guest", "III. Drivers", "IV. Launcher",
                  "V. Host", "VI. Switcher", "VII. Mastery"):
        assert f"\n{title}\n" in "\n" + beer
