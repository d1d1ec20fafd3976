"""Snapshots (chapter V, "A machine, written down"): a running lean guest written to a
file and brought back, with its disk, network and timers going on where they were; and
the file's reader, against everything a file can be.

The guests run `--run` scripts, so each launcher's output is the guest's and its status
the script's. Network tests make their own namespace (`ip netns add`) and use addresses
only inside it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lguest.host.registry import registry_dir
from lguest.launcher.snapshot import (SHAPE, SNAPSHOT_HEADER, Snapshot, SnapshotError, shaped,
                                      snapshot_command, write_snapshot)
from test_net_linux import inside, netns, stop                    # noqa: F401 (a fixture)
from test_virtio_linux import lean, read_until                    # noqa: F401 (a fixture)

LGUEST = [sys.executable, "-m", "lguest"]
BOOT = 600                 # seconds for a lean guest to reach its script, at the most


def launch(args: list[str], prefix=()) -> subprocess.Popen:
    return subprocess.Popen([*prefix, *LGUEST, *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def snapshot(pid: int, path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(LGUEST + ["snapshot", str(pid), str(path), *extra],
                          capture_output=True, text=True, timeout=120)


def finish(proc: subprocess.Popen, out: bytes, timeout: float) -> tuple[int, str]:
    """Read the launcher to its end: (status, everything it printed)."""
    out += read_until(proc, b"\0never\0", timeout)
    status = proc.wait(30)
    return status, out.decode(errors="replace").replace("\r\n", "\n")


def ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^tick (\d+)$", text, re.M)]


# --- The file and its reader: no KVM needed ---------------------------------------------

class Slot:
    """What write_snapshot() reads of a memory slot: where, how big, and its bytes."""

    def __init__(self, guest_phys: int, data: bytes):
        self.guest_phys, self.size, self.map = guest_phys, len(data), bytearray(data)


def small_state(slots: list[Slot]) -> dict:
    """A state of the shape SHAPE describes (parts filled in as restore would read them)."""
    return {"memory": sum(s.size for s in slots), "cpus": 1, "devices": ["virtio-console"],
            "ram": [[s.guest_phys, s.size] for s in slots],
            "launcher": {"argv": ["64m", "lean"], "cwd": "/", "kernel": "/k", "cmdline": "",
                         "how": "vmlinux", "entry": 0x1000000, "emulated": True},
            "vm": {"pit2": "", "clock": "", "irqchips": [], "messages": [], "pins": []},
            "vcpus": [{"parts": {}, "cpuid": {"0x0.0 eax": 13}, "msrs": [[16, 5]],
                       "repair": {}}],
            "pci": {"address": 0, "functions": []}, "uart": {}, "i8042": {}, "power": {},
            "disks": []}


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> tuple[Path, dict]:
    slots = [Slot(0, b"\x90" * 4096 + bytes((6 << 20) - 8192) + b"end!" * 1024),
             Slot(1 << 32, os.urandom(8192))]
    path = tmp_path_factory.mktemp("snap") / "small.snap"
    state = small_state(slots)
    write_snapshot(str(path), state, slots)
    return path, state


def test_a_written_file_reads_back_and_its_zeroes_are_holes(small_file):
    path, state = small_file
    snap = Snapshot(str(path))
    try:
        assert snap.state == state
        first, second = snap.offsets()
        assert first % 4096 == 0 and second == first + state["ram"][0][1]
        with open(path, "rb") as f:
            f.seek(second)
            assert len(f.read(8192)) == 8192
    finally:
        snap.close()
    st_ = os.stat(path)
    assert st_.st_blocks * 512 <= st_.st_size - (2 << 20), "2 MiB of zeroes were written out"
    assert not list(path.parent.glob(".*partial")), "the file under its other name stayed"


def mutated(data: bytes, cut: int | None, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data if cut is None else data[:cut])
    for at, bit in flips:
        if out:
            out[at % len(out)] ^= 1 << bit
    return bytes(out)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.none() | st.integers(0, 7 << 20),
       flips=st.lists(st.tuples(st.integers(0, 1 << 23), st.integers(0, 7)), max_size=4),
       header_only=st.booleans())
def test_a_damaged_file_is_refused_in_one_line_never_misread(small_file, tmp_path, cut, flips,
                                                             header_only):
    path, state = small_file
    data = path.read_bytes()
    if header_only:                       # aim at the header, where every field matters
        flips = [(at % SNAPSHOT_HEADER.size, bit) for at, bit in flips]
    bad = tmp_path / "bad.snap"
    bad.write_bytes(mutated(data, cut, flips))
    try:
        snap = Snapshot(str(bad))
    except SnapshotError as e:
        assert "\n" not in str(e) and str(bad) in str(e), e
        return
    try:                                  # only a change the checksums do not cover reads
        assert snap.state == state        # (the padding between the state and memory)
        assert bytes(Path(bad).read_bytes()[snap.offsets()[0]:]) == data[snap.offsets()[0]:]
    finally:
        snap.close()


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(list(SHAPE) + ["x"]), inner, max_size=4),
                    max_leaves=20))
def test_the_shape_check_takes_any_json_without_crashing(value):
    assert shaped(value, SHAPE) in (True, False)


def test_the_commands_say_what_is_wrong_in_one_line(small_file, tmp_path):
    path, _ = small_file
    short = tmp_path / "short.snap"
    short.write_bytes(path.read_bytes()[:-4096])
    newer = tmp_path / "newer.snap"
    data = bytearray(path.read_bytes())
    data[8] = 9                                              # format 9
    newer.write_bytes(bytes(data))
    cases = {"/etc/hostname": "is not an lguest snapshot",
             str(short): "is cut short or damaged",
             str(newer): "is a snapshot of format 9; this lguest reads format 1",
             str(tmp_path / "none.snap"): "cannot open"}
    for name, words in cases.items():
        result = subprocess.run(LGUEST + ["restore", name], capture_output=True, text=True)
        assert result.returncode == 1 and words in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    for args, words in ((["snapshot", "999999999", "x.snap"], "no guest runs as pid"),
                        (["snapshot", "onlyone"], "usage: lguest snapshot"),
                        (["snapshot", "no-such-kernel", "x"], "no running guests have a kernel"),
                        (["restore"], "usage: lguest restore")):
        result = subprocess.run(LGUEST + args, capture_output=True, text=True)
        assert result.returncode == 1 and words in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1


WRITER = """
import sys
from lguest.launcher.snapshot import write_snapshot
class Slot:
    guest_phys, size = 0, 512 << 20
    map = bytearray(b"\\x5a" * size)              # nothing to skip: every piece written
