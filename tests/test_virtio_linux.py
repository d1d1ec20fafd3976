"""The virtio devices through a real Linux guest: the lean guest, end to end.

One boot checks the disks (two, one read-only and not a whole number of sectors), the
entropy device and hvc0, writes and flushes a mark, and is then killed with SIGKILL:
the mark must be in the file. A second boot gives the guest its shell on hvc0, with
MSI switched off so that the devices interrupt through INTx and the firmware's tables.

The guest's commands avoid pipelines: a freshly started busybox in a pipeline now and
then dies of the known TLS segfault (tests/test_linux.py's TLS_SEGFAULT).
"""
from __future__ import annotations

import hashlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm
LGUEST = [sys.executable, "-m", "lguest"]
MIB = 1 << 20


@pytest.fixture(scope="module")
def lean():
    from lguest.guest import lean_guest
    return lean_guest()


def read_until(proc: subprocess.Popen, marker: bytes, timeout: float) -> bytes:
    """The launcher's output until `marker`, its end, or `timeout` seconds: never longer."""
    out, start = b"", time.monotonic()
    while marker not in out and time.monotonic() - start < timeout:
        if not select.select([proc.stdout], [], [], 1.0)[0]:
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        out += chunk
    return out


def test_disks_entropy_and_hvc0_and_a_flushed_write_survives_kill_9(lean, tmp_path):
    vda, vdb = tmp_path / "a.img", tmp_path / "b.img"
    vda.write_bytes(os.urandom(MIB))
    vdb.write_bytes(os.urandom(MIB // 2 + 100))          # not a whole number of sectors
    vda_before = vda.read_bytes()
    script = "; ".join([
        "ls /sys/bus/pci/devices",
        "sha256sum /dev/vda /dev/vdb",
        "cat /sys/block/vda/size /sys/block/vdb/size /sys/block/vdb/ro /sys/block/vda/serial",
        "echo",
        "dd if=/dev/hwrng of=/tmp/random bs=64 count=1 2>/dev/null",
        "od -An -tx1 -v /tmp/random",
        "echo hello from hvc0 > /dev/hvc0",
        "printf MARK-ONE > /tmp/mark",
        "dd if=/tmp/mark of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null && echo WROTE",
        "dd if=/tmp/mark of=/dev/vdb bs=512 seek=8 conv=fsync 2>/dev/null || echo REFUSED",
        "printf MARK-TWO > /tmp/mark",
        "dd if=/tmp/mark of=/dev/vda bs=512 seek=1000 conv=fsync 2>/dev/null && echo FLUSHED",
        "sleep 1000"])
    proc = subprocess.Popen(LGUEST + ["128m", str(lean.vmlinux), f"--initrd={lean.initrd}",
                                      f"--block={vda}", f"--block={vdb},ro", "--rng",
                                      "--run", script],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        out = read_until(proc, b"FLUSHED", 600)
        proc.send_signal(signal.SIGKILL)                   # no goodbye: the file must hold
    finally:
        proc.kill()
        proc.wait()
    text = out.decode(errors="replace").replace("\r\n", "\n")
    assert "FLUSHED" in text, text[-3000:]
    # the launcher said how it rounded the read-only disk
    assert f"{vdb} is {MIB // 2 + 100} bytes, not a whole number of 512-byte sectors; " \
           f"the guest sees the first {MIB // 2}" in text
    # the host bridge, the console, two disks and the entropy source, and pvpanic in slot 31
    listed = set(re.findall(r"0000:00:[01][0-9a-f]\.0(?=\s)", text))   # ls may print two rows
    assert listed == {f"0000:00:0{slot}.0" for slot in range(5)} | {"0000:00:1f.0"}, \
        text[-3000:]
    assert f"{hashlib.sha256(vda_before).hexdigest()}  /dev/vda" in text
    assert f"{hashlib.sha256(vdb.read_bytes()[:MIB // 2]).hexdigest()}  /dev/vdb" in text
    assert re.search(r"^2048\n1024\n1\na\.img$", text, re.M), text[-3000:]
    random_bytes = re.search(r"((?: [0-9a-f]{2}){16}\n){4}", text)
    assert random_bytes and len(set(random_bytes.group(0).split())) > 16
    assert "hello from hvc0" in text
    assert "WROTE" in text and "REFUSED" in text
    after = vda.read_bytes()
    assert after[8 * 512:8 * 512 + 8] == b"MARK-ONE"
    assert after[1000 * 512:1000 * 512 + 8] == b"MARK-TWO"
    assert after[:8 * 512] == vda_before[:8 * 512]      # nothing else moved
    assert vdb.read_bytes()[8 * 512:8 * 512 + 8] != b"MARK-ONE"


def test_a_shell_on_hvc0_with_interrupts_through_intx(lean, tmp_path):
    """console=hvc0: the kernel and the shell speak through the virtio console, and what
    we type reaches it; pci=nomsi: every device interrupts on its INTx pin, routed by the
    MP table."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(MIB))
    proc = subprocess.Popen(LGUEST + ["128m", str(lean.vmlinux), f"--initrd={lean.initrd}",
                                      f"--block={disk}", "--rng", "--",
                                      "console=hvc0", "pci=nomsi"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        out = read_until(proc, b"leave the shell to stop the guest", 600)
        proc.stdin.write(b"sha256sum /dev/vda; cat /proc/interrupts; "
                         b"echo answer-$((6 * 7)); poweroff -f\n")
        proc.stdin.flush()
        out += proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
        proc.wait()
    text = out.decode(errors="replace").replace("\r\n", "\n")
    assert "answer-42" in text, text[-3000:]
    assert f"{hashlib.sha256(disk.read_bytes()).hexdigest()}  /dev/vda" in text
    assert re.search(r"IO-APIC\s+1[6-9]-fasteoi\s+virtio", text), text[-3000:]
    assert "PCI-MSI" not in text
    assert "console [hvc0] enabled" in text
    # hvc0 is the console; the serial port keeps only the earliest messages (earlyprintk)
    assert "console=ttyS0" not in text.split("Command line:")[1].split("\n")[0]
    assert proc.returncode == 0


def root_disk(initrd: Path, tree: Path, image: Path, marker: str) -> None:
    """An ext4 root filesystem, made as Debian makes them (mke2fs -d): the guest's own
    busybox with a link for each of its commands, and its /init as /sbin/init."""
    from lguest.guest import read_cpio
    files = {e.name: e.data for e in read_cpio(initrd.read_bytes())}
    for name in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root"):
        (tree / name).mkdir(parents=True)
    busybox = tree / "bin" / "busybox"
    busybox.write_bytes(files["bin/busybox"])
    busybox.chmod(0o755)
    for applet in subprocess.run([busybox, "--list"], capture_output=True, text=True,
                                 check=True).stdout.split():
        if applet != "busybox":
            (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc" / "fstab").write_bytes(files["etc/fstab"])
    (tree / "sbin" / "init").write_bytes(files["init"])
    (tree / "sbin" / "init").chmod(0o755)
    (tree / "etc" / "rootdisk").write_text(marker + "\n")
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, image, "32M"],
                   check=True, env={**os.environ, "PATH": "/usr/sbin:/sbin:" + os.environ["PATH"]})


def test_a_root_disk_becomes_the_guests_root(lean, tmp_path):
    image, marker = tmp_path / "root.img", f"root-disk-{os.getpid()}"
    root_disk(Path(lean.initrd), tmp_path / "tree", image, marker)
    run = subprocess.run(LGUEST + ["128m", str(lean.vmlinux), f"--initrd={lean.initrd}",
                                   f"--block={image}", "--run",
                                   "cat /etc/rootdisk /proc/mounts; exit 5", "root=/dev/vda"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, timeout=600)
    text = run.stdout.decode(errors="replace").replace("\r\n", "\n")
    assert marker in text, text[-3000:]
    assert re.search(r"^/dev/vda / ext4 rw", text, re.M), text[-3000:]
    assert run.returncode == 5
