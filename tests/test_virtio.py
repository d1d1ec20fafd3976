"""Virtqueues, PCI configuration space and the virtio transport, against a hostile guest.

The ring walker is fed whatever Hypothesis makes of a guest's memory; the configuration
space and the transport's registers get whatever sequences of accesses it makes up,
on a real KVM machine with a real disk file behind the device.  Nothing may escape but
QueueBroken inside the transport, and every view handed out must lie in guest RAM.
"""
from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lguest.drivers.block import BLK_SECTOR, Block
from lguest.drivers.pci import (BAR0, CONFIG_ENABLE, PCI_CONFIG_PORT, PciHost, host_bridge)
from lguest.drivers.virtio import (BAR_SIZE, DRIVER_OK, FEATURES_OK, NEEDS_RESET, VirtioPci)
from lguest.drivers.virtqueue import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, QueueBroken,
                                      Virtqueue)
from lguest.host.machine import Machine, Outcome
from lguest.host.memory import GuestMemory
from lguest.switcher import Kvm, MemorySlot
from lguest.tiny import CODE_ADDR, STACK_TOP, u8, u16, u32
from lguest.x86 import enter_long_mode, write_boot_tables

RAM = 1 << 16
RINGS, DESC, AVAIL, USED = 0x1000, 0x1000, 0x3000, 0x4000
QUEUE = 64
# Each surface gets at least this many generated inputs (rings; register or configuration
# accesses); LGUEST_FUZZ_INPUTS=2000 makes a quick local run.
INPUTS = int(os.environ.get("LGUEST_FUZZ_INPUTS", "100000"))
COUNTED = {"rings": 0, "configuration accesses": 0, "transport accesses": 0}
RINGS_PER_EXAMPLE = 50


def small_memory(ram: bytearray) -> GuestMemory:
    return GuestMemory([MemorySlot(0, 0, len(ram), ram, None)])


def inside(view: memoryview, ram: bytearray) -> bool:
    """Is this view a piece of `ram`, and nothing else?"""
    return view.obj is ram and view.nbytes <= len(ram)


# --- the ring walker ------------------------------------------------------------------

ADDRESSES = st.one_of(st.integers(0, RAM - 1), st.integers(RAM - 64, RAM + 64),
                      st.integers(0, (1 << 64) - 1))
LENGTHS = st.one_of(st.integers(0, 64), st.integers(RAM - 64, RAM + 64),
                    st.integers(0, (1 << 32) - 1))
FLAGS = st.integers(0, 7) | st.integers(0, 0xFFFF)
DESCRIPTORS = st.tuples(ADDRESSES, LENGTHS, FLAGS, st.integers(0, QUEUE + 2) | st.integers(0, 0xFFFF))


def lay_out(ram: bytearray, descriptors, heads, avail_idx: int, table_at: int = DESC) -> None:
    for i, (addr, length, flags, following) in enumerate(descriptors[:QUEUE]):
        struct.pack_into("<QIHH", ram, table_at + 16 * i, addr, length, flags, following)
    struct.pack_into("<HH", ram, AVAIL, 0, avail_idx)
    for i, head in enumerate(heads[:QUEUE]):
        struct.pack_into("<H", ram, AVAIL + 4 + 2 * i, head)


def walk_everything(ram: bytearray, event_idx: bool) -> int:
    """Pop until the queue is empty or broken; check every view; how many chains."""
    queue = Virtqueue(small_memory(ram), QUEUE, DESC, AVAIL, USED, event_idx)
    chains = 0
    try:
        while (chain := queue.pop()) is not None:
            assert all(inside(v, ram) for v in chain.readable + chain.writable)
            assert len(chain.readable) + len(chain.writable) <= 2 * QUEUE
            queue.push(chain, chain.writable_size() & 0xFFFFFFFF)
            queue.needs_interrupt()
            chains += 1
            assert chains <= QUEUE
    except QueueBroken:
        pass
    return chains


@given(st.lists(DESCRIPTORS, min_size=1, max_size=QUEUE),
       st.lists(st.integers(0, QUEUE + 2) | st.integers(0, 0xFFFF), max_size=QUEUE),
       st.integers(0, 0xFFFF), st.booleans())
