"""The trace of chapter VII: its file format, read back; the story of a tiny guest's boot,
traced by the real launcher on real KVM; its timeline drawn; the `lguest trace` verb."""
from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lguest import LguestError
from lguest.switcher import lib
from lguest.trace import (ABOUT, EXIT, TRACE_MAGIC, RECORD, REPAIR, SAMPLE, Tracer,
                          kernel_symbols, phases, plot, read_trace, summary)
from test_host_tinyguests import LOAD_AT, knock, say, tiny_vmlinux

LGUEST = [sys.executable, "-m", "lguest"]

u8, u16, u32, u64 = (st.integers(0, (1 << n) - 1) for n in (8, 16, 32, 64))
exits = st.tuples(u16, u8, u64, u32, u32)            # reason, vcpu, address, size, took
samples = st.tuples(u8, u64)                         # vcpu, rip
texts = st.binary(max_size=300)
repairs = st.tuples(st.text(min_size=1, max_size=20), u8, u32)
events = st.lists(st.one_of(exits.map(lambda e: ("exit", e)), samples.map(lambda s: ("sample", s)),
                            texts.map(lambda t: ("text", t)), repairs.map(lambda r: ("repair", r))),
                  max_size=60)


# --- the format, round trip ------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(events=events, about=st.dictionaries(st.text(max_size=8), st.integers(), max_size=4))
def test_what_is_written_is_read_back(tmp_path_factory, events, about):
    path = tmp_path_factory.mktemp("trace") / "t.trace"
    trace = Tracer(str(path), {"facts": about})
    for kind, value in events:
        if kind == "exit":
            reason, vcpu, address, size, took = value
            trace.record(EXIT, reason, vcpu, address, size, took)
        elif kind == "sample":
            trace.record(SAMPLE, vcpu=value[0], address=value[1])
        elif kind == "text":
            trace.text(value)
        else:
            what, vcpu, count = value
            trace.record(REPAIR, trace.name(what), vcpu, size=count)
    trace.close()
    recorded = read_trace(str(path))
    assert recorded.about["facts"] == about and recorded.cut_short == 0
    assert [(r, v, a, s, round(t * 1e9)) for _, v, r, a, s, t in recorded.exits] == \
        [e for k, e in events if k == "exit"]
    assert [(v, rip) for _, v, rip in recorded.samples] == [s for k, s in events if k == "sample"]
    assert [text for _, text in recorded.console] == [t for k, t in events if k == "text"]
    assert [(what, v, n) for _, v, what, n in recorded.repairs] == \
        [r for k, r in events if k == "repair"]
    times = [t for t, *_ in recorded.exits + recorded.samples]
    assert all(t >= 0 for t in times)


def test_a_long_trace_crosses_many_buffers(tmp_path):
    trace = Tracer(str(tmp_path / "long.trace"), {})
    for i in range(50_000):                          # some 1.4 MB: five flushes or more
        trace.record(EXIT, lib.KVM_EXIT_IO, 0, 0x3F8, i, i)
    trace.close()
    recorded = read_trace(str(tmp_path / "long.trace"))
    assert [size for *_, size, _ in recorded.exits] == list(range(50_000))


def test_a_trace_cut_short_reads_up_to_the_cut(tmp_path):
    path = tmp_path / "cut.trace"
    trace = Tracer(str(path), {})
    for i in range(10):
        trace.record(EXIT, lib.KVM_EXIT_MMIO, 1, 0xFEB00000 + i, 4)
    trace.text(b"the guest said this\n")
    trace.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])                    # inside the text record
    recorded = read_trace(str(path))
    assert len(recorded.exits) == 10 and recorded.console == []
    assert recorded.cut_short == RECORD.size + len(b"the guest said this\n") - 5
    assert "ends inside a record" in summary(recorded)


@pytest.mark.parametrize("content, words", [
    (b"", "is not an lguest trace"),
    (b"#!/bin/sh\necho hello\n", "is not an lguest trace"),
    (TRACE_MAGIC + RECORD.pack(0, 0, 0, 0, 0, 99, 0), "unknown kind 99"),
    (TRACE_MAGIC + RECORD.pack(0, 0, 3, 0, 0, ABOUT, 0) + b"{{{", "damaged record"),
])
def test_files_that_are_not_traces_get_one_line(tmp_path, content, words):
    path = tmp_path / "not.trace"
    path.write_bytes(content)
    with pytest.raises(LguestError, match=words) as caught:
        read_trace(str(path))
    assert "\n" not in str(caught.value)


