"""Chapter VI, the Switcher: KVM through cffi, the first guests, `lguest doctor`.

The KVM tests prove each guest really ran: the bytes it wrote to the debug port,
its exits in order, and registers that only its instructions could have left.
"""
from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lguest import LguestError
from lguest.switcher import IOCTL_NAMES, Kvm, exit_name, ioctl, kvm_open_error, lib
from lguest import tiny, x86
from lguest.doctor import LONG_ENOUGH, KernelModeSpeed, measure_kernel_mode, more_loops
from lguest.tiny.rings import MAX_LOOPS
from lguest.tiny import firstguests as fg

ROOT = Path(__file__).resolve().parent.parent
NO_KVM = "/nonexistent/kvm"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lguest", *args], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL, cwd=ROOT)


# The ABI, as the compiler laid it out.

def test_ioctl_numbers_and_layout_come_from_the_header():
    from lguest._kvm import ffi
    assert lib.KVM_RUN == 0xAE80                      # _IO(KVMIO, 0x80)
    assert lib.KVM_GET_REGS >> 8 & 0xFF == 0xAE
    assert lib.KVM_GET_REGS >> 16 & 0x3FFF == ffi.sizeof("struct kvm_regs")
    assert IOCTL_NAMES[lib.KVM_CREATE_VM] == "KVM_CREATE_VM"
    assert ffi.offsetof("struct kvm_run", "exit_reason") == 8
    assert ffi.offsetof("struct kvm_run", "io") == 32
    assert exit_name(lib.KVM_EXIT_IO) == "KVM_EXIT_IO" and exit_name(999) == "KVM_EXIT_999"


def test_gdt_entries_are_the_classic_flat_descriptors():
    assert x86.BOOT_GDT[x86.CODE32_SELECTOR >> 3] == 0x00CF9B000000FFFF
    assert x86.BOOT_GDT[x86.DATA_SELECTOR >> 3] == 0x00CF93000000FFFF
    assert x86.BOOT_GDT[x86.CODE64_SELECTOR >> 3] == 0x00AF9B000000FFFF
    assert len(x86.gdt_bytes()) == 8 * len(x86.BOOT_GDT)


def test_the_doctor_verdict_is_a_ratio():
    assert KernelModeSpeed(ring0_ns=1700, ring3_ns=0.5, exit_us=15).emulated
    assert not KernelModeSpeed(ring0_ns=1.5, ring3_ns=0.4, exit_us=3).emulated


