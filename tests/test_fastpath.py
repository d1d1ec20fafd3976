"""The disk's C fast path (chapter VI) against chapter III's Python, over the same rings.

Each example lays out one guest memory twice (two slots, with a hole between them), one
disk file twice, and a queue of requests, mostly well formed, some broken in every way
Hypothesis can think of. Block serves one copy with the C loop and the other without it;
afterwards both memories, both disks, both rings' indices and the reason a queue broke
(if it did) must be the same, byte for byte.  And the C loop must have served a fair
share of the requests itself, or the test proves nothing: that is counted, and checked.
"""
from __future__ import annotations

import json
import mmap
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lguest._kvm import ffi, lib
from lguest.bench.block import (BUFFERS, DEPTH, HEADERS, STATUSES, driven, read_batches,
                                read_blocks)
from lguest.drivers.block import BLK_SECTOR, T_FLUSH, T_GET_ID, T_IN, T_OUT, Block
from lguest import fastpath
from lguest.fastpath import ring_of, serve_block, taken
from lguest.drivers.virtqueue import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, QueueBroken,
                                      Virtqueue)
from lguest.host.memory import GuestMemory
from lguest.switcher import Kvm, MemorySlot

LOW, HIGH = (0, 1 << 16), (1 << 20, 1 << 16)       # two slots: (guest_phys, size)
QUEUE = 16
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
DATA = 0x4000                                       # buffers from here, in either slot
SECTORS = 256
INPUTS = int(os.environ.get("LGUEST_FUZZ_INPUTS", "100000")) // 50
SERVED = {"by C": 0, "by Python": 0}


class Twin:
    """Guest memory in two real mappings, given to Block as the Switcher's slots are."""

    def __init__(self, image: bytes):
        self.slots = []
        for n, (at, size) in enumerate((LOW, HIGH)):
            m = mmap.mmap(-1, size)
            m[:] = image[n * LOW[1]:(n + 1) * LOW[1]]
            self.slots.append(MemorySlot(n, at, size, m, ffi.from_buffer(m)))
        self.memory = GuestMemory(self.slots)

    def image(self) -> bytes:
        return b"".join(bytes(slot.map) for slot in self.slots)

    def close(self) -> None:
        for slot in self.slots:
            ffi.release(slot.pointer)
            slot.map.close()


ADDR = st.one_of(st.integers(DATA, LOW[1] - 1), st.integers(HIGH[0], HIGH[0] + HIGH[1]),
                 st.integers(LOW[1] - 8, LOW[1] + 8), st.integers(0, (1 << 64) - 1))
GOOD_ADDR = st.integers(DATA, DATA + 0x4000) | st.integers(HIGH[0], HIGH[0] + HIGH[1] - 4096)
LENGTH = st.one_of(st.sampled_from([0, 1, 15, 16, 17, 512, 4096]), st.integers(0, 1 << 12),
                   st.integers(0, (1 << 32) - 1))
FLAGS = st.sampled_from([0, DESC_F_WRITE, DESC_F_NEXT, DESC_F_NEXT | DESC_F_WRITE,
                         DESC_F_INDIRECT]) | st.integers(0, 0xFFFF)


@st.composite
def request(draw):
    """A chain: mostly header, buffers, status, sometimes anything at all."""
    kind = draw(st.sampled_from([T_IN, T_IN, T_IN, T_OUT, T_OUT, T_OUT, T_FLUSH, T_GET_ID, 99]))
    sector = draw(st.integers(0, SECTORS - 64) | st.integers(0, SECTORS - 64) |
                  st.integers(0, SECTORS + 2) | st.integers(0, (1 << 64) - 1))
    header = draw(st.sampled_from([16, 16, 16, 16, 16, 8, 24]))
    if draw(st.integers(0, 3)):               # three times in four, buffers that fit
        buffers = draw(st.lists(st.tuples(GOOD_ADDR, st.sampled_from([0, 1, 512, 1024, 4096])),
                                max_size=4))
    else:
        buffers = draw(st.lists(st.tuples(ADDR, LENGTH), max_size=4))
    status_len = draw(st.sampled_from([1, 1, 1, 1, 1, 0, 2]))
    writable_data = kind != T_OUT
    chain = [("header", header, 0)] + \
        [(a, n, DESC_F_WRITE if writable_data else 0) for a, n in buffers] + \
        [("status", status_len, DESC_F_WRITE)]
    if draw(st.integers(0, 19)) == 0:         # now and then, any flags at all
        chain = [(a, n, draw(FLAGS)) for a, n, _ in chain]
    return kind, sector, chain, draw(st.booleans())     # in an indirect table, or not


