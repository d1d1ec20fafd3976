"""Shared test machinery.

- `@pytest.mark.kvm` marks a test that needs a usable /dev/kvm; it is skipped, with
  the reason, only where /dev/kvm is missing or cannot be opened.
- A failing test whose traceback passes through generated code gets a report
  section naming the notebook lines, so you know which cell to open.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "build") not in sys.path:
    sys.path.insert(0, str(ROOT / "build"))


def kvm_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this machine"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "kvm: needs a usable /dev/kvm")


def pytest_report_header(config):
    problem = kvm_problem()
    return f"KVM: {'usable' if problem is None else 'NOT usable: ' + problem}"


def pytest_collection_modifyitems(config, items):
    problem = kvm_problem()
    if problem is None:
        return
    skip = pytest.mark.skip(reason=f"needs KVM: {problem}")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed or call.excinfo is None:
        return
    try:
        from lguest import notebook_line
    except Exception:
        return
    lines = []
    for entry in call.excinfo.traceback:
        origin = notebook_line(str(entry.path), entry.lineno + 1)
        if origin:
            lines.append(f"{entry.path}:{entry.lineno + 1} in {entry.name} <- {origin}")
    if lines:
        report.sections.append(("notebook lines", "\n".join(lines)))
