"""The users' kind of KVM, in the bed: a VM under QEMU-TCG with an AMD-V CPU.

This machine's KVM runs guest kernel mode in an instruction emulator; our users' runs it
in hardware. tools/bed.py boots a VM whose KVM is the users' kind, over this checkout,
and this module runs there the tests that need it (those marked `bed`: the users' path
and Debian's kernel booted with every device) beside every test that boots Linux (the
lean guest with every device, networks in namespaces of the bed's own, two vCPUs) and
chapter VI, executed. Each outer test runs one file's tests in a bed of its own.

Where this machine's own KVM is the users' kind, those tests ran directly and the bed
would add nothing: then these tests say so and skip.
"""
from __future__ import annotations

import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import kernel_mode_emulated, kvm_problem

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import bed  # noqa: E402

pytestmark = pytest.mark.kvm
SUITES = {                                   # file: what of it runs in the bed
    "test_users.py": "",
    "test_linux.py": "",
    "test_virtio_linux.py": "",
    "test_net_linux.py": "",
    "test_notebooks.py": "::test_chapter_runs_top_to_bottom[06_switcher]",
    "test_gdb.py": " -k 'tiny or hostile or ctrl_c or watchpoint or lean or system_call'",  # GDB
    "test_share.py": " -k 'a_guest or hosts_root'",    # 9P in both guests, the users' way
    "test_snapshot.py": " -k 'disk_write or two_cpus or processor'",   # KVM's state, users' kind
}
BED_LIMIT = 900            # seconds for one file's tests in the bed (the most: ~5 min)


def run_in_bed(name: str, part: str) -> tuple[list[tuple[str, str, str]], str]:
    """One file's tests in the bed: [(test, outcome, text)], and the bed's console."""
    report = ROOT / "build" / "bed" / f"{name}.xml"
    report.unlink(missing_ok=True)
    output, status = bed.run(f"{sys.executable} -m pytest -p no:cacheprovider -q -rfEs "
                             f"--durations=5 --junitxml={report} tests/{name}{part}",
                             timeout=BED_LIMIT, echo=False)
    if not report.exists():
        return [], f"the bed wrote no report (status {status}):\n{output[-5000:]}"
    cases = []
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "xfail" if child.get("type") == "pytest.xfail" else child.tag
                text = (child.get("message") or "") + "\n" + (child.text or "")
        cases.append((case.get("name"), outcome, text))
    return cases, output


@pytest.fixture(scope="module")
def guests_built():
    """The bed is needed here, and the guests it boots are built (out here, where that
    is quick)."""
    if kvm_problem() is None and kernel_mode_emulated() is False:
        pytest.skip("this machine's KVM already runs guest kernel mode in hardware: "
                    "the tests marked `bed` ran here directly")
    from lguest.guest import default_guest, lean_guest
    default_guest()
    lean_guest()


@pytest.fixture
def results(guests_built, suite):
    """The file's results, from one bed; a second bed only if the first one itself died
    or stood still before its tests reported (its own kernel's soft lockup under TCG,
    and once a bed idle for ten minutes, were seen before the bed kept a VM open), which
    it says. A test that fails in a bed that reported is never run again."""
    cases, output = run_in_bed(suite, SUITES[suite])
    if not cases:
        warnings.warn(f"the bed running {suite} ended without a report "
                      f"({'a soft lockup' if 'soft lockup' in output else 'no lockup seen'});"
                      " it was run again in a second bed")
        print(f"the first bed's console:\n{output[-3000:]}")
        cases, output = run_in_bed(suite, SUITES[suite])
    print(output[-20000:])                   # shown by pytest when the test fails
    assert cases, f"no test of {suite} ran in the bed:\n{output[-5000:]}"
    return cases


@pytest.mark.parametrize("suite", list(SUITES))
def test_in_the_bed(results, suite):
    """Every test of the file ran in the bed and passed: none failed, none was skipped
    (an expected failure, the known bug test_linux.py names, is reported and allowed)."""
    expected = lambda outcome, text: outcome == "xfail" or \
        (outcome == "skipped" and text.startswith("xfail"))
    for name, outcome, text in results:
        if expected(outcome, text):
            print(f"in the bed, {name}: expected failure: {text.strip()}")
    bad = [(name, outcome, text) for name, outcome, text in results
           if outcome != "passed" and not expected(outcome, text)]
    assert not bad, "\n\n".join(f"{name}: {outcome}\n{text[-3000:]}" for name, outcome, text in bad)
