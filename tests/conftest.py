"""Shared test machinery.

- `@pytest.mark.kvm` marks a test that needs a usable /dev/kvm; it is skipped, with
  the reason, only where /dev/kvm is missing or cannot be opened.
- `@pytest.mark.bed` marks a test of the users' path: it needs a KVM whose guests run
  kernel mode in hardware (tests/test_users.py, and Debian's kernel booted to user
  space, which takes twenty minutes where kernel mode is emulated). Where this machine's
  KVM emulates kernel mode they are not collected here: tests/test_bed.py runs them in
  the bed (tools/bed.py), a VM whose KVM is the users' kind. On hardware KVM they run here.
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
    config.addinivalue_line("markers", "bed: the users' path: needs hardware kernel mode; "
                                       "run in the bed (test_bed.py) where it is emulated")


def in_the_bed() -> bool:
    return os.environ.get("LGUEST_BED") == "1"


_EMULATED: list[bool] = []


def kernel_mode_emulated() -> bool | None:
    """Asked once per run: does this machine's KVM emulate guest kernel mode? None where
    there is nobody to ask (no doctor in a small book a test makes of its own)."""
    if not _EMULATED:
        try:
            from lguest.doctor import kernel_mode_emulated as ask
        except ImportError:
            _EMULATED.append(None)
        else:
            _EMULATED.append(ask())
    return _EMULATED[0]


def pytest_report_header(config):
    problem = kvm_problem()
    lines = [f"KVM: {'usable' if problem is None else 'NOT usable: ' + problem}"]
    if problem is None and kernel_mode_emulated() is not None:
        kind = "emulated" if kernel_mode_emulated() else "hardware"
        where = " (inside the bed)" if in_the_bed() else ""
        lines.append(f"guest kernel mode: {kind}{where}")
    return lines


def pytest_collection_modifyitems(config, items):
    problem = kvm_problem()
    if problem is None and kernel_mode_emulated():
        # The users' path needs hardware kernel mode: test_bed.py takes it into the bed.
        bed = [item for item in items if "bed" in item.keywords]
        if bed:
            config.hook.pytest_deselected(items=bed)
            items[:] = [item for item in items if "bed" not in item.keywords]
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
