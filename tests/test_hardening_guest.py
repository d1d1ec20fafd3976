"""Hardening, round two (issue 20): the guest's console input, how a guest ends, the
command line the launcher builds, and the readers of `lguest trace` and `lguest ps`.

Each test goes through the front door (`python -m lguest ...`) where it can, and each
fails on the code before its fix.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from test_hardening import lguest, one_line
from test_host_tinyguests import HALT, knock, say, tiny_vmlinux

LGUEST = [sys.executable, "-m", "lguest"]


def echo(count: int) -> bytes:
    """Code: read `count` bytes from COM1 (polling LSR for data ready) and write each
    back as it comes."""
    wait = b"\x66\xBA\xFD\x03" b"\xEC" b"\xA8\x01" b"\x74\xFB"   # mov dx, LSR; in; test DR; jz
    take = b"\x66\xBA\xF8\x03" b"\xEC" b"\xEE"                   # mov dx, RX; in al; out al
    body = wait + take
    return (b"\xB9" + struct.pack("<I", count) + body          # mov ecx, count; body...
            + b"\xE2" + bytes([(-(len(body) + 2)) & 0xFF]))     # loop body


def piped(kernel: str, data: bytes, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(LGUEST + ["32m", kernel], input=data, capture_output=True,
                          timeout=timeout)


# Console input (items 4 and 7).

@pytest.mark.kvm
def test_ctrl_c_bytes_from_a_pipe_are_data_for_the_guest(tmp_path):
    """Three 0x03 in piped input are the guest's to read; only a terminal presses Ctrl-C."""
    kernel = tiny_vmlinux(tmp_path / "echo3", say(b"ready\n", echo(3) + knock(7)))
    result = piped(kernel, b"\x03\x03\x03")
    assert result.returncode == 7, result.stderr
    assert result.stdout == b"ready\n\x03\x03\x03"


@pytest.mark.kvm
def test_piped_input_waits_for_the_guest_and_none_is_lost(tmp_path):
    """Far more than the serial port holds, piped in at once: the guest reads every byte,
    in order (before, all past the first 4 KiB was dropped and the guest waited forever)."""
    data = bytes(range(4, 256)) * 80                  # 20,160 bytes, and no Ctrl-C among them
    kernel = tiny_vmlinux(tmp_path / "echo", say(b"", echo(len(data)) + knock(0)))
    result = piped(kernel, data, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data
