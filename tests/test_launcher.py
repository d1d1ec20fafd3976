"""The launcher's pure parts: command line, memory plan, boot_params, firmware tables."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from lguest import LguestError
from lguest.guest.bzimage import setup_field
from lguest.launcher import layout as L
from lguest.launcher.bootparams import E820_ENTRIES, E820_TABLE, boot_params
from lguest.launcher.cli import parse_args, parse_memory
from lguest.launcher.main import kernel_cmdline
from lguest.launcher.tables import acpi_tables, mp_table, pkg_length


@pytest.mark.parametrize("text, mib", [("64m", 64), ("1g", 1024), ("524288k", 512),
                                       ("128", 128), ("64M", 64), ("32mb", 32)])
def test_memory_sizes_in_the_forms_people_type(text, mib):
    assert parse_memory(text) == mib << 20


@pytest.mark.parametrize("text, says", [("0m", "too little"), ("lots", "not a memory size"),
                                        ("1m", "too little"), ("100t", "more memory")])
def test_bad_memory_sizes_are_one_sentence(text, says):
    with pytest.raises(LguestError, match=says):
        parse_memory(text)


def test_arguments_kernel_options_and_kernel_args(tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    o = parse_args(["--verbose", "64m", str(kernel), "--initrd", str(kernel), "--cpus=2",
                    "quiet", "foo=bar", "--", "--init-arg"])
    assert (o.memory, o.kernel, o.initrd, o.cpus, o.verbose) == \
        (64 << 20, str(kernel), str(kernel), 2, True)
    assert o.kernel_args == ["quiet", "foo=bar", "--init-arg"]
    assert parse_args(["foo=bar"]).kernel is None        # no KERNEL: the default guest
    assert parse_args([]).memory == 256 << 20


def test_our_own_guests_by_name_unless_a_file_has_that_name(tmp_path, monkeypatch):
    assert (parse_args(["64m", "lean"]).guest, parse_args(["64m", "lean"]).kernel) == ("lean", None)
    assert parse_args(["debian", "--run", "true"]).guest == "debian"
    assert parse_args(["64m"]).guest is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lean").write_bytes(b"\x7fELF")              # your own file called lean
    assert (parse_args(["64m", "lean"]).guest, parse_args(["64m", "lean"]).kernel) == (None, "lean")
    assert parse_args(["64m", "--trace=boot.trace", "lean"]).trace == "boot.trace"


@pytest.mark.parametrize("argv, says", [
    (["64m", "/no/such/kernel"], "no such kernel file"),
    (["64m", "ubuntu"], "no such kernel file"), (["--trace"], "needs a value"),
    (["--block="], "needs a file"), (["--block=,ro"], "needs a file"),
    (["--tunnet=10.1.1"], "wants an IPv4 address"), (["--tunnet=10.1.1.0"], "no address"),
    (["--tunnet=10.1.1.254"], "no address for the guest"), (["--tunnet="], "needs a value"),
    (["--tunnet=bridge:"], "needs a value"), (["--sharenet=lan,tap=x"], "tap= names"),
    (["--tunnet=10.1.1.1,tap=" + "x" * 16], "at most 15"),
    (["--sharenet=lan,mac=01:00:5e:00:00:01"], "not a card's MAC"),
    (["--sharenet=lan,mac=02:00"], "not a card's MAC"),
    (["--block=a"] * 20 + ["--sharenet=lan"] * 10 + ["--rng"], "at most 29 in all"),
    (["--cpus=0"], "number of processors"),
    (["--frobnicate"], "unknown option"), (["--initrd"], "needs a value")])
def test_user_mistakes(argv, says):
    with pytest.raises(LguestError, match=says):
        parse_args(argv)


def test_run_travels_in_base64_after_our_defaults_and_before_the_users():
    line = kernel_cmdline("lguest.x=1", ["foo=bar"], "uname -r", ["noxsave"])
    words = line.split()
    assert words[:2] == ["quiet", "console=ttyS0"] and words[-1] == "foo=bar"
    assert "lguest.run=dW5hbWUgLXI=" in words and "noxsave" in words


@given(st.integers(min_value=16, max_value=64 << 10))
def test_e820_covers_exactly_the_ram_we_map(mib):
    memory = mib << 20
    table = L.e820_map(memory)
    ram = sum(size for _, size, kind in table if kind == L.E820_RAM)
    holes = L.ISA_HOLE_START - L.EBDA_START + L.FIRMWARE_END - L.ISA_HOLE_START
    assert ram + holes == memory
    assert sum(size for _, size in L.ram_slots(memory)) == memory
    ends = [(a, a + s) for a, s, _ in table]
    assert all(b <= c for (_, b), (c, _) in zip(ends, ends[1:]))   # sorted, no overlap


def test_boot_params_fields():
    e820 = L.e820_map(256 << 20)
    page = boot_params(None, L.CMDLINE_ADDR, 10, (0x0FF00000, 4096), e820, rsdp=0xE0000)
    field = lambda name: struct.unpack_from(setup_field(name)[1], page, setup_field(name)[0])[0]
    assert field("header") == b"HdrS" and field("type_of_loader") == 0xFF
    assert field("cmd_line_ptr") == L.CMDLINE_ADDR
    assert (field("ramdisk_image"), field("ramdisk_size")) == (0x0FF00000, 4096)
    assert page[E820_ENTRIES] == len(e820)
    assert struct.unpack_from("<QQI", page, E820_TABLE + 20 * 3) == e820[3]
    assert struct.unpack_from("<Q", page, 0x70)[0] == 0xE0000


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_firmware_tables_add_up(cpus):
    pins = {1: 16, 2: 17, 9: 16}
    blob = acpi_tables(0xE0000, cpus, pins)
    assert blob[:8] == b"RSD PTR " and sum(blob[:20]) % 256 == 0 and sum(blob[:36]) % 256 == 0
    table = lambda at: blob[at:at + struct.unpack_from("<I", blob, at + 4)[0]]
    xsdt = table(struct.unpack_from("<Q", blob, 24)[0] - 0xE0000)
    assert xsdt[:4] == b"XSDT" and sum(xsdt) % 256 == 0
    fadt_at, madt_at = (a - 0xE0000 for a in struct.unpack_from("<QQ", xsdt, 36))
    fadt, madt = table(fadt_at), table(madt_at)
    assert fadt[:4] == b"FACP" and sum(fadt) % 256 == 0 and len(fadt) == 276
    assert madt[:4] == b"APIC" and sum(madt) % 256 == 0
    assert madt.count(bytes([0, 8])) >= cpus                 # a local APIC entry each
    facs_at, dsdt_at = (a - 0xE0000 for a in struct.unpack_from("<II", fadt, 36))
    assert blob[facs_at:facs_at + 4] == b"FACS" and facs_at % 64 == 0
    dsdt = table(dsdt_at)
    assert dsdt[:4] == b"DSDT" and sum(dsdt) % 256 == 0
    assert dsdt[36:50] == bytes.fromhex("08 5f 53 35 5f 12 08 04 0a 05 0a 05 00 00")
    # then Scope(\\_SB) { Device(PCI0) { _HID PNP0A03, _UID, _CRS, _PRT: a route per slot } }
    assert dsdt[50] == 0x10 and dsdt[52:57] == b"\\_SB_" or dsdt[53:58] == b"\\_SB_"
    assert b"PCI0\x08_HID\x0c\x41\xd0\x0a\x03" in dsdt
    prt = dsdt[dsdt.index(b"_PRT") + 4:]
    assert prt[0] == 0x12 and prt[2] == len(pins)
    for slot, pin in pins.items():
        assert b"\x0c" + struct.pack("<I", slot << 16 | 0xFFFF) + b"\x00\x00\x0a" + bytes([pin]) in prt
    # PM1a_EVT_BLK and PM1a_CNT_BLK at the ports the power switch answers, SCI on IRQ 9
    assert struct.unpack_from("<IxxxxI", fadt, 56) == (0x600, 0x604) and fadt[88:90] == b"\x04\x02"
    assert struct.unpack_from("<H", fadt, 46)[0] == 9
    mp = mp_table(0xF0000, cpus, pins)
    assert mp[:4] == b"_MP_" and sum(mp[:16]) % 256 == 0
    length = struct.unpack_from("<H", mp, 20)[0]
    assert mp[16:20] == b"PCMP" and sum(mp[16:16 + length]) % 256 == 0
    assert struct.unpack_from("<H", mp, 16 + 34)[0] == cpus + 2 + 1 + 16 + len(pins) + 2
    # each PCI slot's INTA (bus 0, source slot << 2) to its I/O APIC pin, level and high
    for slot, pin in pins.items():
        assert struct.pack("<BBHBBBB", 3, 0, 0xD, 0, slot << 2, cpus, pin) in mp


@pytest.mark.parametrize("body, encoded", [(0, "01"), (62, "3f"), (63, "41 04"),
                                           (4093, "4f ff"), (4094, "81 00 01"),
                                           (1 << 20, "c4 00 00 01")])
def test_aml_package_lengths_count_themselves(body, encoded):
    assert pkg_length(body) == bytes.fromhex(encoded)
