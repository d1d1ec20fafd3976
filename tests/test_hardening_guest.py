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


# Readers of files we did not write: traces, symbols, notes (items 15, 17, 18, 19).

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from lguest.host import registry  # noqa: E402
from lguest.trace import ABOUT, EXIT, READ_LIMIT, RECORD, TRACE_MAGIC, read_trace, summary  # noqa: E402
from lguest import LguestError  # noqa: E402


def about_record(facts: bytes) -> bytes:
    return RECORD.pack(1000, 0, len(facts), 0, 255, ABOUT, 0) + facts


@pytest.mark.parametrize("facts, says", [
    (b'{"memory": "x"}', "memory is x, not a number"),
    (b'{"cpus": [1]}', "cpus is [1], not a number"),
    (b'{"ended": 1e999}', "ended is inf, not a number"),
    (b'{"kernel": 7}', "kernel is not text"),
    (b'{"devices": [["mmio", "a", 1, "x"]]}', "devices is not a list"),
    (b'[1, 2]', "not a JSON object"), (b'\xff', "it is not JSON")])
def test_a_trace_whose_facts_are_damaged_is_one_line(tmp_path, facts, says):
    trace = tmp_path / "t"
    trace.write_bytes(TRACE_MAGIC + about_record(facts))
    one_line(lguest("trace", str(trace)), says)


def test_a_trace_with_a_hole_is_one_line_at_once(tmp_path):
    """The magic line, then 64 MiB of nothing: zero bytes are no record (a gigabyte of
    them once grew the reader to 7.4 GB; a gigabyte is now too big to read at all)."""
    trace = tmp_path / "hole"
    with open(trace, "wb") as f:
        f.write(TRACE_MAGIC)
        f.truncate(64 << 20)
    one_line(lguest("trace", str(trace), timeout=60), "a record of zero bytes at byte 15")


def test_a_trace_too_big_to_read_is_one_line(tmp_path):
    trace = tmp_path / "t"
    trace.write_bytes(TRACE_MAGIC)
    os.truncate(trace, READ_LIMIT + 1)
    one_line(lguest("trace", str(trace), timeout=60), "more than any trace lguest reads")


def test_a_trace_that_is_a_fifo_is_one_line_not_a_wait(tmp_path):
    os.mkfifo(tmp_path / "t")
    one_line(lguest("trace", str(tmp_path / "t"), timeout=60), "is not a regular file")


@pytest.mark.parametrize("symbols", ["/dev/zero", "sparse"])
def test_symbols_that_never_end_are_one_line(tmp_path, symbols):
    trace = tmp_path / "t"
    trace.write_bytes(TRACE_MAGIC + about_record(b'{"memory": 33554432}'))
    if symbols == "sparse":
        symbols = str(tmp_path / "System.map")
        with open(symbols, "wb") as f:
            f.truncate(2 << 40)                                # 2 TiB of nothing
    one_line(lguest("trace", str(trace), f"--symbols={symbols}", timeout=60),
             "no kernel symbols in")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.lists(st.tuples(
    st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 64),
    st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 7),
    st.integers(0, 2**64 - 1), st.binary(max_size=64)), max_size=8))
def test_any_bytes_are_a_trace_or_one_sentence(tail, records):
    """Arbitrary bytes after the magic line, or records with arbitrary fields and texts:
    read_trace gives a Recorded that summary() can describe, or one LguestError."""
    import tempfile
    body = b"".join(RECORD.pack(*fields[:7]) + fields[7][:fields[2]] for fields in records)
    with tempfile.NamedTemporaryFile() as f:
        f.write(TRACE_MAGIC + body + tail)
        f.flush()
        try:
            recorded = read_trace(f.name)
        except LguestError as e:
            assert "\n" not in str(e)
            return
    summary(recorded)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                    max_leaves=20)
NOTE_FIELDS = st.fixed_dictionaries({}, optional={
    "pid": JSON | st.integers(), "memory": JSON | st.integers(), "cpus": JSON,
    "kernel": JSON | st.text(), "devices": JSON, "started": JSON | st.floats()})


@settings(max_examples=300, deadline=None)
@given(st.lists(NOTE_FIELDS | JSON | st.binary().map(lambda b: b.decode("latin-1")),
                max_size=4))
def test_ps_reads_any_notes_without_a_traceback(notes):
    import contextlib
    import io
    import json
    import tempfile
    with tempfile.TemporaryDirectory() as runtime:
        os.makedirs(f"{runtime}/lguest", mode=0o700)
        for i, note in enumerate(notes):
            text = note if isinstance(note, str) and not isinstance(note, bool) else \
                json.dumps(note)
            with open(f"{runtime}/lguest/{i}.json", "w", encoding="latin-1",
                      errors="replace") as f:
                f.write(text)
        old = os.environ.get("XDG_RUNTIME_DIR")
        os.environ["XDG_RUNTIME_DIR"] = runtime
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                assert registry.ps([]) == 0
        finally:
            if old is None:
                del os.environ["XDG_RUNTIME_DIR"]
            else:
                os.environ["XDG_RUNTIME_DIR"] = old
        assert len(err.getvalue().splitlines()) <= 1


@pytest.mark.parametrize("note", ["{}", '{"pid":"abc"}', '{"memory":"1"}', "[1]",
                                  '{"pid": 1, "memory": 1, "cpus": 1, "kernel": "k", '
                                  '"started": NaN}'])
def test_ps_skips_a_malformed_note_in_one_line(tmp_path, note):
    (tmp_path / "lguest").mkdir(mode=0o700)
    (tmp_path / "lguest" / "1.json").write_text(note)
    result = lguest("ps", env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "skipped 1 note" in result.stderr
    assert (tmp_path / "lguest" / "1.json").exists()           # not ours to delete


def test_ps_does_not_wait_on_a_fifo_note(tmp_path):
    (tmp_path / "lguest").mkdir(mode=0o700)
    os.mkfifo(tmp_path / "lguest" / "1.json")
    result = lguest("ps", env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}, timeout=30)
    assert result.returncode == 0 and "skipped 1 note" in result.stderr


@pytest.fixture(scope="module")
def lean():
    from lguest.guest import lean_guest
    return lean_guest()


@pytest.mark.kvm
def test_a_run_on_hvc0_says_only_what_the_command_says(lean):
    """Linux itself: no early kernel lines before a --run command's output (quiet came
    after earlyprintk), and no 'earlyser already used' (earlyprintk=serial walked on
    into the console=ttyS0 after it)."""
    result = subprocess.run(LGUEST + ["128m", str(lean.vmlinux), f"--initrd={lean.initrd}",
                                      "--run", "echo hi; exit 3", "console=ttyS0",
                                      "console=hvc0"],
                            capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 3, result.stderr
    assert result.stdout.replace(b"\r", b"") == b"hi\n"