def test_the_doctor_lengthens_a_loop_until_it_outlasts_the_noise():
    exit_ns = 10_000
    assert more_loops(1000, LONG_ENOUGH * exit_ns, exit_ns) == 0          # long enough
    assert more_loops(1000, 0, exit_ns) == 100_000                       # lost in noise
    grown = more_loops(1000, exit_ns, exit_ns)                           # 1/50 of enough
    assert grown * exit_ns / 1000 >= LONG_ENOUGH * exit_ns               # ...enough next
    assert more_loops(MAX_LOOPS // 2, 0, exit_ns) == MAX_LOOPS
    with pytest.raises(LguestError, match="cannot time guest code"):
        more_loops(MAX_LOOPS, 5, exit_ns)


@pytest.mark.kvm
def test_the_doctor_times_both_rings_here():
    speed = measure_kernel_mode()
    assert speed.ring0_ns > 0 and speed.ring3_ns > 0 and speed.exit_us > 0


# Opening /dev/kvm, and what the user sees when it cannot be opened.

def test_missing_kvm_is_one_sentence():
    with pytest.raises(LguestError) as e:
        Kvm(NO_KVM)
    message = str(e.value)
    assert message == (f"no {NO_KVM}: this machine offers no KVM "
                       "(enable VT-x/AMD-V, or load kvm_intel/kvm_amd)")
    assert "\n" not in message


def test_permission_message_says_how_to_join_the_kvm_group():
    message = str(kvm_open_error("/dev/kvm", PermissionError(errno.EACCES, "denied")))
    assert "permission denied" in message and "usermod -aG kvm" in message
    assert "\n" not in message


@pytest.mark.kvm
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_permission_denied_for_real_as_nobody():
    """A child process becomes `nobody` (not in the kvm group) and opens /dev/kvm."""
    if os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("/dev/kvm is open to everybody here")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                Kvm("/dev/kvm")
                text = "opened"
            except LguestError as e:
                text = str(e)
            os.write(write, text.encode())
        finally:
            os._exit(0)
    os.close(write)
    text = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert text == ("/dev/kvm: permission denied; join the kvm group "
                    "(sudo usermod -aG kvm $USER) and log in again")


@pytest.mark.kvm
def test_kvm_api_version_and_a_failed_ioctl_names_itself():
    with Kvm() as kvm:
        assert kvm.api_version == 12
        assert kvm.vcpu_mmap_size >= 4096
        assert kvm.check_extension(lib.KVM_CAP_USER_MEMORY) > 0
        assert kvm.supported_cpuid().nent > 0
        with pytest.raises(OSError) as e:
            ioctl(kvm.fd, lib.KVM_CREATE_VCPU, 0)      # a VM's request, sent to /dev/kvm
        assert "KVM_CREATE_VCPU" in str(e.value)


@pytest.mark.kvm
def test_closing_releases_every_file_descriptor():
    before = set(os.listdir("/proc/self/fd"))
    with tiny.TinyMachine() as m:
        fds = [m.kvm.fd, m.vm.fd, m.vcpu.fd]
        assert len(set(fds)) == 3
    after = set(os.listdir("/proc/self/fd"))
    assert after == before
    assert m.kvm.fd == m.vm.fd == m.vcpu.fd == -1


@pytest.mark.kvm
def test_guest_memory_is_shared_and_bounds_checked():
    with tiny.TinyMachine() as m:
        m.memory.write(0x1234, b"lguest")
        assert m.memory.read(0x1234, 6) == b"lguest"
        with pytest.raises(ValueError, match="is not RAM"):
            m.memory.write(tiny.MEMORY_SIZE - 2, b"abc")
        with pytest.raises(ValueError):
            m.memory.read(-1, 1)


@pytest.mark.kvm
def test_a_new_vcpu_sits_at_the_reset_vector():
    with tiny.TinyMachine() as m:
        regs, sregs = m.vcpu.get_regs(), m.vcpu.get_sregs()
        assert sregs.cs.base + regs.rip == 0xFFFFFFF0
        assert sregs.cr0 & x86.CR0_PE == 0


# The first guests.

@pytest.mark.kvm
def test_real_mode_guest():
    trace = fg.run_real_mode()
    message = fg.REAL_MODE_MESSAGE
    assert trace.problem is None
    assert bytes(trace.output) == message
    assert trace.exits == ["KVM_EXIT_IO"] * len(message) + ["KVM_EXIT_HLT"]
    code_length = len(fg.real_mode_code(tiny.CODE_ADDR, message)) - len(message)
    assert trace.regs.rip == tiny.CODE_ADDR + code_length      # just past the hlt
    assert trace.regs.rsi == tiny.CODE_ADDR + code_length + len(message)
    assert trace.regs.rcx == 0
    assert trace.sregs.cr0 & x86.CR0_PE == 0


def assert_wrote_with_rep_outsb_and_halted(trace, message: bytes) -> None:
    assert trace.problem is None
    assert bytes(trace.output) == message
    # rep outsb may come back once, or once per byte: KVM decides.
    assert trace.exits[-1] == "KVM_EXIT_HLT"
    assert set(trace.exits[:-1]) == {"KVM_EXIT_IO"}
    assert 1 <= len(trace.exits) - 1 <= len(message)


@pytest.mark.kvm
def test_protected_mode_guest_climbs_into_32_bit_mode():
    trace = fg.run_protected_mode()
    message = fg.PROTECTED_MODE_MESSAGE
    assert_wrote_with_rep_outsb_and_halted(trace, message)
    code = fg.protected_mode_code(tiny.CODE_ADDR, message)
    assert trace.regs.rip == tiny.CODE_ADDR + len(code) - len(message)
    assert trace.regs.rsi == tiny.CODE_ADDR + len(code)
    assert trace.regs.rcx == 0
    s = trace.sregs
    assert s.cr0 & x86.CR0_PE and not s.cr0 & x86.CR0_PG
    assert (s.cs.selector, s.cs.db, s.cs.l) == (x86.CODE32_SELECTOR, 1, 0)
    assert s.ds.selector == s.ss.selector == x86.DATA_SELECTOR
    assert (s.gdt.base, s.gdt.limit) == (x86.BOOT_GDT_ADDR, 8 * len(x86.BOOT_GDT) - 1)


@pytest.mark.kvm
def test_long_mode_guest_runs_64_bit_code():
    trace = fg.run_long_mode()
    message = fg.LONG_MODE_MESSAGE
    assert_wrote_with_rep_outsb_and_halted(trace, message)
    end_of_message = tiny.CODE_ADDR + len(fg.long_mode_code(tiny.CODE_ADDR, message))
    assert trace.regs.rsi == end_of_message
    assert trace.regs.rax == end_of_message << 32          # only 64-bit code gets here
    assert trace.regs.rip == end_of_message - len(message)
    s = trace.sregs
    assert s.cr0 & (x86.CR0_PE | x86.CR0_PG) == x86.CR0_PE | x86.CR0_PG
    assert s.cr4 & x86.CR4_PAE and s.cr3 == x86.BOOT_PML4_ADDR
    assert s.efer & (x86.EFER_LME | x86.EFER_LMA) == x86.EFER_LME | x86.EFER_LMA
    assert s.cs.l == 1 and s.cs.selector == x86.CODE64_SELECTOR


@pytest.mark.kvm
def test_identity_page_tables_map_the_code_page():
    with tiny.TinyMachine() as m:
        x86.write_boot_tables(m.memory, user=True)
        pml4, = struct.unpack("<Q", m.memory.read(x86.BOOT_PML4_ADDR, 8))
        pd, = struct.unpack("<Q", m.memory.read(x86.BOOT_PML4_ADDR + 2 * x86.PAGE_SIZE, 8))
        assert pml4 & ~0xFFF == x86.BOOT_PML4_ADDR + x86.PAGE_SIZE and pml4 & x86.PTE_US
        assert pd & x86.PTE_PS and pd & ~0xFFF == 0


@pytest.mark.kvm
def test_a_guest_that_faults_is_reported_not_hidden():
    with tiny.TinyMachine() as m:
        tiny.start_long_mode(m, b"\x0F\x0B")                  # ud2, and no IDT to catch it
        trace = tiny.run_until_halt(m.vcpu)
    assert trace.exits[-1] != "KVM_EXIT_HLT"
    assert trace.problem and trace.problem.startswith("KVM_EXIT_")


@pytest.mark.kvm
def test_a_guest_reading_an_unknown_port_is_described():
    with tiny.TinyMachine() as m:
        m.memory.write(tiny.CODE_ADDR, b"\xE4\x60\xF4")        # in al, 0x60; hlt
        tiny.enter_real_mode(m.vcpu, tiny.CODE_ADDR)
        trace = tiny.run_until_halt(m.vcpu)
    assert trace.exits == ["KVM_EXIT_IO"]
    assert trace.problem == "KVM_EXIT_IO in port 0x60, which nobody handles here"


@pytest.mark.kvm
def test_a_signal_interrupts_kvm_run():
    """KVM_RUN comes back with KVM_EXIT_INTR when a signal arrives: the Host relies on it."""
    with tiny.TinyMachine() as m:
        tiny.start_long_mode(m, b"\xEB\xFE")                  # jmp $: forever
        old = signal.signal(signal.SIGALRM, lambda *_: None)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            assert m.vcpu.run() == lib.KVM_EXIT_INTR
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


@pytest.mark.kvm
def test_the_exit_loop_guest_exits_on_every_out():
    assert fg.exits_per_second(exits=200) > 0


# The commands.

@pytest.mark.kvm
def test_lguest_demo_runs_the_three_guests():
    result = run("demo")
    assert result.returncode == 0, result.stderr
    for message in (fg.REAL_MODE_MESSAGE, fg.PROTECTED_MODE_MESSAGE, fg.LONG_MODE_MESSAGE):
        assert repr(message) in result.stdout
    assert result.stdout.count("KVM_EXIT_HLT") == 3


@pytest.mark.kvm
def test_lguest_doctor_tells_the_truth_here():
    result = run("doctor")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("/dev/kvm: usable, KVM API version 12")
    for capability in ("KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_IOEVENTFD",
                       "KVM_CAP_IRQFD", "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_SET_GUEST_DEBUG"):
        assert f"  {capability} " in out
        assert any(line.split()[:2] in ([capability, "yes"], [capability, "no"])
                   for line in out.splitlines())
    if Path("/sys/module/kvm_pvm").exists():
        # Our machines: KVM on PVM, where guest ring 0 runs in KVM's emulator.
        assert "guest kernel mode: emulated" in out
        assert "instruction emulator" in out and "minutes to boot" in out
    elif Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists():
        assert "guest kernel mode: hardware" in out


def test_lguest_doctor_without_kvm_is_one_line():
    result = run("doctor", f"--device={NO_KVM}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"lguest doctor: no {NO_KVM}: this machine offers no KVM "
                     "(enable VT-x/AMD-V, or load kvm_intel/kvm_amd)"]
