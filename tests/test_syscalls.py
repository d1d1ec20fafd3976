"""System calls and breakpoints where KVM emulates kernel mode (chapter V): a tiny
guest, then Linux.

The tiny guest's user program makes a system call, an `int $0x80`, takes a page fault
its kernel expects, and exits with a second system call; each step says a letter.
"""
from __future__ import annotations

import mmap
import re
import struct
import subprocess
import sys
import termios

import pytest
from hypothesis import given, settings, strategies as st

from lguest.host.memory import GuestMemory, GuestMemoryError
from lguest.host.pagewalk import read_virtual
from lguest.host.emulation.syscalls import Gate, SyscallRepair, idt_gate
from lguest.switcher import Kvm, MemorySlot, lib

ALL_THE_WAY = b"kuSvIwPxH\n"
LGUEST = [sys.executable, "-m", "lguest"]


@pytest.fixture(scope="module")
def kvm():
    from lguest.switcher import Kvm
    with Kvm() as kvm:
        yield kvm


@pytest.fixture(scope="module")
def emulated() -> bool:
    from lguest.doctor import kernel_mode_emulated
    return kernel_mode_emulated()


@pytest.mark.kvm
def test_without_the_repair_the_guest_sees_what_the_host_does(kvm, emulated):
    from lguest.tiny.userguest import run_user_guest
    said, repaired = run_user_guest(kvm)
    assert said == (b"ku!\n" if emulated else ALL_THE_WAY)   # ! is the page fault at LSTAR
    assert not repaired


@pytest.mark.kvm
def test_syscall_and_int_0x80_are_finished_and_a_real_fault_reaches_its_handler(kvm,
                                                                                emulated):
    from lguest.tiny.userguest import run_user_guest
    said, repaired = run_user_guest(kvm, repairs=[SyscallRepair()])
    assert said == ALL_THE_WAY
    assert repaired["fault stepped past"] == 1            # the page fault at UNMAPPED: P
    finished = (repaired["syscall"], repaired["int $0x80"])
    assert finished == ((2, 1) if emulated else (0, 0))


@pytest.mark.kvm
def test_a_jump_to_the_syscall_entry_is_a_genuine_fault_and_is_not_repaired(kvm):
    from lguest.tiny.userguest import JUMP_TO_ENTRY, run_user_guest, user_program
    said, repaired = run_user_guest(kvm, user_program(JUMP_TO_ENTRY),
                                    repairs=[SyscallRepair()])
    assert said == b"ku!\n"                 # the guest's own handler saw cr2 = LSTAR
    assert repaired["syscall"] == 0 and repaired["fault stepped past"] == 1


@pytest.mark.kvm
def test_many_system_calls_in_a_row(kvm, emulated):
    from lguest.tiny.userguest import SYSCALL_STEP, run_user_guest, user_program
    said, repaired = run_user_guest(kvm, user_program(*[SYSCALL_STEP] * 40),
                                    repairs=[SyscallRepair()])
    assert said == b"ku" + b"Sv" * 40 + b"H\n"
    assert repaired["syscall"] == (41 if emulated else 0)


@pytest.mark.kvm
def test_an_int3_rewritten_behind_the_emulators_back_is_still_a_breakpoint(kvm, emulated):
    """The kernel says k, meets an int3, and says b; its #BP handler says B. Where kernel
    mode is emulated, a repair placed before ours rewrites the int3 as a nop after KVM
    fetched it, as a second vCPU finishing Linux's text_poke_bp() does: the breakpoint
    must still be taken, because the bytes KVM fetched are what the vCPU ran."""
    from lguest.tiny import userguest as U
    from lguest.host.emulation.repairs import emulation_repair
    from lguest.switcher import lib
    int3_at = U.KERNEL + len(U.say(b"k"))
    breakpoint_handler = U.HANDLERS + 0x100 * len(U.handlers())

    def another_vcpu_patches(machine, vcpu, reason: int) -> bool:
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            machine.memory.write(int3_at, b"\x90")
        return False

    overlay = {U.KERNEL: U.say(b"k") + b"\xCC" + U.say(b"b") + U.END,
               breakpoint_handler: U.say(b"B") + U.IRETQ,
               U.IDT + 3 * 16: U.gate(breakpoint_handler)}
    said, repaired = U.run_user_guest(kvm, repairs=[another_vcpu_patches, emulation_repair],
                                      overlay=overlay)
    assert said == b"kBb\n"
    assert repaired["int3"] == (1 if emulated else 0)


class Sregs:
    """The two kvm_sregs fields idt_gate reads, and the three it needs besides."""

    def __init__(self, cr3: int, base: int, limit: int):
        self.cr3, self.efer = cr3, 1 << 10
        self.idt = type("Dtable", (), {"base": base, "limit": limit})()