print("WRITING", flush=True)
while True:
    write_snapshot(sys.argv[1], {"memory": Slot.size}, [Slot])
"""


def test_a_writer_killed_halfway_leaves_the_last_whole_snapshot_or_nothing(small_file,
                                                                           tmp_path):
    path, state = small_file
    target = tmp_path / "kept.snap"
    target.write_bytes(path.read_bytes())                    # an earlier, whole snapshot
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=env,
                              stdout=subprocess.PIPE)
    assert writer.stdout.readline() == b"WRITING\n"
    time.sleep(0.3)                                          # well inside the first write
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    partial = list(tmp_path.glob(".kept.snap.*.partial"))
    assert partial, "killed before it began: make the slot bigger"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == before
    with pytest.raises(SnapshotError, match="is not an lguest snapshot"):
        Snapshot(str(partial[0]))


# --- Real guests --------------------------------------------------------------------------

LOOP = """
i=0
while [ $i -lt {n} ]; do
  i=$((i+1))
  echo "tick $i"
  {body}
  sleep {pause}
done
"""


@pytest.mark.kvm
def test_disk_write_ping_and_timer_loop_go_on_after_restore_and_a_changed_disk_is_refused(
        lean, netns, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(64 << 10))
    script = textwrap.dedent(LOOP.format(n=30, pause=0.3, body=(
        'printf "write %03d\\n" $i > /tmp/w; '
        'dd if=/tmp/w of=/dev/vda bs=512 seek=$i conv=fsync 2>/dev/null; '
        'ping -c 1 -W 3 192.168.29.1 >/dev/null && echo "pong $i"'))) + "echo LOOP-DONE"
    args = ["128m", str(lean.vmlinux), f"--initrd={lean.initrd}", f"--block={disk}",
            "--tunnet=192.168.29.1,tap=lgsnap0", "--run", script]
    first = launch(args, prefix=inside(netns, []))
    saved = tmp_path / "guest.snap"
    try:
        out = read_until(first, b"pong 3\r\n", BOOT)
        assert b"pong 3\r\n" in out, out.decode(errors="replace")[-3000:]
        taken = snapshot(first.pid, saved, "--stop")
        status, before = finish(first, out, 60)
    finally:
        stop(first)
    assert taken.returncode == 0, taken.stderr
    assert re.match(r"lguest: guest \d+ is written to .*guest\.snap: 128 MiB of memory, "
                    r"1 vCPU, in [\d.]+ s; it has stopped\n$", taken.stdout), taken.stdout
    assert status == 0 and "stopped after its snapshot" in before, before[-2000:]
    file_hash = hashlib.sha256(saved.read_bytes()).hexdigest()

    again = launch(["restore", str(saved)], prefix=inside(netns, []))
    try:
        status, after = finish(again, b"", 300)
    finally:
        stop(again)
    assert status == 0, after[-3000:]
    assert re.search(r"^lguest: restored .*guest\.snap in [\d.]+ s$", after, re.M), after[:500]
    assert "LOOP-DONE" in after, after[-3000:]
    seen = ticks(before) + ticks(after)
    assert seen == list(range(1, 31)), \
        f"{seen}\nbefore:\n{before[-1500:]}\nafter:\n{after[-3000:]}"     # none lost, none twice
    assert ticks(after)[0] == ticks(before)[-1] + 1
    assert "pong 30" in after                                # the network answers
    written = disk.read_bytes()
    for i in range(1, 31):                                   # every flushed write, in the file
        assert written[512 * i:512 * i + 10] == f"write {i:03d}\n".encode(), i
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == file_hash   # never written to

    refused = subprocess.run(inside(netns, [*LGUEST, "restore", str(saved)]),
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1, refused.stderr
    assert "has changed since the snapshot" in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1


TOKEN = 'od -An -tx8 -N8 /dev/hwrng > /tmp/token; sleep 1; echo "token $(cat /tmp/token)"; nproc'


@pytest.mark.kvm
def test_two_cpus_go_on_in_the_original_and_in_two_restores_that_share_no_writes(lean,
                                                                                tmp_path):
    script = textwrap.dedent(LOOP.format(n=24, body=":", pause=0.5)) + TOKEN
    first = launch(["128m", str(lean.vmlinux), f"--initrd={lean.initrd}", "--cpus=2", "--rng",
                    "--run", script])
    saved = tmp_path / "two.snap"
    try:
        out = read_until(first, b"tick 3\r\n", BOOT)
        assert b"tick 3\r\n" in out, out.decode(errors="replace")[-3000:]
        with contextlib.redirect_stdout(io.StringIO()) as said:   # no --stop: it goes on;
            snapshot_command([str(first.pid), str(saved)])       # asked from here, where no
        taken = said.getvalue()                                  # interpreter must start
        restores = [launch(["restore", str(saved)]) for _ in range(2)]
        try:
            results = [finish(proc, b"", 300) for proc in restores]
        finally:
            stop(*restores)
        status, original = finish(first, out, 300)
    finally:
        stop(first)
    assert "2 vCPUs" in taken and "stopped" not in taken, taken
    assert status == 0 and ticks(original) == list(range(1, 25)), original[-2000:]
    tokens = set()
    for status, text in results + [(status, original)]:
        assert status == 0, text[-3000:]
        assert ticks(text)[-1] == 24 and re.search(r"^2$", text, re.M), text[-2000:]
        token = re.search(r"^token +([0-9a-f]{16})$", text, re.M)
        assert token, text[-2000:]
        tokens.add(token.group(1))
    for status, text in results:                   # each goes on from where it was saved
        assert ticks(text) == list(range(ticks(text)[0], 25)) and ticks(text)[0] > 3, text
    assert len(tokens) == 3, tokens    # each read back its own token: no page was shared


@pytest.mark.kvm
def listed(pid: int, seconds: float = 60) -> None:
    """Wait until `lguest ps` lists `pid`: its door is open by then."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        shown = subprocess.run(LGUEST + ["ps"], capture_output=True, text=True).stdout
        if re.search(rf"^ +{pid} ", shown, re.M):
            return
        time.sleep(0.2)