def lay_out(requests, avail_advance, next_noise, event_idx) -> tuple[bytes, bytes]:
    """Guest memory's image (both slots, one after the other) and a disk's bytes."""
    rng = random.Random(len(requests) * 7919 + avail_advance)
    ram = bytearray(rng.randbytes(LOW[1] + HIGH[1]))
    ram[DESC:DATA] = bytes(DATA - DESC)                  # the rings start out zeroed
    table, heads, spare = [], [], DATA + 0x8000       # headers and statuses up there
    tables = DATA + 0xA000                             # and indirect tables from here
    for kind, sector, chain, indirect in requests:
        heads.append(len(table))
        if indirect:                  # the chain in a table of its own, 16 bytes apiece
            table.append((tables, 16 * len(chain), DESC_F_INDIRECT, 0))
            own, tables, where = [], tables + 16 * len(chain), tables
        for k, (addr, length, flags) in enumerate(chain):
            if addr == "header":
                addr = spare
                struct.pack_into("<IIQ", ram, spare, kind, 0, sector)
                spare += 32
            elif addr == "status":
                addr = spare
                spare += 8
            more = k + 1 < len(chain)
            into = own if indirect else table
            following = len(into) + 1 if more else 0
            if next_noise and more and rng.random() < 0.1:
                following = rng.randrange(0, QUEUE + 2)
            into.append((addr, length, flags | (DESC_F_NEXT if more else 0), following))
        if indirect:
            for i, (addr, length, flags, following) in enumerate(own):
                struct.pack_into("<QIHH", ram, where + 16 * i, addr & ((1 << 64) - 1),
                                 length & 0xFFFFFFFF, flags & 0xFFFF, following & 0xFFFF)
    for i, (addr, length, flags, following) in enumerate(table[:QUEUE]):
        struct.pack_into("<QIHH", ram, DESC + 16 * i, addr & ((1 << 64) - 1),
                         length & 0xFFFFFFFF, flags & 0xFFFF, following & 0xFFFF)
    for i, head in enumerate(heads[:QUEUE]):
        struct.pack_into("<H", ram, AVAIL + 4 + 2 * i, head)
    struct.pack_into("<HH", ram, AVAIL, 0, avail_advance)
    struct.pack_into("<H", ram, AVAIL + 4 + 2 * QUEUE, rng.randrange(0, 3))  # used_event
    return bytes(ram), rng.randbytes(SECTORS * BLK_SECTOR)


def serve(image: bytes, disk_bytes: bytes, path, fast: bool, read_only: bool,
          event_idx: bool):
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(disk_bytes)
    twin = Twin(image)
    block = Block(str(path), read_only=read_only)
    block.fast = fast
    queue = Virtqueue(twin.memory, QUEUE, DESC, AVAIL, USED, event_idx)
    broken = None
    by_python = []
    handle = block.handle

    def counted(chain):                      # Python's own requests, once answered
        written = handle(chain)
        by_python.append(chain.head)
        return written

    block.handle = counted
    try:
        block.serve(0, queue, None)
    except QueueBroken as e:
        broken = str(e)
    if fast:                                 # what the used ring gained that Python did not
        SERVED["by C"] += queue.used_idx - len(by_python)
    interrupt = queue.needs_interrupt()
    outcome = (twin.image(), path.read_bytes(), queue.last_avail, queue.used_idx,
               broken, interrupt)
    queue.release()
    block.close()
    twin.close()
    return outcome


@given(st.lists(request(), min_size=1, max_size=8),
       st.none() | st.integers(0, 10) | st.integers(0, 0xFFFF),
       st.booleans(), st.booleans(), st.booleans())
