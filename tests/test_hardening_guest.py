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
from test_host_tinyguests import HALT, knock, pvpanic, say, tiny_vmlinux

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


# How a guest ends (item 6): devices decide, not words.

BANNER = (b"Kernel panic - not syncing: only words\r\n"
          b"---[ end Kernel panic - not syncing: only words ]---\r\n")


@pytest.mark.kvm
@pytest.mark.parametrize("words", [b"reboot: Power down\r\n", b"reboot: System halted\r\n",
                                   BANNER], ids=["power-down", "halted", "panic"])
def test_words_on_the_console_end_nothing(tmp_path, words):
    """A program may print what a dying kernel prints; the guest goes on to its own end."""
    kernel = tiny_vmlinux(tmp_path / "words", say(words, knock(5)))
    result = subprocess.run(LGUEST + ["32m", kernel], capture_output=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 5, result.stderr
    assert result.stdout == words


@pytest.mark.kvm
def test_pvpanic_ends_a_guest_that_printed_nothing(tmp_path):
    kernel = tiny_vmlinux(tmp_path / "silent", pvpanic() + b"\xFB\xEB\xFE")   # sti; spin
    result = lguest("32m", kernel, timeout=60)
    assert result.returncode == 100
    assert result.stderr.strip().splitlines()[-1] == "lguest: the guest kernel panicked"


# The command line (items 20, 21, 22, 25, 26).

def test_too_many_devices_counts_every_one_in_good_grammar():
    result = lguest("32m", *["--block=a"] * 28, "--sharenet=lan", "--rng")
    one_line(result, "30 devices (28 disks, 1 network, an entropy source) are more than")


@pytest.mark.parametrize("words, says", [
    (["--tunnet=10.9.0.1,tap=."], "not . or .."), (["--tunnet=10.9.0.1,tap=.."], "not . or .."),
    (["--tunnet=bridge:a/b c"], "cannot be a bridge's name"),
    (["--tunnet=bridge:.."], "cannot be a bridge's name"),
    (["--tunnet=224.0.0.1"], "is a multicast address"),
    (["--tunnet=0.0.0.1"], "is a 'this network' address"),
    (["--tunnet=127.0.0.5"], "is a loopback address"),
    (["--tunnet=240.0.0.1"], "is a reserved address"),
    (["--tunnet=10.9.0.1", "--tunnet=10.9.0.1"], "two --tunnet in 10.9.0.0/24"),
    (["--tunnet=10.9.0.1", "--tunnet=10.9.0.7"], "two --tunnet in 10.9.0.0/24"),
    (["-x"], "unknown option -x"), (["32m", "-s"], "kernel arguments go after --")])
def test_bad_network_words_and_options_are_one_line(words, says):
    """Refused before any tap is made or any guest is built (no root needed to see it)."""
    one_line(lguest(*words), says)


def test_doctor_with_an_empty_device_is_one_line():
    one_line(lguest("doctor", "--device="), "--device= needs a path")


# The command line the launcher builds (items 11, 23).

@pytest.mark.kvm
def test_a_run_command_that_is_not_utf8_travels_as_its_bytes(tmp_path):
    kernel = tiny_vmlinux(tmp_path / "door", say(b"", knock(0)))
    result = subprocess.run(LGUEST + ["32m", kernel, b"--run=caf\xe9 \xff"],
                            capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr


def test_the_command_line_is_quiet_from_the_first_word_and_early_serial_stays_put():
    """`quiet` must come before earlyprintk, which prints what waits at the loudness it
    finds; and earlyprintk's value must end its own walk (a bare `serial` walked on into
    a later console=ttyS0 and said 'earlyser already used')."""
    from lguest.launcher.main import kernel_cmdline
    words = kernel_cmdline("console=ttyS0", ["console=hvc0"], "true").split()
    assert words[0] == "quiet"
    early = [w for w in words if w.startswith("earlyprintk=")]
    assert early == ["earlyprintk=serial,ttyS0"]
    assert kernel_cmdline("", [], "caf\udce9").split()[-1] == "lguest.run=Y2Fm6Q=="


# Standard output closed (item 14).

@pytest.mark.kvm
def test_a_closed_standard_output_is_one_line(tmp_path):
    kernel = tiny_vmlinux(tmp_path / "door", say(b"hello\n", knock(0)))
    result = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *LGUEST, "32m", kernel],
                            capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    one_line(result, "standard output is closed")
