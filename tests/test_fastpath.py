"""The disk's C fast path (chapter VI) against chapter III's Python, over the same rings.

Each example lays out one guest memory twice (two slots, with a hole between them), one
disk file twice, and a queue of requests, mostly well formed, some broken in every way
Hypothesis can think of. Block serves one copy with the C loop and the other without it;
afterwards both memories, both disks, both rings' indices and the reason a queue broke
(if it did) must be the same, byte for byte.  And the C loop must have served a fair
share of the requests itself, or the test proves nothing: that is counted, and checked.
"""
from __future__ import annotations

import mmap
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lguest._kvm import ffi
from lguest.drivers.block import BLK_SECTOR, T_FLUSH, T_GET_ID, T_IN, T_OUT, Block
from lguest.fastpath import serve_block
from lguest.drivers.virtqueue import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, QueueBroken,
                                      Virtqueue)
from lguest.host.memory import GuestMemory
from lguest.switcher import MemorySlot

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
    return kind, sector, chain


def lay_out(requests, avail_advance, next_noise, event_idx) -> tuple[bytes, bytes]:
    """Guest memory's image (both slots, one after the other) and a disk's bytes."""
    rng = __import__("random").Random(len(requests) * 7919 + avail_advance)
    ram = bytearray(rng.randbytes(LOW[1] + HIGH[1]))
    ram[DESC:DATA] = bytes(DATA - DESC)                  # the rings start out zeroed
    table, heads, spare = [], [], DATA + 0x8000       # headers and statuses up there
    for kind, sector, chain in requests:
        heads.append(len(table))
        for k, (addr, length, flags) in enumerate(chain):
            if addr == "header":
                addr = spare
                struct.pack_into("<IIQ", ram, spare, kind, 0, sector)
                spare += 32
            elif addr == "status":
                addr = spare
                spare += 8
            more = k + 1 < len(chain)
            following = len(table) + 1 if more else 0
            if next_noise and more and rng.random() < 0.1:
                following = rng.randrange(0, QUEUE + 2)
            table.append((addr, length, flags | (DESC_F_NEXT if more else 0), following))
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
    requests = [(T_OUT, 3, [("header", 16, 0), (DATA, 1024, 0), ("status", 1, DESC_F_WRITE)]),
                (T_IN, 3, [("header", 16, 0), (HIGH[0], 512, DESC_F_WRITE),
                           (HIGH[0] + 4096, 512, DESC_F_WRITE), ("status", 1, DESC_F_WRITE)]),
                (T_FLUSH, 0, [("header", 16, 0), ("status", 1, DESC_F_WRITE)]),
                (T_IN, 0, [("header", 16, 0), (DATA + 0x2000, 4096, DESC_F_WRITE),
                           ("status", 1, DESC_F_WRITE)])]
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
    assert chain is not None and chain.head == 7
    for view in chain.readable + chain.writable:
        view.release()
    assert twin.memory.read(DATA + 0x2000, 16) == image[DATA + 0x2000:DATA + 0x2010]
    queue.release()
    block.close()
    twin.close()