@settings(max_examples=INPUTS, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
def test_c_and_python_serve_alike(tmp_path, requests, avail_advance, next_noise, read_only,
                                  event_idx):
    if avail_advance is None:                # the driver's word: all of them
        avail_advance = len(requests)
    image, disk_bytes = lay_out(requests, avail_advance, next_noise, event_idx)
    plain = serve(image, disk_bytes, tmp_path / "plain" / "disk.img", False, read_only, event_idx)
    fast = serve(image, disk_bytes, tmp_path / "fast" / "disk.img", True, read_only, event_idx)
    names = ("guest memory", "the disk", "last_avail", "used_idx", "broken", "interrupt")
    for name, a, b in zip(names, plain, fast):
        assert a == b, f"{name} differs between Python and C"
    SERVED["by Python"] += plain[3]


def test_the_c_loop_took_its_share():
    """The comparison above means something only if C served many requests itself.
    Runs after it (pytest keeps a file's order)."""
    if not any(SERVED.values()):
        pytest.skip("the comparison did not run in this session")
    print(f"\nrequests served: {SERVED}")
    assert SERVED["by C"] >= max(50, SERVED["by Python"] // 8), SERVED


def test_the_c_loop_serves_reads_and_writes_and_leaves_the_rest(tmp_path):
    requests = [(T_OUT, 3, [("header", 16, 0), (DATA, 1024, 0), ("status", 1, DESC_F_WRITE)],
                 False),
                (T_IN, 3, [("header", 16, 0), (HIGH[0], 512, DESC_F_WRITE),
                           (HIGH[0] + 4096, 512, DESC_F_WRITE), ("status", 1, DESC_F_WRITE)],
                 True),
                (T_FLUSH, 0, [("header", 16, 0), ("status", 1, DESC_F_WRITE)], False),
                (T_IN, 0, [("header", 16, 0), (DATA + 0x2000, 4096, DESC_F_WRITE),
                           ("status", 1, DESC_F_WRITE)], False)]
    image, disk_bytes = lay_out(requests, len(requests), False, False)
    path = tmp_path / "d.img"
    path.write_bytes(disk_bytes)
    twin = Twin(image)
    block = Block(str(path))
    queue = Virtqueue(twin.memory, QUEUE, DESC, AVAIL, USED)
    assert serve_block(block, queue) == 2             # the write and the read, then a flush
    disk = path.read_bytes()
    assert disk[1536:2560] == image[DATA:DATA + 1024]
    assert twin.memory.read(HIGH[0], 512) == disk[1536:2048]
    assert twin.memory.read(HIGH[0] + 4096, 512) == disk[2048:2560]
    assert struct.unpack_from("<HIIII", twin.memory.read(USED + 2, 18)) == (2, 0, 1, 3, 1025)
    chain = queue.pop()                               # the flush is left for Python
    assert chain is not None and chain.head == 4
    for view in chain.readable + chain.writable:
        view.release()
    assert twin.memory.read(DATA + 0x2000, 16) == image[DATA + 0x2000:DATA + 0x2010]
    queue.release()
    block.close()
    twin.close()


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.integers(0, 3), st.booleans())
@settings(max_examples=2000, deadline=None)
def test_c_and_python_decide_interrupts_alike(signalled, used_idx, used_event, flags,
                                              event_idx):
    """Chapter VI's lguest_wants_interrupt, which the card's C thread uses, against
    Virtqueue.needs_interrupt: the same answer and the same index remembered."""
    twin = Twin(bytes(LOW[1]) + bytes(HIGH[1]))
    twin.memory.write(AVAIL, struct.pack("<H", flags))
    twin.memory.write(AVAIL + 4 + 2 * QUEUE, struct.pack("<H", used_event))
    queue = Virtqueue(twin.memory, QUEUE, DESC, AVAIL, USED, event_idx)
    queue.signalled, queue.used_idx = signalled, used_idx
    table, ring = ring_of(queue)
    in_c = lib.lguest_queue_interrupt(table, len(table), ring)
    taken(queue, ring)
    remembered, queue.signalled = queue.signalled, signalled
    assert (in_c, remembered) == (int(queue.needs_interrupt()), queue.signalled)
    queue.release()
    twin.close()


# --- the tap's two loops, in a network namespace of their own ---------------------------
# A tap is an interface, so this half runs in a child under `unshare -n`: this file, run
# as a script (`python tests/test_fastpath.py tap`), with only lo and the tap there, and
# IPv6 quiet, so that no frame but ours crosses the tap.

from lguest.drivers.net import (MAX_FRAME, NET_HEADER, RX, TX,  # noqa: E402
                                Net, mac_for)
from lguest.drivers.tap import Tap, guest_address, set_up_host_side  # noqa: E402

FRAME_SIZES = st.sampled_from([0, 13, 14, 60, 1514, MAX_FRAME, MAX_FRAME + 1]) | \
    st.integers(0, 2000)
EXPERIMENTAL = 0x88B5                  # IEEE 802's EtherType for local experiments
TAP_EXAMPLES = 300


@st.composite
def frames_out(draw):
    """Chains the guest sends: a header and a frame, cut into 1 to 3 buffers."""
    size = draw(FRAME_SIZES)
    body = (b"\xff" * 6 + b"\x02" * 6 + struct.pack(">H", EXPERIMENTAL)).ljust(size, b"\xa5")
    data = bytes(NET_HEADER) + body[:size]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=2)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    flags = draw(st.sampled_from([0, 0, 0, 0, DESC_F_WRITE, DESC_F_INDIRECT]))
    return [(piece, flags if k == len(pieces) - 1 else 0) for k, piece in enumerate(pieces)], \
        draw(st.booleans())


