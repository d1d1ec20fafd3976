"""Real Linux guests, verified in stages (DESIGN.md section 5).

Debian's kernel is checked to its early checkpoints on every KVM (through its own XZ
decompressor only where kernel mode is hardware), the lean guest end to end, and the tests marked `bed` boot the default guest to user space with every device:
where kernel mode is emulated (this machine) that takes twenty minutes a boot, so they run
in the bed, the users' kind of KVM (tests/test_bed.py). Each boot is stopped (SIGTERM) as soon as what we came to see has been printed.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lguest.launcher import layout as L
from test_virtio_linux import root_disk

pytestmark = pytest.mark.kvm
LGUEST = [sys.executable, "-m", "lguest"]
ROOT_MARK = "a root disk made by mke2fs -d"
E820_LINE = re.compile(r"BIOS-e820: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\] (\w+)")


class Console:
    """One run of the launcher, its console read as it comes.

    Reading stops when every `wanted` string has appeared (the launcher is then stopped
    with SIGTERM), when the launcher ends, or after `timeout` seconds. `seen` says when
    each of `milestones` first appeared.
    """

    def __init__(self, args: list[str], timeout: float, wanted: list[str] = (),
                 milestones: list[str] = (), prefix: list[str] = ()):
        proc = subprocess.Popen([*prefix, *LGUEST, *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, start = b"", time.monotonic()
        self.seen = {}
        try:
            while time.monotonic() - start < timeout:
                if wanted and all(w.encode() in out for w in wanted):
                    break
                if select.select([proc.stdout], [], [], 1.0)[0]:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    out += chunk
                    for milestone in milestones:
                        if milestone.encode() in out:
                            self.seen.setdefault(milestone, round(time.monotonic() - start))
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            out += proc.communicate(timeout=30)[0]
        self.status = proc.returncode
        self.text = out.decode(errors="replace")


def boot_until(args: list[str], wanted: list[str], timeout: float) -> str:
    """Run lguest until every string in `wanted` has appeared on the console; stop it."""
    text = Console(args, timeout, wanted=wanted).text
    missing = [w for w in wanted if w not in text]
    assert not missing, f"never saw {missing}; the console said:\n{text[-3000:]}"
    return text


@pytest.fixture(scope="module")
def debian():
    from lguest.guest import default_guest
    return default_guest()


def expected_cmdline(user_args: list[str]) -> str:
    from lguest.doctor import kernel_mode_emulated
    from lguest.host.emulation import emulation_workarounds
    from lguest.launcher.main import kernel_cmdline
    return kernel_cmdline("", user_args, None, emulation_workarounds(kernel_mode_emulated())[0])


def ramdisk_line(initrd, memory: int = 256 << 20) -> str:
    """The line Linux prints for the initrd, where the launcher will have put it."""
    from lguest.launcher.load import LoadedKernel, place_initrd
    size = initrd.stat().st_size
    start = place_initrd(size, memory, LoadedKernel(0, 0, None, 0x7FFFFFFF, ""))
    end = (start + size + 0xFFF) & ~0xFFF
    return f"RAMDISK: [mem {start:#010x}-{end - 1:#010x}]"


def printed_e820(text: str) -> list[tuple[int, int, int]]:
    return [(int(a, 16), int(b, 16) - int(a, 16) + 1,
             L.E820_RAM if kind == "usable" else L.E820_RESERVED)
            for a, b, kind in E820_LINE.findall(text)]


def early_checkpoints(marker: str, initrd) -> list[str]:
    return ["Linux version", f"Command line: {expected_cmdline([marker])}\r\n",
            "Hypervisor detected: KVM", "kvm-clock: Using msrs", ramdisk_line(initrd)]


def test_debian_kernel_early_checkpoints_through_vmlinux(debian):
    marker = f"lguest.test={secrets.token_hex(4)}"
    text = boot_until(["256m", str(debian.kernel), f"--initrd={debian.initrd}", marker],
                      early_checkpoints(marker, debian.initrd), timeout=600)
    assert printed_e820(text) == L.e820_map(256 << 20)


def through_its_own_decompressor(guest) -> None:
    marker = f"lguest.test={secrets.token_hex(4)}"
    boot_until(["256m", str(guest.kernel), "--bzimage", marker],
               ["Linux version", f"Command line: {expected_cmdline([marker])}\r\n"],
               timeout=900)


@pytest.mark.bed
def test_debian_kernel_through_its_own_decompressor(debian):
    """Debian's generic kernel is XZ: where kernel mode is emulated its decompressor had
    not finished after fifteen minutes (the lean guest's LZ4, below, stands in there)."""
    through_its_own_decompressor(debian)


def test_lean_kernel_through_its_own_decompressor(lean):
    through_its_own_decompressor(lean)


@pytest.mark.slow
@pytest.mark.bed
def test_default_guest_brings_up_two_cpus_and_takes_our_acpi_tables(debian):
    """Debian's kernel learns its CPUs from our MADT, and its power-off from our FADT.

    Where kernel mode is emulated this boot also meets Linux patching its own code on one
    CPU while the other runs it (an int3 fetched, then rewritten before the repair looked:
    chapter V), in three boots of four that we watched here.
    """
    text = boot_until(["256m", "debian", "--cpus=2"],
                      ["smp: Brought up 1 node, 2 CPUs", "ACPI: PM: (supports S0 S5)"],
                      timeout=1200)
    assert "Unable to enable ACPI" not in text and "ACPI Error" not in text


@pytest.fixture(scope="module")
def default_run(debian, tmp_path_factory):
    """The one slow boot: Debian's kernel, its modules loaded by /init, its root on a
    virtio disk (Debian's mke2fs made it), a second disk read-only, a network card on a
    tap in a namespace of the test's own, then a command."""
    where = tmp_path_factory.mktemp("default-guest")
    root_disk(Path(debian.initrd), where / "tree", where / "root.img", ROOT_MARK)
    data = where / "data.img"
    data.write_bytes(os.urandom(1 << 20))
    command = ("uname -r; cat /etc/rootdisk; sha256sum /dev/vdb; ls /sys/bus/pci/devices; "
               "ip -4 addr show dev eth0; ping -c 1 -W 60 192.168.19.1 >/dev/null && "
               "echo PINGED-THE-HOST; "
               "sed 's/ .*//' /proc/modules | sort | tr '\\n' ' '; echo; exit 7")
    netns = f"lguest-default-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        # --run makes the kernel quiet; loglevel=7, last, has it say "Run /init" again.
        run = Console(["256m", "debian", f"--block={where / 'root.img'}", f"--block={data},ro",
                       "--tunnet=192.168.19.1", "--rng", "--run", command, "root=/dev/vda",
                       "loglevel=7"], timeout=3000,
                      milestones=["Linux version", "Run /init as init process",
                                  "\n" + debian.manifest["kernel_release"]],
                      prefix=["ip", "netns", "exec", netns])
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    print("default guest milestones (s):", run.seen, file=sys.stderr)
    run.text = run.text.replace("\r\n", "\n")
    run.data_sha256 = hashlib.sha256(data.read_bytes()).hexdigest()
    return run


@pytest.mark.slow
@pytest.mark.bed
def test_default_guest_reaches_init_and_the_launcher_reports_its_end(default_run):
    assert "Run /init as init process" in default_run.text, default_run.text[-3000:]
    assert "Kernel panic" not in default_run.text
    assert default_run.status == 7, default_run.text[-3000:]     # not 143: it ended itself


# A known bug, open (Mastery's "What next?"): now and then a freshly exec'd busybox in the
# command's pipeline reads zeros from its own TLS block and dies in glibc's __ctype_init.
# Seen in 3 of 6 default-guest runs on this host in December 2026, with the last landed
# commit as with this one; once on the lean guest too. It is reported, with its console
# line, as an expected failure; any other way of failing fails.
TLS_SEGFAULT = re.compile(r"^.*: segfault at 0 ip 00000000004a4d02 .* in busybox.*$", re.M)


@pytest.mark.slow
@pytest.mark.bed
def test_default_guest_boots_its_root_disk_and_finds_the_pci_devices(default_run):
    """Debian's kernel finds the bus through ACPI (the DSDT's root bridge), its virtio
    modules bind the console, two disks, the network card and the entropy source, /init
    gives eth0 the address --tunnet implies and switches to the root disk, and the command
    reads the read-only disk there and pings the host."""
    text = default_run.text
    assert "ACPI: PCI Root Bridge [PCI0]" in text, text[-3000:]
    assert "init: switching to the root filesystem on /dev/vda" in text, text[-3000:]
    # the kernel (loglevel=7) may finish the line: the mark starts it
    assert re.search(rf"^{ROOT_MARK}", text, re.M), text[-3000:]
    assert f"{default_run.data_sha256}  /dev/vdb" in text, text[-3000:]
    listed = set(re.findall(r"0000:00:[01][0-9a-f]\.0(?=\s)", text))   # ls may print two rows
    assert listed == {f"0000:00:0{slot}.0" for slot in range(6)} | {"0000:00:1f.0"}, \
        text[-3000:]                                                # and pvpanic in slot 31
    assert "inet 192.168.19.2/24" in text and "PINGED-THE-HOST" in text, text[-3000:]


@pytest.mark.slow
@pytest.mark.bed
def test_default_guest_runs_a_command_with_its_modules_loaded(default_run, debian):
    modules = " ".join(sorted(debian.manifest["modules"]))
    release = re.escape(debian.manifest["kernel_release"])
    # the kernel (loglevel=7) may finish a line the command began: match its start
    assert re.search(rf"^{release}", default_run.text, re.M), default_run.text[-3000:]
    crash = TLS_SEGFAULT.search(default_run.text)
    if crash and not re.search(rf"^{modules} $", default_run.text, re.M):
        pytest.xfail(f"the known busybox TLS segfault hit the command: {crash.group(0)}")
    assert re.search(rf"^{modules} $", default_run.text, re.M), default_run.text[-3000:]
    assert "could not load" not in default_run.text
    assert default_run.status == 7


@pytest.fixture(scope="module")
def lean():
    from lguest.guest import lean_guest
    return lean_guest()


def test_lean_guest_boots_to_init(lean):
    marker = f"lguest.test={secrets.token_hex(4)}"
    text = boot_until(["256m", str(lean.vmlinux), f"--initrd={lean.initrd}", marker],
                      early_checkpoints(marker, lean.initrd) + ["Run /init as init process"],
                      timeout=600)
    assert printed_e820(text) == L.e820_map(256 << 20)
    assert "Kernel panic" not in text


def test_with_no_kernel_lguest_boots_the_guest_this_machine_suits(lean):
    """Where kernel mode is emulated, the lean guest, and one line saying so; on hardware
    KVM, Debian's kernel."""
    from lguest.doctor import kernel_mode_emulated
    run = subprocess.run(LGUEST + ["128m", "--run", "uname -r; exit 3"], capture_output=True,
                         text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert run.returncode == 3, run.stderr
    if kernel_mode_emulated():
        assert lean.manifest["kernel_release"] in run.stdout
        said = [line for line in run.stderr.splitlines() if "lean guest" in line]
        assert len(said) == 1 and "`lguest MEM debian`" in said[0]
    else:
        from lguest.guest import default_guest
        assert default_guest().manifest["kernel_release"] in run.stdout
        assert "lean guest" not in run.stderr


def test_lean_guest_brings_up_two_cpus(lean):
    boot_until(["256m", str(lean.vmlinux), f"--initrd={lean.initrd}", "--cpus=2"],
               ["smp: Brought up 1 node, 2 CPUs", "Total of 2 processors activated"],
               timeout=600)
