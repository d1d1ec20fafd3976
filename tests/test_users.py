"""The users' path: lguest where guest kernel mode runs in hardware (VT-x/AMD-V).

These tests carry the `bed` mark. Where this machine's KVM emulates guest kernel mode
they are not collected here: tests/test_bed.py runs them, with the other tests marked
`bed` and the Linux tests, inside the bed (tools/bed.py), a VM under QEMU-TCG whose AMD-V
CPU gives its KVM hardware kernel mode. On a machine whose own KVM is hardware they run
directly. Each is what a user would type.
"""
from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lguest.doctor import kernel_mode_emulated

pytestmark = [pytest.mark.kvm, pytest.mark.bed]
ROOT = Path(__file__).resolve().parent.parent
LGUEST = [sys.executable, "-m", "lguest"]


def lguest(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(LGUEST + list(args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_this_kvm_runs_guest_kernel_mode_in_hardware():
    assert not kernel_mode_emulated()


def test_the_doctor_says_hardware_and_times_both_rings():
    run = lguest("doctor")
    assert run.returncode == 0, run.stderr
    verdict = re.search(r"guest kernel mode: hardware \(the same loop takes ([\d,.]+) ns per "
                        r"iteration in ring 0, ([\d,.]+) ns in ring 3\)", run.stdout)
    assert verdict, run.stdout
    ring0, ring3 = (float(v.replace(",", "")) for v in verdict.groups())
    assert ring0 > 0 and ring3 > 0, run.stdout       # a measurement, not a failed one


def test_the_demo_runs_its_three_tiny_guests():
    run = lguest("demo")
    assert run.returncode == 0, run.stderr
    for mode in ("real", "protected", "long"):
        assert f"Hello from {mode} mode!" in run.stdout, run.stdout


class Terminal:
    """A program on a pseudo-terminal of its own, read and typed at as a person would."""

    def __init__(self, argv: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.chdir(ROOT)
            os.execvp(argv[0], argv)
        self.text = ""

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text)
            if found:
                return found
            if select.select([self.fd], [], [], 1.0)[0]:
                try:
                    self.text += os.read(self.fd, 65536).decode(errors="replace")
                except OSError:           # the program ended and the terminal went away
                    break
        found = re.search(pattern, self.text)
        assert found, f"never saw {pattern!r}; the terminal said:\n{self.text[-3000:]}"
        return found

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def status(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.5)[0]:
                try:
                    self.text += os.read(self.fd, 65536).decode(errors="replace")
                except OSError:
                    pass
        os.kill(self.pid, 9)
        raise AssertionError(f"still running after {timeout} s:\n{self.text[-3000:]}")


def test_make_run_boots_debians_kernel_to_a_shell_that_answers():
    """The README's first command: the default guest, Debian's kernel, on a terminal."""
    from lguest.guest import default_guest
    release = default_guest().manifest["kernel_release"]
    term = Terminal(["make", "-s", "run"])
    term.wait_for(rf"init: Linux {re.escape(release)} is up", timeout=600)
    term.type("echo $((6 * 7))-answered; uname -r")
    term.wait_for(rf"42-answered\s+{re.escape(release)}", timeout=120)
    term.type("poweroff")
    assert term.status(timeout=120) == 0, term.text[-3000:]
    assert "lean guest" not in term.text          # hardware KVM keeps Debian's kernel


def test_a_traced_boot_records_no_repairs(tmp_path):
    """Where kernel mode is hardware the Host repairs nothing: the trace says so."""
    from lguest.trace import read_trace, summary
    trace = tmp_path / "boot.trace"
    run = lguest(f"--trace={trace}", "128m", "lean", "--run", "uname -r; exit 4")
    assert run.returncode == 4, run.stderr
    recorded = read_trace(str(trace))
    assert recorded.repairs == [], recorded.repairs[:5]
    assert recorded.exits, "the trace holds the boot's exits"
    story = summary(recorded)
    assert "repaired (chapter V)" not in story, story