@st.composite
def rooms_in(draw):
    """Chains the guest offers for frames to come: 1 to 3 writable buffers."""
    lengths = draw(st.lists(st.sampled_from([0, 4, 12, 100, 1526, 2048]) |
                            st.integers(0, 3000), min_size=1, max_size=3))
    flags = draw(st.sampled_from([DESC_F_WRITE] * 5 + [0, DESC_F_INDIRECT]))
    return [(n, flags if k == 0 else DESC_F_WRITE) for k, n in enumerate(lengths)], \
        draw(st.booleans())


def tap_ring(chains, write_data: bool) -> bytes:
    """Guest memory with `chains` laid out on one queue, all of them made available, each
    (pieces, indirect) in the ring's table or in a table of its own."""
    ram = bytearray(LOW[1] + HIGH[1])
    table, heads, at, tables = [], [], DATA, DATA + 0xA000
    for chain, indirect in chains:
        heads.append(len(table))
        own = []
        if indirect:
            table.append((tables, 16 * len(chain), DESC_F_INDIRECT, 0))
        for k, (piece, flags) in enumerate(chain):
            length = piece if isinstance(piece, int) else len(piece)
            if at + length > DATA + 0xA000:           # clear of the indirect tables
                at = LOW[1] + DATA               # the high slot, as seen in the image
            if not isinstance(piece, int):
                ram[at:at + length] = piece
            gpa = at if at < LOW[1] else HIGH[0] + at - LOW[1]
            more = k + 1 < len(chain)
            into = own if indirect else table
            into.append((gpa, length, flags | (DESC_F_NEXT if more else 0),
                         len(into) + 1 if more else 0))
            at += length
        for i, entry in enumerate(own):
            struct.pack_into("<QIHH", ram, tables + 16 * i, *entry)
        tables += 16 * len(own)
    for i, entry in enumerate(table[:QUEUE]):
        struct.pack_into("<QIHH", ram, DESC + 16 * i, *entry)
    for i, head in enumerate(heads[:QUEUE]):
        struct.pack_into("<H", ram, AVAIL + 4 + 2 * i, head)
    struct.pack_into("<HH", ram, AVAIL, 0, len(chains))
    return bytes(ram)


class TapBench:
    """One tap, up, with a packet socket on its host side that hears what the guest sends
    and sends what the guest should receive."""

    def __init__(self):
        assert [name for _, name in socket.if_nameindex()] == ["lo"], "not in our own netns"
        for switch in Path("/proc/sys/net/ipv6/conf").glob("*/disable_ipv6"):
            switch.write_text("1")
        self.tap = Tap()
        set_up_host_side(self.tap, guest_address("192.168.19.1")[0], None)
        self.host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        self.host.bind((self.tap.name, 0))
        self.host.setblocking(False)

    def heard(self) -> list[bytes]:
        frames = []
        while True:
            try:
                frames.append(self.host.recv(1 << 16))
            except BlockingIOError:
                return frames

    def send(self, frames: list[bytes]) -> None:
        for data in frames:
            self.host.send(data)