@settings(max_examples=max(INPUTS // 40, 10), deadline=None,
          suppress_health_check=list(HealthCheck))
def test_the_ring_walker_survives_any_ring(descriptors, heads, avail_idx, event_idx):
    ram = bytearray(RAM)
    lay_out(ram, descriptors, heads, avail_idx)
    walk_everything(ram, event_idx)
    COUNTED["rings"] += 1


@given(st.integers(0, (1 << 64) - 1))
@settings(max_examples=max(INPUTS // RINGS_PER_EXAMPLE, 10), deadline=None,
          suppress_health_check=list(HealthCheck))
def test_the_ring_walker_survives_many_rings(seed):
    """Volume: each example lays out 50 rings, from a generator Hypothesis seeds."""
    rng = random.Random(seed)
    for _ in range(RINGS_PER_EXAMPLE):
        COUNTED["rings"] += 1
        ram = bytearray(RAM)
        n = rng.randint(1, QUEUE)
        pick = lambda *choices: rng.choice(choices)()
        descriptors = [(pick(lambda: rng.randrange(RAM), lambda: rng.randrange(1 << 64)),
                        pick(lambda: rng.randrange(64), lambda: rng.randrange(1 << 32)),
                        rng.randrange(8), pick(lambda: rng.randrange(QUEUE + 2),
                                               lambda: rng.randrange(1 << 16)))
                       for _ in range(n)]
        heads = [rng.randrange(QUEUE + 2) for _ in range(rng.randrange(QUEUE))]
        lay_out(ram, descriptors, heads, rng.randrange(1 << 16))
        walk_everything(ram, rng.random() < 0.5)


def test_a_good_chain_with_an_indirect_table():
    ram = bytearray(RAM)
    table = 0x8000
    struct.pack_into("<QIHH", ram, table, 0x9000, 16, DESC_F_NEXT, 1)
    struct.pack_into("<QIHH", ram, table + 16, 0xA000, 512, DESC_F_WRITE | DESC_F_NEXT, 2)
    struct.pack_into("<QIHH", ram, table + 32, 0xB000, 1, DESC_F_WRITE, 0)
    lay_out(ram, [(table, 48, DESC_F_INDIRECT, 0)], [0], 1)
    chain = Virtqueue(small_memory(ram), QUEUE, DESC, AVAIL, USED).pop()
    assert [len(v) for v in chain.readable] == [16] and \
        [len(v) for v in chain.writable] == [512, 1]


@pytest.mark.parametrize("descriptors, heads, why", [
    ([(0x9000, 16, DESC_F_NEXT, 0)], [0], "loops"),
    ([(0x9000, 16, DESC_F_NEXT, QUEUE)], [0], "descriptor 64 in a table of 64"),
    ([(RAM - 8, 16, 0, 0)], [0], "outside guest memory"),
    ([(0x9000, 16, DESC_F_WRITE | DESC_F_NEXT, 1), (0x9000, 16, 0, 0)], [0], "readable buffer after"),
    ([(0x9000, 32, DESC_F_INDIRECT | DESC_F_NEXT, 1)], [0], "bad indirect"),
    ([(0x9000, 16, 0, 0)], [QUEUE], "descriptor 64 in a table of 64"),
])
def test_hostile_chains_break_the_queue_with_a_reason(descriptors, heads, why):
    ram = bytearray(RAM)
    lay_out(ram, descriptors, heads, 1)
    with pytest.raises(QueueBroken, match=why):
        Virtqueue(small_memory(ram), QUEUE, DESC, AVAIL, USED).pop()


def test_an_avail_index_too_far_ahead_breaks_the_queue():
    ram = bytearray(RAM)
    lay_out(ram, [(0x9000, 16, 0, 0)], [0], QUEUE + 1)
    with pytest.raises(QueueBroken, match="runs 65 ahead"):
        Virtqueue(small_memory(ram), QUEUE, DESC, AVAIL, USED).pop()


# --- configuration space and the transport, on a real machine -------------------------

BAR_AT = 0xE0008000


@pytest.fixture(scope="module")
def machine():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm")
    kvm = Kvm()
    m = Machine(kvm, [(0, 4 << 20)])
    yield m
    m.close()
    kvm.close()


@pytest.fixture
def disk_device(machine, tmp_path):
    """A virtio-blk device on a real machine's buses, over a real 64 KiB file."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(64 << 10))
    said = []
    device = VirtioPci(Block(str(disk)), machine, BAR_AT, 16, said.append)
    bus = PciHost()
    bus.plug(host_bridge())
    slot = bus.plug(device)
    device.start()
    yield bus, slot, device, said, disk
    if device.mapped is not None:
        machine.mmio.unregister(device.mapped)
    for at, fd in device.bells:
        machine.vm.ioeventfd(fd, at, 2, deassign=True)
    device.close()
    machine.memory.view(0, machine.memory.size)[:] = bytes(machine.memory.size)


ACCESS = st.tuples(st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF))
CONFIG_ACCESS = st.tuples(st.integers(0, 0x40) | st.integers(0, 0xFF) | st.integers(0, 0xFFFFFFFF),
                          st.integers(0, 7), ACCESS, st.booleans())


@given(st.lists(CONFIG_ACCESS, min_size=1, max_size=40))
@settings(max_examples=max(INPUTS // 10, 10), deadline=None,
          suppress_health_check=list(HealthCheck))
def test_configuration_space_holds_against_any_accesses(disk_device, accesses):
    bus, slot, device, said, _ = disk_device
    COUNTED["configuration accesses"] += 2 * len(accesses)
    for register, port, (size, value), write in accesses:
        bus.write(0, 4, CONFIG_ENABLE | slot << 11 | register & 0xFC)   # CONFIG_ADDRESS
        if size == 4 and port:
            port = 4                                  # dword accesses are aligned
        offset = 4 + (port % 4 if size == 1 else (port % 2) * 2 if size == 2 else 0)
        if write:
            bus.write(offset, size, value)
        else:
            assert 0 <= bus.read(offset, size) < 1 << 8 * size
        bus.write(0, 4, value)                        # and CONFIG_ADDRESS itself
    assert device.read_config(0, 4) == 0x10421AF4     # the IDs never change
    assert bus.slots[0].read_config(0, 4) == 0x00081B36
    mapped = device.mapped
    assert mapped is None or mapped == device.bar_address()


def handshake(desc: int, avail: int, used: int,
              enable_before_features: bool = False) -> list[tuple[int, int, int]]:
    """The (offset, size, value) writes a well-behaved driver makes to bring up queue 0,
    or one that enables the queue before the features are agreed."""
    steps = [(20, 1, 0), (20, 1, 3), (8, 4, 1), (12, 4, 1), (8, 4, 0), (12, 4, 0),
             (20, 1, 3 | FEATURES_OK), (22, 2, 0), (24, 2, QUEUE),
             (32, 4, desc), (36, 4, 0), (40, 4, avail), (44, 4, 0),
             (48, 4, used), (52, 4, 0), (28, 2, 1), (20, 1, 7 | FEATURES_OK)]
    if enable_before_features:
        steps.remove((20, 1, 3 | FEATURES_OK))
    return steps


BAR_ACCESS = st.tuples(st.integers(0, 0x40) | st.integers(0, BAR_SIZE + 8),
                       st.sampled_from([1, 2, 4, 8]),
                       st.integers(0, 0xFFFF) | st.integers(0, (1 << 64) - 1), st.booleans())


@given(st.lists(BAR_ACCESS, max_size=30), st.lists(st.integers(0, 20), max_size=3),
       st.lists(DESCRIPTORS, min_size=1, max_size=8),
       st.lists(st.integers(0, QUEUE + 1), max_size=8), st.integers(0, 0xFFFF))
@settings(max_examples=max(INPUTS // 20, 10), deadline=None,
          suppress_health_check=list(HealthCheck))
def test_the_transport_holds_against_any_registers_and_rings(
        disk_device, machine, accesses, skipped, descriptors, heads, avail_idx):
    """A driver that does the handshake with steps left out and random accesses mixed
    in, then kicks a queue full of made-up descriptors."""
    bus, slot, device, said, _ = disk_device
    bus.write(0, 4, CONFIG_ENABLE | slot << 11 | 4)
    bus.write(4, 2, 6)                                  # memory decoding and bus mastering
    ring = 0x10000
    ram = machine.memory.view(0, machine.memory.size)
    for i, (addr, length, flags, following) in enumerate(descriptors):
        struct.pack_into("<QIHH", ram, ring + 16 * i, addr % (8 << 20), length, flags, following)
    struct.pack_into("<HH", ram, ring + 0x2000, 0, avail_idx)
    for i, head in enumerate(heads):
        struct.pack_into("<H", ram, ring + 0x2000 + 4 + 2 * i, head)
    steps = [s for i, s in enumerate(handshake(ring, ring + 0x2000, ring + 0x3000))
             if i not in skipped]
    for at, (offset, size, value, write) in enumerate(accesses):
        steps.insert(at % (len(steps) + 1), (offset, size, value) if write else (offset, size, None))
    where = device.mapped or BAR_AT
    COUNTED["transport accesses"] += len(steps) + 2
    for offset, size, value in steps:
        if value is None:
            machine.mmio.read(where + offset, size)
        else:
            machine.mmio.write(where + offset, size, value & (1 << 8 * size) - 1)
    machine.mmio.write(where + 0x3000, 2, 0)           # kick queue 0 (the exit path)
    os.eventfd_write(device.doorbells[0], 1)           # and through the ioeventfd's eventfd
    with device.lock:                                  # the device thread has done its part
        assert device.thread.is_alive()
    assert len(said) == min(device.breakages, 1)        # one line, however often it broke
    del ram


def test_every_surface_got_its_inputs():
    """Runs after the three surfaces above (pytest keeps a file's order)."""
    print(f"\nfuzzing inputs: {COUNTED}")
    if not all(COUNTED.values()):
        pytest.skip(f"not every surface ran in this session: {COUNTED}")
    assert all(n >= INPUTS for n in COUNTED.values()), COUNTED


# --- tiny hostile guests, through real KVM --------------------------------------------
# Each guest moves a virtio-blk device's BAR to where its identity map reaches, brings
# the device up as a driver would (or out of order), lays a hostile queue in its own
# memory (the test writes it there before the guest runs), kicks the queue through the
# doorbell KVM turns into an eventfd, waits for the device to answer or give up, and
# says the device's status on port 0xE9.


GUEST_BAR, GUEST_DESC, GUEST_AVAIL, GUEST_USED = 0x20000000, 0x100000, 0x102000, 0x103000
HEADER, DATA, STATUS = 0x110000, 0x120000, 0x130000
STATUS_PORT = 0xE9


def config_write(slot: int, register: int, value: int) -> bytes:
    return b"".join([
        b"\xBA" + u32(PCI_CONFIG_PORT),               # mov edx, 0xCF8
        b"\xB8" + u32(CONFIG_ENABLE | slot << 11 | register),   # mov eax, address
        b"\xEF",                                      # out dx, eax
        b"\xBA" + u32(PCI_CONFIG_PORT + 4),           # mov edx, 0xCFC
        b"\xB8" + u32(value),                         # mov eax, value
        b"\xEF"])                                     # out dx, eax


def mmio_write(offset: int, size: int, value: int) -> bytes:
    at = u32(GUEST_BAR + offset)
    if size == 1:
        return b"\xC6\x04\x25" + at + u8(value)          # mov byte [at], imm8
    if size == 2:
        return b"\x66\xC7\x04\x25" + at + u16(value)    # mov word [at], imm16
    return b"\xC7\x04\x25" + at + u32(value)             # mov dword [at], imm32


def hostile_guest(slot: int, steps: list[tuple[int, int, int]]) -> bytes:
    wait_body = b"".join([
        b"\x0F\xB6\x04\x25" + u32(GUEST_BAR + 20),   # movzx eax, byte [status]
        b"\xA8\x40",                                  # test al, NEEDS_RESET
        b"\x75\x10",                                  # jnz done (+16)
        b"\x0F\xB7\x04\x25" + u32(GUEST_USED + 2),   # movzx eax, word [used.idx]
        b"\x85\xC0",                                  # test eax, eax
        b"\x75\x04",                                  # jnz done (+4)
        b"\xFF\xC9",                                  # dec ecx
        b"\x75\x00"])                                 # jnz wait (patched below)
    wait_body = wait_body[:-1] + bytes([256 - len(wait_body)])
    return b"".join([
        config_write(slot, BAR0, GUEST_BAR), config_write(slot, BAR0 + 4, 0),
        config_write(slot, 4, 6),                     # memory decoding, bus master
        *(mmio_write(*step) for step in steps),
        mmio_write(0x3000, 2, 0),                     # kick queue 0: the ioeventfd
        b"\xB9" + u32(2_000_000),                     # mov ecx, patience
        wait_body,
        b"\x0F\xB6\x04\x25" + u32(GUEST_BAR + 20),   # done: movzx eax, byte [status]
        b"\xE6" + u8(STATUS_PORT),                    # out 0xE9, al
        b"\xF4"])                                     # hlt


class Port:
    """Port 0xE9: the guest's last word, which ends it (hlt would not: with the in-kernel
    interrupt controller, a halted vCPU waits inside KVM for an interrupt)."""

    def __init__(self, machine):
        self.machine, self.said = machine, bytearray()

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.said.append(value & 0xFF)
        self.machine.stop(Outcome(0, "the guest said its last word"))


def plugged(kvm, kind, said: list) -> tuple[Machine, Port, VirtioPci, int]:
    """A 16 MiB machine with port 0xE9 and a PCI bus, and `kind` on the bus, started."""
    machine = Machine(kvm, [(0, 16 << 20)])
    port = Port(machine)
    machine.ports.register(STATUS_PORT, 1, port)
    bus = PciHost()
    bus.plug(host_bridge())
    machine.ports.register(PCI_CONFIG_PORT, 8, bus)
    device = VirtioPci(kind, machine, BAR_AT, 16, said.append)
    machine.devices.append(device)
    slot = bus.plug(device)
    device.start()
    return machine, port, device, slot


def request(ram, descriptors, avail_idx=1, heads=(0,)):
    for i, (addr, length, flags, following) in enumerate(descriptors):
        struct.pack_into("<QIHH", ram, GUEST_DESC + 16 * i, addr, length, flags, following)
    struct.pack_into("<HH", ram, GUEST_AVAIL, 0, avail_idx)
    for i, head in enumerate(heads):
        struct.pack_into("<H", ram, GUEST_AVAIL + 4 + 2 * i, head)
    struct.pack_into("<IIQ", ram, HEADER, 0, 0, 0)              # read sector 0


READ = lambda length=512: [(HEADER, 16, DESC_F_NEXT, 1), (DATA, length, DESC_F_WRITE | DESC_F_NEXT, 2),
                           (STATUS, 1, DESC_F_WRITE, 0)]
HOSTILE = {
    "a chain that loops": (dict(descriptors=[(HEADER, 16, DESC_F_NEXT, 0)]), "loops"),
    "a buffer outside memory": (dict(descriptors=[(HEADER, 16, DESC_F_NEXT, 1),
                                                  ((1 << 64) - 4096, 4096, DESC_F_WRITE, 0)]),
                                "outside guest memory"),
    "an index far ahead": (dict(descriptors=READ(), avail_idx=0x8000), "runs 32768 ahead"),
    "an indirect table in an indirect table": (
        dict(descriptors=[(0x140000, 16, DESC_F_INDIRECT, 0)]), "bad indirect"),
    "a queue enabled out of order": (dict(descriptors=READ()), "before the features"),
    "4 GiB and more of buffers": (dict(descriptors=[(0x150000, 16 * 300, DESC_F_INDIRECT, 0)]),
                                  None),
}


@pytest.mark.kvm
@pytest.mark.parametrize("what", list(HOSTILE))
def test_a_hostile_guest_breaks_only_its_own_device(what, tmp_path):
    arrangement, reason = HOSTILE[what]
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(64 << 10))
    before = disk.read_bytes()
    said = []
    with Kvm() as kvm:
        machine, port, device, slot = plugged(kvm, Block(str(disk)), said)
        try:
            ram = machine.memory.view(0, 16 << 20)
            if "indirect" in what:
                struct.pack_into("<QIHH", ram, 0x140000, 0x140000, 16, DESC_F_INDIRECT, 0)
            if "4 GiB" in what:        # 298 buffers of all 16 MiB of RAM: 4.7 GiB to read
                table = [(HEADER, 16, DESC_F_NEXT, 1)] + \
                    [(0, 16 << 20, DESC_F_WRITE | DESC_F_NEXT, i + 1) for i in range(1, 299)] + \
                    [(STATUS, 1, DESC_F_WRITE, 0)]
                for i, entry in enumerate(table):
                    struct.pack_into("<QIHH", ram, 0x150000 + 16 * i, *entry)
            request(ram, **arrangement)
            del ram
            write_boot_tables(machine.memory, identity=1 << 30)
            machine.memory.write(CODE_ADDR, hostile_guest(
                slot, handshake(GUEST_DESC, GUEST_AVAIL, GUEST_USED,
                                enable_before_features="out of order" in what)))
            enter_long_mode(machine.vcpus[0], CODE_ADDR, stack=STACK_TOP)
            machine.start()
            assert machine.done.wait(120), "the launcher hung"
            assert machine.outcome.message == "the guest said its last word", machine.outcome
            status, io_status = port.said[0], machine.memory.read(STATUS, 1)[0]
        finally:
            machine.close()
    if reason is None:             # a request the device can refuse: IOERR, and go on
        assert not status & NEEDS_RESET and not said
        assert io_status == 1
    else:
        assert status & NEEDS_RESET, f"status {status:#x}"
        assert len(said) == 1 and reason in said[0], said
    assert disk.read_bytes() == before