@pytest.mark.kvm
def test_the_door_answers_requests_that_are_not_ours_and_still_takes_a_snapshot(lean,
                                                                               tmp_path):
    first = launch(["128m", str(lean.vmlinux), f"--initrd={lean.initrd}", "--run", "sleep 600"])
    try:
        listed(first.pid)
        answers = []
        for odd in (b"[1]\n", b"{}\n", b'{"file": "relative", "stop": false}\n'):
            with socket.socket(socket.AF_UNIX) as door:
                door.connect(str(registry_dir() / f"{first.pid}.sock"))
                door.sendall(odd)
                answers.append(json.loads(door.makefile().readline()))
        taken = snapshot(first.pid, tmp_path / "booting.snap")     # mid-boot, and it goes on
    finally:
        stop(first)
    assert all("error" in a for a in answers), answers
    assert taken.returncode == 0, taken.stderr
    Snapshot(str(tmp_path / "booting.snap")).close()


@pytest.mark.kvm
def test_a_guest_with_a_share_says_why_it_cannot_be_snapshotted(lean, tmp_path):
    (tmp_path / "folder").mkdir()
    first = launch(["128m", str(lean.vmlinux), f"--initrd={lean.initrd}",
                    f"--share={tmp_path / 'folder'}", "--run", "sleep 600"])
    try:
        listed(first.pid)                                   # its door opens at once
        taken = snapshot(first.pid, tmp_path / "no.snap")
    finally:
        stop(first)
    assert taken.returncode == 1, taken.stdout
    assert f"no snapshot of guest {first.pid}: a guest with --share or --root" in taken.stderr
    assert taken.stderr.count("\n") == 1 and not (tmp_path / "no.snap").exists()