def test_symbols_from_a_system_map(tmp_path):
    (tmp_path / "System.map").write_text(
        "ffffffff81000000 T _text\nffffffff81000100 t do_work\nffffffff81000200 D some_data\n"
        "ffffffff81000300 T idle\n")
    symbols = kernel_symbols(str(tmp_path / "System.map"))
    assert symbols.name(0xFFFFFFFF81000180) == "do_work"
    assert symbols.name(0xFFFFFFFF81000250) == "do_work"      # data is not a function
    assert symbols.name(0xFFFFFFFF81000400) == "idle"
    (tmp_path / "bzImage").write_bytes(b"MZ" + bytes(100))    # a kernel with no symbols...
    assert kernel_symbols(str(tmp_path / "bzImage")).source.endswith("System.map")  # ...beside
    assert kernel_symbols(str(tmp_path / "missing")) is None


# --- a real boot, traced: a tiny kernel through the launcher ---------------------------

SPINS = 20_000
BOOT_WORDS = (b"[    0.000000] Linux version tiny\r\n"
              b"[    0.100000] Run /init as init process\r\n"
              b"hello from user space\r\n")


def spin_then(then: bytes) -> bytes:
    """Code: out 0x80, al SPINS times (a port nobody answers), then `then`."""
    return b"\xB9" + struct.pack("<I", SPINS) + b"\xE6\x80\xE2\xFC" + then


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    code = say(BOOT_WORDS, spin_then(knock(7)))
    kernel = tiny_vmlinux(folder / "tiny", code)
    run = subprocess.run(LGUEST + [f"--trace={folder / 'boot.trace'}", "32m", kernel],
                         capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 7, run.stderr
    return folder, read_trace(str(folder / "boot.trace")), code


@pytest.mark.kvm
def test_a_tiny_guest_traced_end_to_end(tiny_trace):
    folder, recorded, code = tiny_trace
    assert recorded.about["memory"] == 32 << 20 and recorded.about["kernel"].endswith("tiny")
    spins = [e for e in recorded.exits if e[2] == lib.KVM_EXIT_IO and e[3] == 0x80]
    assert len(spins) == SPINS
    assert all(size == 1 | (1 << 31) for *_, size, _ in spins)       # one byte, written
    door = [e for e in recorded.exits if e[2] == lib.KVM_EXIT_MMIO]
    assert door and door[-1][3] == 0xFEB00000
    assert b"".join(text for _, text in recorded.console) == BOOT_WORDS
    assert [e[0] for e in recorded.exits] == sorted(e[0] for e in recorded.exits)
    # Every sample of rip is an instruction of the tiny kernel: the sampler reads the real thing.
    assert recorded.samples
    assert all(LOAD_AT <= rip < LOAD_AT + len(code) for _, _, rip in recorded.samples)
    devices = {name for _, _, _, name in recorded.about["devices"]}
    assert {"Uart8250", "I8042", "ExitDoor", "PciHost", "PowerManagement"} <= devices


@pytest.mark.kvm
def test_the_story_of_a_tiny_boot(tiny_trace):
    folder, recorded, _ = tiny_trace
    names = [p.name for p in phases(recorded)]
    assert names == ["before the kernel's first word", "the kernel sets itself up",
                     "/init starts", "user space"]
    story = summary(recorded)
    assert "nobody (port 0x80)" in story and f"{SPINS:,}" in story
    assert "Uart8250 (port 0x3f8)" in story and "ExitDoor (0xfeb00000)" in story
    assert "KVM_EXIT_IO" in story and "where the vCPUs were" in story
    result = subprocess.run(LGUEST + ["trace", str(folder / "boot.trace")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == story.strip()


@pytest.mark.kvm
@pytest.mark.parametrize("name, start", [("boot.svg", b"<?xml"), ("boot.png", b"\x89PNG")])
def test_the_timeline_is_drawn(tiny_trace, name, start):
    folder, _, _ = tiny_trace
    result = subprocess.run(LGUEST + ["trace", str(folder / "boot.trace"), "--plot",
                                      str(folder / name)], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (folder / name).read_bytes().startswith(start)
    assert (folder / name).stat().st_size > 10_000


# --- mistakes: one line each ------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["trace"], "which trace?"),
    (["trace", "/no/such.trace"], "cannot read the trace"),
    (["trace", "/etc/hostname"], "is not an lguest trace"),
    (["trace", "x.trace", "--frobnicate"], "not understood"),
    (["trace", "x.trace", "--top=many"], "--top wants a number"),
])
def test_trace_mistakes_are_one_line(tmp_path, args, words):
    result = subprocess.run(LGUEST + args, capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lguest: "), result.stderr
    assert words in lines[0]


@pytest.mark.kvm
def test_a_trace_file_that_cannot_be_written_is_said_before_the_boot(tmp_path):
    kernel = tiny_vmlinux(tmp_path / "tiny", say(b"never\n", knock(0)))
    result = subprocess.run(LGUEST + [f"--trace={tmp_path}/no/dir/boot.trace", "32m", kernel],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "cannot write the trace" in result.stderr
    assert result.stdout == ""


@pytest.mark.kvm
def test_plot_wants_a_picture_format(tiny_trace):
    _, recorded, _ = tiny_trace
    with pytest.raises(LguestError, match="--plot draws"):
        plot(recorded, "boot.txt")