def guest_memory(data: bytes) -> GuestMemory:
    m = mmap.mmap(-1, len(data))
    m[:] = data
    return GuestMemory([MemorySlot(0, 0, len(data), m, None)])


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=512), st.integers(0, 1 << 64),
       st.integers(0, 1 << 64), st.integers(0, 0xFFFF), st.integers(0, 255))
def test_whatever_the_guest_wrote_we_get_a_gate_none_or_a_clear_refusal(
        pattern, cr3, base, limit, vector):
    memory = guest_memory((pattern * (0x4000 // len(pattern) + 1))[:0x4000])
    try:
        gate = idt_gate(memory, Sregs(cr3 & ~0xFFF, base, limit), vector)
    except GuestMemoryError:
        return
    assert gate is None or isinstance(gate, Gate)


def test_read_virtual_crosses_pages_and_refuses_impossible_addresses():
    pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    data = bytearray(0x8000)
    for table, entry in ((pml4, pdpt), (pdpt, pd), (pd, pt), (pt, 0x7000), (pt + 8, 0x5000)):
        struct.pack_into("<Q", data, table, entry | 1)      # virtual page 1 is before page 0
    data[0x7FFE:0x8000], data[0x5000:0x5002] = b"AB", b"CD"
    memory = guest_memory(bytes(data))
    assert read_virtual(memory, pml4, 0xFFE, 4) == b"ABCD"
    for impossible in (-2, (1 << 64) - 2):
        with pytest.raises(GuestMemoryError):
            read_virtual(memory, pml4, impossible, 4)


# Linux, where its user space lives by this repair on our machines: the lean guest end to
# end, and a shell through a real terminal.

@pytest.fixture(scope="module")
def lean():
    from lguest.guest import lean_guest
    return lean_guest()


def lean_args(lean) -> list[str]:
    return ["256m", str(lean.vmlinux), f"--initrd={lean.initrd}"]


def run_command(args: list[str], command: str, timeout: float):
    run = subprocess.run(LGUEST + args + ["--run", command], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return run.returncode, run.stdout.decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.kvm
def test_the_lean_guest_runs_a_command_and_hands_back_output_and_status(lean):
    status, out = run_command(lean_args(lean),
                              "uname -r; cat /proc/cpuinfo | grep -c processor; exit 7", 600)
    release = re.escape(lean.manifest["kernel_release"])
    if re.search(rf"^{release}\nSegmentation fault\n", out, re.M) and status == 7:
        # The known bug of test_linux.py's TLS_SEGFAULT (Mastery's "What next?"): a
        # freshly started busybox in the pipeline died, and the shell said so. Reported,
        # not hidden; any other way of failing fails.
        pytest.xfail("the known busybox TLS segfault hit the pipeline")
    assert re.search(rf"^{release}\n1\n", out, re.M), out[-3000:]
    assert status == 7, out[-3000:]


@pytest.mark.kvm
def test_a_shell_on_the_console_answers_ctrl_c_stops_its_job_and_poweroff_ends_it(lean):
    """The lean guest's shell, typed at: its timer is the one CPUID offered, Ctrl-C
    reaches the job it runs, and poweroff ends the launcher cleanly."""
    pexpect = pytest.importorskip("pexpect")
    with Kvm() as kvm:                         # chapter V offers the timer when KVM has it
        deadline = kvm.check_extension(lib.KVM_CAP_TSC_DEADLINE_TIMER)
    child = pexpect.spawn(LGUEST[0], LGUEST[1:] + lean_args(lean), timeout=600)
    try:
        child.expect("leave the shell to stop the guest")
        child.expect(r"# ")
        child.sendline("echo answer-$((6 * 7))")
        child.expect("answer-42")              # the shell's answer, not the echo of our line
        child.sendline("cat /sys/devices/system/clockevents/clockevent0/current_device")
        child.expect(r"\n(lapic\S*)\r?\n")
        assert child.match.group(1) == (b"lapic-deadline" if deadline else b"lapic")
        child.sendline("sh -c 'echo started-$((6 * 7)); exec sleep 1000'")
        child.expect("started-42")             # the job runs, in the terminal's foreground
        child.send("\x03")                     # Ctrl-C: the terminal's SIGINT, for the job
        child.sendline("echo after-$((6 * 7))")
        child.expect("after-42", timeout=300)  # now, not 1000 s later
        child.sendline("poweroff")
        child.expect(pexpect.EOF)
        lflag = termios.tcgetattr(child.child_fd)[3]
        assert lflag & termios.ICANON and lflag & termios.ECHO     # the terminal restored
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