@pytest.mark.kvm
def test_a_restore_puts_every_part_back_and_refuses_another_processor(lean):
    """Two machines built as the launcher builds them, never started: the second takes the
    first's state (and its parts read back the same), unless the CPUID it was given is
    not the one the snapshot's guest was told."""
    from lguest.launcher.cli import parse_args
    from lguest.launcher.main import build, kernel_cmdline, launch_facts
    from lguest.launcher.snapshot import put_state, snapshot_state
    from lguest.switcher import Kvm

    options = parse_args(["64m", "lean", "--cpus=2"])
    cmdline = kernel_cmdline(lean.cmdline, [], None)
    with Kvm() as kvm:
        machines = [build(options, kvm, str(lean.kernel), str(lean.initrd), cmdline)
                    for _ in range(3)]
        try:
            first, second, third = machines
            state = snapshot_state(first, launch_facts(["64m", "lean"], str(lean.kernel),
                                                       first, False))
            put_state(second, state)
            for a, b in zip(first.machine.vcpus, second.machine.vcpus):
                for part in ("regs", "sregs", "lapic", "xsave", "debugregs", "mp_state"):
                    assert a.get_part(part) == b.get_part(part), part
            state["vcpus"][1]["cpuid"]["0x7.0 ebx"] ^= 1 << 5     # AVX2, say
            with pytest.raises(SnapshotError, match="the snapshot's processor is not this one"):
                put_state(third, state)
        finally:
            for launched in machines:
                launched.machine.close()
