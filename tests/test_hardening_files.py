"""Hardening, round two: the files we write are never inputs and never followed through
links; the files we read are locked, opened without blocking and named safely.

Every case goes through the front door (`python -m lguest`) with a tiny hand-made guest.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from test_hardening import LGUEST, lguest, one_line
from test_host_tinyguests import HALT, RESET, say, tiny_vmlinux
from lguest.drivers.sharenet import FILE_SIZE
from lguest.tiny import u32


@pytest.fixture
def kernel(tmp_path) -> str:
    return tiny_vmlinux(tmp_path / "k", say(b"ready\n", HALT))


def last_line(result: subprocess.CompletedProcess, says: str, status: int = 1) -> None:
    """A guest that ran (so the slow host may have had its say first) ends with one line."""
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    assert says in result.stderr.strip().splitlines()[-1], result.stderr


# Item 1, 10, 12: --trace=FILE never destroys an input, never blocks, never follows a link.

@pytest.mark.parametrize("target, says", [
    ("KERNEL", "would overwrite"), ("DISK", "would overwrite"), ("INITRD", "would overwrite"),
    ("HARDLINK", "would overwrite"), ("LAN", "would overwrite"),
    ("SYMLINK", "is a symbolic link"), ("FIFO", "is a FIFO"),
    ("/dev/full", "is a device"), ("/", "is a directory")])
def test_a_trace_onto_an_input_or_a_non_file_is_one_line_and_changes_nothing(
        tmp_path, kernel, target, says):
    disk, initrd = tmp_path / "disk.img", tmp_path / "initrd"
    disk.write_bytes(b"precious" * 512)
    initrd.write_bytes(b"also precious")
    lan = tmp_path / "lan"
    files = {"KERNEL": kernel, "DISK": str(disk), "INITRD": str(initrd), "LAN": str(lan)}
    if target == "HARDLINK":
        os.link(disk, tmp_path / "other-name")
        files[target] = str(tmp_path / "other-name")
    elif target == "SYMLINK":
        (tmp_path / "link").symlink_to(disk)
        files[target] = str(tmp_path / "link")
    elif target == "FIFO":
        os.mkfifo(tmp_path / "fifo")
        files[target] = str(tmp_path / "fifo")
    before = {p: open(p, "rb").read() for p in (kernel, disk, initrd)}
    args = ["32m", kernel, f"--block={disk}", f"--initrd={initrd}",
            f"--trace={files.get(target, target)}"]
    if target == "LAN":
        args += [f"--sharenet={lan}"]             # made by the launcher, before the trace
    one_line(lguest(*args, timeout=60), says)
    assert {p: open(p, "rb").read() for p in before} == before
    if target == "LAN":
        assert lan.stat().st_size == FILE_SIZE


def test_a_trace_is_written_only_once_the_disks_are_found_good(tmp_path, kernel):
    old = tmp_path / "old.trace"
    old.write_bytes(b"yesterday's trace")
    one_line(lguest("32m", kernel, "--block=/no/such/disk", f"--trace={old}"), "no such disk")
    assert old.read_bytes() == b"yesterday's trace"


# Many exits (an unclaimed port, again and again), then the keyboard controller's reset.
KNOCKS = 30_000
CHATTY = b"".join([b"\xB9" + u32(KNOCKS),         # mov ecx, KNOCKS
                   b"\xE6\x80",                   # again: out 0x80, al
                   b"\xFF\xC9",                   #        dec ecx
                   b"\x75\xFA"]) + RESET          #        jnz again   (-6)


@pytest.mark.skipif(os.getuid() != 0, reason="mounts a small tmpfs; run as root")
def test_a_disk_that_fills_under_the_trace_is_one_line_at_the_end(tmp_path):
    kernel = tiny_vmlinux(tmp_path / "chatty", CHATTY)
    small = tmp_path / "small"
    small.mkdir()
    script = (f"mount -t tmpfs -o size=64k lguest-full {small} && "
              f"exec {sys.executable} -m lguest 32m {kernel} --trace={small}/t")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)
    last_line(result, "stops short: No space left on device")


# Item 16: --plot's picture is a file we write, too.

@pytest.fixture
def trace(tmp_path, kernel) -> str:
    path = tmp_path / "boot.trace"
    assert lguest("32m", kernel, f"--trace={path}").returncode == 0
    return str(path)


@pytest.mark.parametrize("out, says", [
    ("/proc/nope.svg", "cannot write the picture /proc/nope.svg"),
    ("FOLDER", "is a directory"),
    ("LINK", "is a symbolic link"), ("TRACE", "would overwrite")])
def test_a_picture_that_cannot_be_drawn_there_is_one_line(tmp_path, trace, out, says):
    if out == "FOLDER":
        out = str(tmp_path / "pictures.svg")
        os.mkdir(out)
    elif out == "LINK":
        out = str(tmp_path / "full.svg")
        os.symlink("/dev/full", out)
    elif out == "TRACE":
        out = str(tmp_path / "boot.svg")
        os.link(trace, out)
    before = open(trace, "rb").read()
    one_line(lguest("trace", trace, "--plot", out), says)
    assert open(trace, "rb").read() == before
