"""The launcher and Host end to end, with tiny hand-made 'kernels' instead of Linux.

Each guest is a few instructions in an ELF file that the launcher loads like a vmlinux
and enters in long mode, exactly as it would enter Linux.
"""
from __future__ import annotations

import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

LGUEST = [sys.executable, "-m", "lguest"]
LOAD_AT = 0x100000
PDPT_ADDR = 0x3000               # the Switcher's page tables, which the launcher reuses
pytestmark = pytest.mark.kvm


def tiny_vmlinux(path: Path, code: bytes, load_at: int = LOAD_AT, memsz: int = 0) -> str:
    """An ELF executable with one PT_LOAD segment of `code` at 1 MiB, entered there
    (or at load_at, and memsz bytes long counting its .bss)."""
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),
                       2, 0x3E, 1, load_at, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, load_at, load_at, len(code),
                       max(memsz, len(code)), 0x1000)
    path.write_bytes((ehdr + phdr).ljust(0x1000, b"\0") + code)
    return str(path)


def say(message: bytes, then: bytes) -> bytes:
    """Code: write message to COM1 with rep outsb, then the code `then`; message after it."""
    head_len = 5 + 5 + 5 + 2
    at = LOAD_AT + head_len + len(then)
    return b"".join([b"\xBE" + struct.pack("<I", at),      # mov esi, message
                     b"\xBA" + struct.pack("<I", 0x3F8),   # mov edx, COM1
                     b"\xB9" + struct.pack("<I", len(message)),  # mov ecx, length
                     b"\xF3\x6E", then]) + message         # rep outsb; then...


HALT = b"\xFA\xF4\xEB\xFD"                # cli; hlt; jmp back to the hlt
RESET = b"\xB0\xFE\xE6\x64" + HALT        # out 0x64, 0xfe: the keyboard controller's reset


def knock(status: int) -> bytes:
    """Map the 2 MiB around the exit door (0xfeb00000) through a spare page directory at
    0x5000, then write status to the door."""
    pd = 0x5000
    return b"".join([b"\x48\xB8" + struct.pack("<Q", pd | 3),          # mov rax, pd|RW|P
                     b"\x48\x89\x04\x25" + struct.pack("<I", PDPT_ADDR + 3 * 8),  # PDPT[3]
                     b"\x48\xB8" + struct.pack("<Q", 0xFEA00083),       # mov rax, 2M page
                     b"\x48\x89\x04\x25" + struct.pack("<I", pd + 0x1F5 * 8),     # PD[0x1f5]
                     b"\xB8" + struct.pack("<I", 0xFEB00000),           # mov eax, the door
                     b"\xC6\x00" + bytes([status]), HALT])              # mov byte [rax], status


def pvpanic() -> bytes:
    """Code: as Linux's pvpanic-pci driver on a panic: switch on memory decoding for the
    device in slot 31, map the 2 MiB page where its BAR is, write PVPANIC_PANICKED."""
    from lguest.drivers.virtio import BAR_SIZE
    from lguest.launcher.layout import PCI_WINDOW_START
    from lguest.launcher.main import PVPANIC_SLOT
    bar, pd = PCI_WINDOW_START + PVPANIC_SLOT * BAR_SIZE, 0x5000
    command = 0x80000000 | PVPANIC_SLOT << 11 | 0x04              # its COMMAND register
    return b"".join([b"\xB8" + struct.pack("<I", command),       # mov eax, address
                     b"\x66\xBA\xF8\x0C\xEF",                   # mov dx, 0xcf8; out dx, eax
                     b"\x66\xBA\xFC\x0C\x66\xB8\x02\x00\x66\xEF",  # out 0xcfc, ax=MEMORY
                     b"\x48\xB8" + struct.pack("<Q", pd | 3),
                     b"\x48\x89\x04\x25" + struct.pack("<I", PDPT_ADDR + 3 * 8),
                     b"\x48\xB8" + struct.pack("<Q", (bar & ~0x1FFFFF) | 0x83),
                     b"\x48\x89\x04\x25" + struct.pack("<I", pd + (bar - 0xC0000000 >> 21) * 8),
                     b"\xB8" + struct.pack("<I", bar),                     # mov eax, the BAR
                     b"\xC6\x00\x01"])                                  # mov byte [rax], 1


