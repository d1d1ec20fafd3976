"""Hardening: every bad input is one line, every broken guest is contained.

Users' mistakes go through the real front door (`python -m lguest`); the hostile guests
are tiny hand-made ones, on the Host's own Machine or as a vmlinux for the launcher.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lguest import LguestError
from lguest.drivers.i8042 import I8042, I8042_COMMAND_PORT, I8042_DATA_PORT, OUTPUT_LIMIT
from lguest.host.bus import UNCLAIMED_LIMIT
from lguest.host.machine import Machine, Outcome
from lguest.launcher.cli import parse_args
from lguest.switcher import Kvm
from lguest.tiny import CODE_ADDR, STACK_TOP, u32
from lguest.x86 import enter_long_mode, write_boot_tables
from test_host_tinyguests import HALT, LOAD_AT, say, tiny_vmlinux

LGUEST = [sys.executable, "-m", "lguest"]


def lguest(*args: str, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(LGUEST + list(args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def one_line(result: subprocess.CompletedProcess, says: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lguest"), result.stderr
    assert says in lines[0], lines[0]


# Bad input: one line each.

@pytest.mark.parametrize("words, says", [
    (["64MiB"], "not a memory size"), (["1.5g"], "not a memory size"),
    (["64x"], "not a memory size"), (["-1"], "not a memory size"),
    ([""], "not a memory size"), (["9" * 5000], "not a memory size"),
    (["0"], "at least 16m"), (["1k"], "at least 16m"),
    (["32m", "missing-file"], "no such kernel file"), (["quiet"], "goes after --"),
    (["64m", "/"], "is a directory"), (["64m", "/dev/null"], "not a regular file"),
    (["64m", "--initrd=/dev/null"], "not a regular file")])
def test_bad_words_are_one_line_before_any_guest(words, says):
    one_line(lguest(*words), says)


def test_arguments_after_dashes_go_to_the_kernel():
    assert parse_args(["64m", "--", "quiet", "--init-arg"]).kernel_args == \
        ["quiet", "--init-arg"]


# Root reads anything, through its DAC capabilities; without them it is refused, as a
# user who does not own the file would be.
WITHOUT_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
               "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.skipif(os.getuid() != 0, reason="drops root's DAC capabilities; run as root")
@pytest.mark.parametrize("what", ["kernel", "initrd"])
def test_an_unreadable_file_is_one_line(tmp_path, what):
    secret = tmp_path / "secret"
    secret.write_bytes(b"\x7fELF" + bytes(60))
    secret.chmod(0)
    args = ["64m", str(secret)] if what == "kernel" else ["64m", "--initrd", str(secret)]
    result = subprocess.run(WITHOUT_DAC + LGUEST + args, capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    one_line(result, f"cannot read the {what}")
    assert "Permission denied" in result.stderr


@given(st.lists(st.one_of(
    st.sampled_from(["64m", "1g", "0", "64MiB", "--", "--cpus", "--cpus=0", "--cpus=2", "--cpus=²",
                     "--initrd", "--initrd=/dev/null", "--run", "-v", "--verbose",
                     "--bzimage", "--block=x", "--frobnicate", "quiet", "root=/dev/vda",
                     "/", "/dev/null", "/no/such/file", "", "=", "-", "--=x"]),
    st.text(max_size=12)), max_size=6))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_command_line_starts_a_guest_or_is_one_sentence(argv):
    try:
        options = parse_args(argv)
    except LguestError as e:
        assert "\n" not in str(e) and 0 < len(str(e)) < 300
        return
    assert options.memory >= 16 << 20 and options.cpus >= 1
    assert options.kernel is None or os.path.isfile(options.kernel)


def test_a_kernel_larger_than_memory_is_one_line(tmp_path):
    beyond = tiny_vmlinux(tmp_path / "big", HALT, load_at=LOAD_AT, memsz=40 << 20)
    one_line(lguest("32m", beyond), "give the guest more than")
    above = tiny_vmlinux(tmp_path / "high", HALT, load_at=64 << 20)
    one_line(lguest("32m", above), "reaches 65 MiB")


def test_a_huge_sparse_initrd_is_refused_before_it_is_read(tmp_path):
    initrd = tmp_path / "initrd"
    with open(initrd, "wb") as f:
        f.truncate(200 << 30)                       # 200 GiB, and not a block of it on disk
    kernel = tiny_vmlinux(tmp_path / "halt", say(b"never\n", HALT))
    start = time.monotonic()
    one_line(lguest("32m", kernel, f"--initrd={initrd}"), "does not fit")
    assert time.monotonic() - start < 60            # (it was reading 200 GiB before)


def test_a_device_that_is_not_kvm_is_one_line_and_leaks_nothing():
    one_line(lguest("doctor", "--device=/dev/null"), "is not KVM")
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(LguestError, match="is not KVM"):
        Kvm("/dev/null")
    assert set(os.listdir("/proc/self/fd")) == before


# A closed pipe ends the guest as a pipeline expects.

def test_a_closed_pipe_ends_the_guest_quietly(tmp_path):
    chatter = b"".join([
        b"\xBA" + u32(0x3F8),                      # mov edx, COM1
        b"\xB0\x79",                               # again: mov al, 'y'
        b"\xEE",                                   #        out dx, al
        b"\xEB\xFB",                               #        jmp again   (-5)
    ])
    kernel = tiny_vmlinux(tmp_path / "yes", chatter)
    guest = subprocess.Popen(LGUEST + ["32m", kernel], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert guest.stdout.read(100) == b"y" * 100
    guest.stdout.close()                          # as `| head -c 100` does
    stderr = guest.communicate(timeout=120)[1].decode()
    assert guest.returncode == 128 + 13, stderr   # SIGPIPE's status, as a shell reports it
    assert "Traceback" not in stderr and "failed" not in stderr and "Broken pipe" not in stderr


# Hostile guests: what a guest can fill has a bound.

def run_tiny(code: bytes, machine: Machine, timeout: float = 120) -> None:
    write_boot_tables(machine.memory)
    machine.memory.write(CODE_ADDR, code)
    enter_long_mode(machine.vcpus[0], CODE_ADDR, stack=STACK_TOP)
    machine.start()
    assert machine.done.wait(timeout), "the hostile guest never finished"
    machine.close()


RESET = b"\xB0\xFE" + b"\xE6\x64"                 # mov al, 0xfe; out 0x64, al: reset


@pytest.mark.kvm
def test_a_guest_asking_the_keyboard_controller_forever_fills_sixteen_answers():
    asked = 20_000
    with Kvm() as kvm:
        machine = Machine(kvm, ram=[(0, 2 << 20)])
        kbc = I8042(on_reset=lambda: machine.stop(Outcome(0)))
        machine.ports.register(I8042_DATA_PORT, 5, kbc)
        run_tiny(b"".join([
            b"\xB9" + u32(asked),                  # mov ecx, asked
            b"\xB0\xAA",                           # again: mov al, 0xaa   (self test)
            b"\xE6" + bytes([I8042_COMMAND_PORT]), #        out 0x64, al
            b"\xFF\xC9",                           #        dec ecx
            b"\x75\xF8",                           #        jnz again   (-8)
            RESET]), machine)
    assert machine.outcome == Outcome(0)
    assert len(kbc.out) == OUTPUT_LIMIT
    assert kbc.read(0) == 0x55                     # the answers kept are still right


@pytest.mark.kvm
def test_a_guest_knocking_on_every_port_is_counted_not_remembered():
    with Kvm() as kvm:
        machine = Machine(kvm, ram=[(0, 2 << 20)])
        machine.ports.register(I8042_DATA_PORT, 5,
                               I8042(on_reset=lambda: machine.stop(Outcome(0))))
        run_tiny(b"".join([
            b"\xBA" + u32(0x100),                  # mov edx, 0x100
            b"\xEC",                               # again: in al, dx
            b"\xFF\xC2",                           #        inc edx
            b"\x81\xFA" + u32(0x10000),            #        cmp edx, 0x10000
            b"\x75\xF5",                           #        jne again   (-11)
            RESET]), machine)
    ports = machine.ports
    assert len(ports.unclaimed) == UNCLAIMED_LIMIT
    knocks = sum(ports.unclaimed.values()) + ports.unclaimed_elsewhere
    assert 0x10000 - 0x100 - 16 <= knocks <= 0x10000 - 0x100   # KVM's irqchip answers a
    # few ports itself (the PIC's edge/level registers at 0x4d0), which never reach us


@pytest.mark.kvm
@pytest.mark.parametrize("interrupts, ends", [(b"\xFA", True), (b"\xFB", False)],
                         ids=["cli; hlt", "sti; hlt"])
def test_a_guest_halted_for_good_ends_and_one_waiting_does_not(interrupts, ends):
    """hlt with interrupts off never returns to us (KVM's irqchip keeps the vCPU); the
    launcher's looks find it and end the guest with status 0. With interrupts on, the
    guest is only waiting, and must be left alone."""
    with Kvm() as kvm:
        machine = Machine(kvm, ram=[(0, 2 << 20)])
        write_boot_tables(machine.memory)
        machine.memory.write(CODE_ADDR, interrupts + b"\xF4\xEB\xFD")   # cli/sti; hlt; jmp hlt
        enter_long_mode(machine.vcpus[0], CODE_ADDR, stack=STACK_TOP)
        machine.start()
        try:
            for _ in range(20):
                time.sleep(0.1)
                machine.look_for_a_dead_halt()
                if machine.done.is_set():
                    break
            assert machine.done.is_set() == ends
            if ends:
                assert machine.outcome == Outcome(0)
        finally:
            machine.stop(Outcome(0))
            machine.close()


@pytest.mark.kvm
@pytest.mark.parametrize("loop", [b"\xEB\xFE", b"\xE6\x80\xEB\xFC"],
                         ids=["jmp to itself", "out 0x80 in a loop"])
def test_closing_a_machine_whose_guest_still_runs_ends_it_cleanly(loop, tmp_path):
    """close() on a running guest (a chapter's cell whose guest never finished did this)
    must end the vCPU threads before the kvm_run pages and memory are unmapped: a thread
    touching them afterwards would kill the process with SIGSEGV, not an exception. Run in
    a child process, so that such a crash is seen as one; traced, so that the sampler is
    stopped first too."""
    script = f"""
import sys, time, threading
from lguest.host.machine import Machine
from lguest.switcher import Kvm
from lguest.tiny import CODE_ADDR, STACK_TOP
from lguest.trace import Tracer
from lguest.x86 import enter_long_mode, write_boot_tables
for round in range(5):
    with Kvm() as kvm:
        machine = Machine(kvm, ram=[(0, 2 << 20)])
        Tracer({str(tmp_path / "t")!r}, {{}}).attach(machine, type("C", (), {{}})())
        write_boot_tables(machine.memory)
        machine.memory.write(CODE_ADDR, {loop!r})
        enter_long_mode(machine.vcpus[0], CODE_ADDR, stack=STACK_TOP)
        machine.start()
        time.sleep(0.3)
        began = time.monotonic()
        machine.close()
        took = time.monotonic() - began
        assert not any(t.is_alive() for t in machine.threads), "a vCPU thread lives on"
        assert machine.outcome.message == "the machine was closed while its guest ran"
        assert machine.trace.stopping.is_set() and not machine.trace.sampler.is_alive()
        machine.trace.close()
        print(f"closed in {{took:.2f}} s", flush=True)
print("ALL CLOSED")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "ALL CLOSED" in result.stdout, \
        (result.returncode, result.stdout, result.stderr[-2000:])


@pytest.mark.parametrize("verb", ["--help", "demo", "ps"])
def test_a_reader_who_stops_reading_ends_a_command_quietly(verb):
    read_end, write_end = os.pipe()
    os.close(read_end)                             # `| head` has had enough, already
    result = subprocess.run(LGUEST + [verb], stdout=write_end, stderr=subprocess.PIPE,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    os.close(write_end)
    assert result.returncode == 128 + 13, result.stderr
    assert result.stderr == ""


# Disks: a bad --block is one line, before any guest runs.

@pytest.mark.parametrize("disk, says", [
    ("/no/such/disk.img", "no such disk: /no/such/disk.img"),
    ("/", "/ is a directory, not a disk image"),
    ("/dev/null", "neither a file nor a block device"),
    ("EMPTY", "less than one 512-byte sector")])
def test_a_bad_disk_is_one_line(tmp_path, disk, says):
    kernel = tiny_vmlinux(tmp_path / "halt", say(b"ready\n", HALT))
    if disk == "EMPTY":
        disk = tmp_path / "empty.img"
        disk.write_bytes(b"x" * 100)
        says = f"the disk {disk} holds 100 bytes: " + says
    one_line(lguest("32m", kernel, f"--block={disk}"), says)


@pytest.mark.skipif(os.getuid() != 0, reason="drops root's DAC capabilities; run as root")
@pytest.mark.parametrize("mode, option, says", [
    (0, "", "Permission denied"),
    (0o444, "", "add ,ro to share it read-only"),
    (0, ",ro", "Permission denied")])
def test_a_disk_we_may_not_open_is_one_line(tmp_path, mode, option, says):
    kernel = tiny_vmlinux(tmp_path / "halt", say(b"ready\n", HALT))
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    disk.chmod(mode)
    result = subprocess.run(WITHOUT_DAC + LGUEST + ["32m", kernel, f"--block={disk}{option}"],
                            capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    one_line(result, says)


# Networks: a bad --tunnet or --sharenet is one line, before any guest runs. Taps are
# made only inside a network namespace of the test's own.

@pytest.fixture
def netns():
    name = f"lguest-hardening-{os.getpid()}-{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.skipif(os.getuid() != 0, reason="makes network namespaces; run as root")
@pytest.mark.parametrize("option, says, caps", [
    ("--tunnet=10.3.0.1", "needs root or CAP_NET_ADMIN; --sharenet=FILE needs neither",
     ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]),
    ("--tunnet=10.3.0.1,tap=lo", "the interface name lo is taken", []),
    ("--tunnet=bridge:nobridge", "there is no bridge nobridge", []),
    ("--tunnet=bridge:lo", "lo is a network interface but not a bridge", [])])
def test_a_tap_we_cannot_make_is_one_line_and_leaves_no_tap(tmp_path, netns, option, says, caps):
    kernel = tiny_vmlinux(tmp_path / "halt", say(b"ready\n", HALT))
    result = subprocess.run(["ip", "netns", "exec", netns, *caps, *LGUEST, "32m", kernel, option],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    one_line(result, says)
    links = subprocess.run(["ip", "-n", netns, "-o", "link"], capture_output=True, text=True)
    assert len(links.stdout.splitlines()) == 1, links.stdout          # lo alone


@pytest.mark.parametrize("where, says", [
    ("missing/lan", "there is no directory"), ("", "is a directory"),
    ("THESIS", "of something other than an lguest network")])
def test_a_bad_sharenet_file_is_one_line_and_left_alone(tmp_path, where, says):
    kernel = tiny_vmlinux(tmp_path / "halt", say(b"ready\n", HALT))
    path = tmp_path / where
    if where == "THESIS":
        path.write_bytes(b"Chapter 1\n" * 1000)
    one_line(lguest("32m", kernel, f"--sharenet={path}"), says)
    if where == "THESIS":
        assert path.read_bytes() == b"Chapter 1\n" * 1000


@pytest.mark.skipif(os.getuid() != 0, reason="drops root's DAC capabilities; run as root")
def test_only_who_may_write_the_sharenet_file_may_join(tmp_path):
    kernel = tiny_vmlinux(tmp_path / "halt", say(b"ready\n", HALT))
    lan = tmp_path / "lan"
    lan.touch(mode=0o644)
    os.chown(lan, 4321, 4321)                       # someone else's, readable by all
    result = subprocess.run(WITHOUT_DAC + LGUEST + ["32m", kernel, f"--sharenet={lan}"],
                            capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    one_line(result, f"you may not write {lan}, so you cannot join its network")
    assert lan.stat().st_size == 0