def tap_run(bench: TapBench, image: bytes, fast: bool, queue_index: int, frames=()):
    twin = Twin(image)
    card = Net(bench.tap, mac_for("fastpath", "test"))
    card.fast = fast
    queue = Virtqueue(twin.memory, QUEUE, DESC, AVAIL, USED)
    bench.heard()                            # nothing left over from the last run
    bench.send(list(frames))
    time.sleep(0.002)                        # the frames are on the tap's queue
    broken = None
    try:
        card.serve(queue_index, queue, None)
    except QueueBroken as e:
        broken = str(e)
    outcome = (twin.image(), queue.last_avail, queue.used_idx, broken, dict(card.counts),
               card.hungry, bench.heard() if queue_index == TX else [])
    queue.release()
    twin.close()
    while bench.tap.receive([memoryview(bytearray(1 << 16))]) is not None:
        pass                                 # what the guest did not take, gone
    return outcome


TAP_SERVED = {"sent by C": 0, "received by C": 0}


def compare(plain, fast) -> None:
    names = ("guest memory", "last_avail", "used_idx", "broken", "counts", "hungry",
             "frames on the wire")
    for name, a, b in zip(names, plain, fast):
        assert a == b, f"{name} differs between Python and C: {a!r:.200} != {b!r:.200}"


def check_tap_loops() -> None:
    bench = TapBench()
    sizes = st.lists(FRAME_SIZES, max_size=8)

    @given(st.lists(frames_out(), min_size=1, max_size=6))
    @settings(max_examples=TAP_EXAMPLES, deadline=None)
    def sending(chains):
        image = tap_ring(chains, True)
        plain, fast = (tap_run(bench, image, how, TX) for how in (False, True))
        compare(plain, fast)
        TAP_SERVED["sent by C"] += fast[4].get("sent", 0)

    @given(st.lists(rooms_in(), min_size=1, max_size=6), sizes)
    @settings(max_examples=TAP_EXAMPLES, deadline=None)
    def receiving(chains, frame_sizes):
        image = tap_ring(chains, False)
        frames = [(b"\x02" * 6 + b"\x04" * 6 + struct.pack(">H", EXPERIMENTAL))
                  .ljust(min(max(size, 14), 1514), bytes([size & 0xFF])) for size in frame_sizes]
        plain, fast = (tap_run(bench, image, how, RX, frames) for how in (False, True))
        compare(plain, fast)
        TAP_SERVED["received by C"] += fast[4].get("received", 0)

    sending()
    receiving()
    TAP_SERVED.update(check_thread_loop(bench))
    print(json.dumps(TAP_SERVED))


