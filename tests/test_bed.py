"""The users' kind of KVM, in the bed: a VM under QEMU-TCG with an AMD-V CPU.

This machine's KVM runs guest kernel mode in an instruction emulator; our users' runs it
in hardware. tools/bed.py boots a VM whose KVM is the users' kind, over this checkout,
and this module runs there, once, the tests that need it (those marked `bed`: the users'
path and Debian's kernel booted with every device) beside every test that boots Linux
(the lean guest with every device, networks in namespaces of the bed's own, two vCPUs)
and chapter VI, executed. Each outer test below reports one file of that inner run.

Where this machine's own KVM is the users' kind, those tests ran directly and the bed
would add nothing: then these tests say so and skip.
"""
from __future__ import annotations

import sys
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
}
BED_LIMIT = 3600                             # seconds for the whole inner run


@pytest.fixture(scope="module")
def inner():
    """Run the suites in the bed, once; their results, by file: [(name, outcome, text)]."""
    if kvm_problem() is None and kernel_mode_emulated() is False:
        pytest.skip("this machine's KVM already runs guest kernel mode in hardware: "
                    "the tests marked `bed` ran here directly")
    # What the bed boots is built out here first, where it is quick.
    from lguest.guest import default_guest, lean_guest
    default_guest()
    lean_guest()
    report = ROOT / "build" / "bed" / "inner.xml"
    report.unlink(missing_ok=True)
    targets = " ".join(f"tests/{name}{part}" for name, part in SUITES.items())
    output, status = bed.run(f"{sys.executable} -m pytest -p no:cacheprovider -q -rfEs "
                             f"--durations=10 --junitxml={report} {targets}",
                             timeout=BED_LIMIT, echo=False)
    print(output[-20000:])                   # shown by pytest when an outer test fails
    assert report.exists(), f"the bed wrote no report (status {status}):\n{output[-5000:]}"
    results: dict[str, list[tuple[str, str, str]]] = {name: [] for name in SUITES}
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
                text = (child.get("message") or "") + "\n" + (child.text or "")
        name = Path(case.get("file") or case.get("classname").replace(".", "/")).name
        if not name.endswith(".py"):
            name += ".py"
        results.setdefault(name, []).append((case.get("name"), outcome, text))
    return results


@pytest.mark.parametrize("suite", list(SUITES))
def test_in_the_bed(inner, suite):
    """Every test of the file ran in the bed and passed: none failed, none was skipped
    (an expected failure, the known bug test_linux.py names, is reported and allowed)."""
    cases = inner.get(suite, [])
    assert cases, f"no test of {suite} ran in the bed"
    for name, outcome, text in cases:
        if outcome == "skipped" and text.startswith("xfail"):
            print(f"in the bed, {name}: expected failure: {text.strip()}")
    bad = [(name, outcome, text) for name, outcome, text in cases
           if outcome != "passed" and not (outcome == "skipped" and text.startswith("xfail"))]
    assert not bad, "\n\n".join(f"{name}: {outcome}\n{text[-3000:]}" for name, outcome, text in bad)