def launch(kernel: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(LGUEST + ["32m", kernel, *args], capture_output=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_the_guest_chooses_the_exit_status(tmp_path):
    result = launch(tiny_vmlinux(tmp_path / "door", say(b"knock knock\n", knock(42))))
    assert result.returncode == 42, result.stderr
    assert result.stdout == b"knock knock\n"
    assert b"Traceback" not in result.stderr


def test_keyboard_controller_reset_ends_the_guest_cleanly(tmp_path):
    result = launch(tiny_vmlinux(tmp_path / "reset", say(b"rebooting\n", RESET)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"rebooting\n"


def test_acpi_poweroff_ends_the_guest_cleanly(tmp_path):
    """As Linux powers off through our FADT: SLP_TYP=5 to PM1a_CNT, then with SLP_EN."""
    poweroff = (b"\x66\xBA\x04\x06" b"\x66\xB8\x00\x14" b"\x66\xEF"   # mov dx, 0x604;
                b"\x66\xB8\x00\x34" b"\x66\xEF" + HALT)           # mov ax, 0x1400/0x3400; out dx, ax
    result = launch(tiny_vmlinux(tmp_path / "off", say(b"powering off\n", poweroff)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"powering off\n"


def test_a_kernel_that_halts_for_good_ends_the_guest_cleanly(tmp_path):
    """Linux without ACPI turns poweroff into halt: it says so, then stops every CPU."""
    said = b"[   21.5] reboot: System halted\r\n"
    result = launch(tiny_vmlinux(tmp_path / "halted", say(said, HALT)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == said


def test_a_kernel_panic_is_one_line_and_its_own_status(tmp_path):
    panic = (b"Kernel panic - not syncing: Attempted to kill the idle task!\r\n"
             b"CPU: 0 PID: 0\r\n---[ end Kernel panic - not syncing: Attempted ]---\r\n")
    result = launch(tiny_vmlinux(tmp_path / "panic", say(panic, pvpanic() + HALT)),
                    "--verbose")
    assert result.returncode == 100
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last == "lguest: the guest kernel panicked: Attempted to kill the idle task!"


def test_a_panic_with_timestamps_ends_a_guest_that_spins_on(tmp_path):
    """Linux stamps its lines with the time, and after a panic it spins with interrupts
    on: pvpanic must end the guest by itself."""
    panic = (b"[   71.342681] Kernel panic - not syncing: Attempted to kill init!\r\n"
             b"[   71.355388] Kernel Offset: disabled\r\n"
             b"[   71.363578] ---[ end Kernel panic - not syncing: Attempted to kill init! ]---\r\n")
    spin = b"\xFB\xEB\xFE"                                   # sti; jmp to itself
    result = launch(tiny_vmlinux(tmp_path / "panic", say(panic, pvpanic() + spin)),
                    timeout=60)
    assert result.returncode == 100
    assert result.stderr.decode().strip().splitlines()[-1] == \
        "lguest: the guest kernel panicked: Attempted to kill init!"


def spawn(kernel: str, *options: str):
    child = pexpect.spawn(LGUEST[0], LGUEST[1:] + ["32m", kernel, *options], timeout=120)
    child.expect("ready")
    return child


def cooked(child) -> bool:
    """Is the pty back in canonical mode with echo, as we found it?"""
    lflag = termios.tcgetattr(child.child_fd)[3]
    return bool(lflag & termios.ICANON and lflag & termios.ECHO)


def test_three_ctrl_c_end_the_guest_and_restore_the_terminal(tmp_path):
    child = spawn(tiny_vmlinux(tmp_path / "halt", say(b"ready\n", HALT)))
    assert not cooked(child)                      # raw while the guest runs
    child.send("\x03")
    child.send("\x03\x03")
    child.expect(pexpect.EOF)
    assert cooked(child)
    child.close()
    assert child.exitstatus == 130
    assert b"three Ctrl-C" in child.before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                                    signal.SIGUSR2, signal.SIGALRM],
                         ids=lambda s: signal.Signals(s).name)
def test_a_signal_ends_the_guest_and_restores_the_terminal(tmp_path, signum):
    child = spawn(tiny_vmlinux(tmp_path / "halt", say(b"ready\n", HALT)))
    child.kill(signum)
    child.expect(pexpect.EOF)
    assert cooked(child)
    child.close()
    assert child.exitstatus == 128 + signum


def test_lguest_ps_lists_a_running_guest_and_its_devices(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    child = spawn(tiny_vmlinux(tmp_path / "halt", say(b"ready\n", HALT)),
                  f"--block={disk},ro", "--rng")
    listing = subprocess.run(LGUEST + ["ps"], capture_output=True, text=True, timeout=60)
    child.kill(signal.SIGTERM)
    child.expect(pexpect.EOF)
    child.close()
    lines = listing.stdout.splitlines()
    row = [i for i, line in enumerate(lines) if line.split()[0] == str(child.pid)]
    assert row and "32M" in lines[row[0]] and "halt" in lines[row[0]], listing.stdout
    assert lines[row[0] + 1].split() == ["devices:", "virtio-console,", "virtio-blk",
                                         f"{disk}", "(read-only),", "virtio-rng"]


def test_mxcsr_loads_and_stores_are_finished_for_the_emulator(tmp_path):
    """ldmxcsr through a SIB operand, stmxcsr rip-relative: KVM's emulator knows neither
    (where kernel mode is emulated, the Host finishes them); the guest checks the round
    trip and says 43 if MXCSR came back as it went in."""
    data = LOAD_AT + 0x100                       # MXCSR's value here, its copy at +4
    head = b"".join([b"\x0F\x20\xE0", b"\x0D\x00\x02\x00\x00", b"\x0F\x22\xE0",  # CR4.OSFXSR
                     b"\x0F\xAE\x14\x25" + struct.pack("<I", data)])            # ldmxcsr
    stmxcsr_end = LOAD_AT + len(head) + 7
    head += b"\x0F\xAE\x1D" + struct.pack("<i", data + 4 - stmxcsr_end)          # stmxcsr
    head += b"\x81\x3C\x25" + struct.pack("<II", data + 4, 0x1F2B)               # cmp
    ok = knock(43)
    code = head + b"\x75" + bytes([len(ok)]) + ok + knock(1)                     # jne
    code = code.ljust(0x100, b"\x90") + struct.pack("<II", 0x1F2B, 0)
    result = launch(tiny_vmlinux(tmp_path / "mxcsr", code), "--verbose")
    assert result.returncode == 43, result.stderr