def check_thread_loop(bench: TapBench) -> dict:
    """The card's whole thread in C (chapter VI's lguest_net_loop), through the real
    transport on a real KVM machine: frames out and in, whole and in order; the transport's
    lock handed to another thread while the loop sleeps with it; a chain C will not walk
    breaks the card as Python would, and a reset brings it back."""
    from lguest.bench.block import PythonDriver, rings_of
    from lguest.bench.net import IN_AT, OUT_AT, SLOT
    from lguest.drivers.net import RECEIVED_HEADER
    from lguest.drivers.virtio import COMMON_AT, DRIVER_OK, FIELD_SPANS, NEEDS_RESET
    seen = {"loops": 0}
    real = fastpath.net_loop

    def counted(*args):
        seen["loops"] += 1
        return real(*args)

    fastpath.net_loop = counted
    frames = [(b"\x02" * 6 + b"\x04" * 6 + struct.pack(">H", EXPERIMENTAL))
              .ljust(60 + 45 * k, bytes([k])) for k in range(DEPTH)]
    with Kvm() as kvm, ExitStack() as stack:
        driver = driven(stack, kvm, Net(bench.tap, mac_for("fastpath", "loop")))
        device = driver.device
        for round_ in range(2):                      # the second after a break and a reset
            bench.heard()
            for k, data in enumerate(frames):
                driver.memory.write(OUT_AT + SLOT * k, bytes(NET_HEADER) + data)
            driver.offer(TX, [[(OUT_AT + SLOT * k, NET_HEADER + len(data), 0)]
                              for k, data in enumerate(frames)])
            driver.wait(TX)
            heard, deadline = [], time.monotonic() + 5
            while len(heard) < len(frames) and time.monotonic() < deadline:
                heard += bench.heard()
            assert heard == frames, f"round {round_}: {len(heard)} of {len(frames)} heard; " \
                f"status {device.status:#x}, counts {dict(device.device.counts)}"
            driver.offer(RX, [[(IN_AT + SLOT * k, SLOT, DESC_F_WRITE)] for k in range(DEPTH)])
            bench.send(frames)
            driver.wait(RX)
            for k, data in enumerate(frames):
                got = driver.memory.read(IN_AT + SLOT * k, NET_HEADER + len(data))
                assert got == RECEIVED_HEADER + data, f"round {round_}: frame {k}"
            # The loop now sleeps holding the lock: a register read from another thread
            # must still be answered (it rings `wake`, and the loop lets go).
            answered = []
            offset, size = FIELD_SPANS["device_status"]
            reader = threading.Thread(
                target=lambda: answered.append(device.read(COMMON_AT + offset, size)))
            reader.start()
            reader.join(10)
            assert answered and answered[0] & DRIVER_OK, "the register read was not answered"
            if round_ == 0:                          # a frame outside memory: broken
                driver.offer(TX, [[(1 << 40, 100, 0)]])
                deadline = time.monotonic() + 5
                while not device.status & NEEDS_RESET and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert device.status & NEEDS_RESET and device.thread.is_alive()
                driver.close()
                for q in (RX, TX):                   # fresh rings, as a driver makes them
                    driver.memory.write(rings_of(q)[0], bytes(0x3000))
                driver = PythonDriver(device.machine, device)     # a reset, and up again
                stack.callback(driver.close)
    fastpath.net_loop = real
    assert seen["loops"] >= 2, seen                 # at least once in each round
    return seen


def test_the_tap_loops_in_c_and_python_agree():
    result = subprocess.run(["unshare", "-n", sys.executable, __file__, "tap"],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\ntap frames: {served}")
    assert served["sent by C"] >= TAP_EXAMPLES // 2 and served["received by C"] >= TAP_EXAMPLES // 4
    assert served["loops"] >= 2


def test_the_benchmarks_c_driver_reads_right(tmp_path, monkeypatch):
    """Chapter VII's driver, in C (chapter VI's lguest_drive), offers 128 batches of
    reads through a real device thread, each once the last is used: every read lands in
    its buffer, and a kick lost on the way would end in the driver's TimeoutError. The
    disk's thread is chapter VI's C loop (counted), which leaves a flush to Python."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 << 20))
    data = disk.read_bytes()
    rng = random.Random(5)
    requests = [(rng.randrange(0, len(data) // BLK_SECTOR - 8), 4096) for _ in range(DEPTH * 128)]
    loops, real = [], fastpath.disk_loop
    monkeypatch.setattr(fastpath, "disk_loop", lambda *args: loops.append(1) or real(*args))
    with Kvm() as kvm, ExitStack() as stack:
        driver = driven(stack, kvm, Block(str(disk)))
        posts = read_batches(driver, requests)
        read_blocks(driver, posts)
        for i, (sector, length) in enumerate(requests[-DEPTH:]):   # the last batch's buffers
            got = driver.memory.read(BUFFERS + i * length, length)
            assert got == data[sector * BLK_SECTOR:sector * BLK_SECTOR + length], i
        driver.memory.write(HEADERS, struct.pack("<IIQ", T_FLUSH, 0, 0) + b"\xff" * 8)
        driver.memory.write(STATUSES, b"\x7f")
        driver.offer(0, [[(HEADERS, 16, 0), (STATUSES, 1, DESC_F_WRITE)]])
        driver.wait(0)
        assert driver.memory.read(STATUSES, 1) == b"\x00", "the flush was not answered OK"
    assert loops, "the disk's thread never ran chapter VI's C loop"


if __name__ == "__main__" and sys.argv[1:] == ["tap"]:
    check_tap_loops()
