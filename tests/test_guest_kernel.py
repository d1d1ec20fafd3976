"""Chapter II: bzImage setup headers, payload decompression and vmlinux ELF files.

The real-kernel tests use Debian's kernel (the default guest's), fetched and cached by the same code
`make guest` runs (the first run on a fresh machine downloads it).
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct

import lz4.block
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from lguest import LguestError
from lguest.guest import (default_guest, decompress, extract_vmlinux, open_kernel,
                          parse_bzimage, payload_format, read_bzimage, read_vmlinux, setup_field)
from lguest.guest.bzimage import (LOADED_HIGH, SETUP_HEADER, XLF_CAN_BE_LOADED_ABOVE_4G,
                                  XLF_KERNEL_64, BzImage)
from lguest.guest.payload import LZ4_LEGACY_MAGIC


@pytest.fixture(scope="session")
def debian():
    return default_guest()


@pytest.fixture(scope="session")
def image(debian) -> BzImage:
    return read_bzimage(debian.kernel)


def u(data: bytes, fmt: str, offset: int) -> int:
    return struct.unpack_from("<" + fmt, data, offset)[0]


# --- the real Debian bzImage, field by field -------------------------------------------

def test_debian_setup_header_field_by_field(image, debian):
    data, h = image.data, image.header
    # Each field read independently at the offset the boot protocol documents.
    assert h.setup_sects == data[0x1f1] and h.setup_sects > 0
    assert h.syssize == u(data, "I", 0x1f4)
    assert h.boot_flag == u(data, "H", 0x1fe) == 0xAA55
    assert h.jump == u(data, "H", 0x200) and data[0x200] == 0xEB          # jmp short
    assert h.header == data[0x202:0x206] == b"HdrS"
    assert h.version == u(data, "H", 0x206) == 0x020F and h.protocol == "2.15"
    assert h.kernel_version == u(data, "H", 0x20e)
    assert h.loadflags == data[0x211] and h.loadflags & LOADED_HIGH
    assert h.code32_start == u(data, "I", 0x214) == 0x100000
    assert h.initrd_addr_max == u(data, "I", 0x22c) == 0x7fffffff
    assert h.kernel_alignment == u(data, "I", 0x230) == 0x200000
    assert h.relocatable_kernel == data[0x234] == 1
    assert h.xloadflags == u(data, "H", 0x236)
    assert h.xloadflags & XLF_KERNEL_64 and h.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G
    assert h.cmdline_size == u(data, "I", 0x238) == 2047
    assert h.payload_offset == u(data, "I", 0x248)
    assert h.payload_length == u(data, "I", 0x24c)
    assert h.pref_address == u(data, "Q", 0x258) == 0x1000000
    assert h.init_size == u(data, "I", 0x260) and h.init_size > 0x1000000
    assert h.kernel_info_offset == u(data, "I", 0x268)
    # The raw header is what the Launcher copies into boot_params.
    assert 0x202 + data[0x201] == 0x26c
    assert h.raw == data[0x1f1:0x26c]
    # The parts of the file.
    assert image.kernel_offset == (h.setup_sects + 1) * 512
    # Debian signs its kernels for Secure Boot: the signature follows the kernel.
    assert 0 <= len(data) - (image.kernel_offset + image.kernel_size) < 4096
    assert debian.manifest["kernel_release"] in image.version_string


def test_every_field_is_where_setup_field_says(image):
    for offset, name, code in SETUP_HEADER:
        at, fmt = setup_field(name)
        assert at == offset
        assert struct.unpack_from(fmt, image.data, at)[0] == getattr(image.header, name)


# --- the payload and the ELF inside ------------------------------------------------------

def test_debian_payload_is_xz_and_unpacks_to_its_stated_size(image):
    payload = bytes(image.payload)
    assert payload_format(payload) == "xz"
    vmlinux = decompress(payload)
    assert vmlinux[:4] == b"\x7fELF"
    assert len(vmlinux) == u(payload, "I", len(payload) - 4)


def test_debian_vmlinux_segments_entry_and_pvh_note(image, debian):
    assert extract_vmlinux(image) == extract_vmlinux(image)       # cached: same path
    kernel = read_vmlinux(debian.vmlinux)
    assert kernel.entry == image.header.pref_address == 0x1000000   # phys_startup_64
    loads = kernel.segments
    assert len(loads) >= 3
    assert loads[0].paddr == 0x1000000 and loads[0].flags & 1      # text, executable
    assert all(1 << 20 <= s.paddr < s.paddr + s.memsz <= 1 << 32 for s in loads)
    assert all(s.filesz <= s.memsz for s in loads)
    # Segments do not overlap, and the kernel fits in the init_size the header asks for.
    spans = sorted((s.paddr, s.paddr + s.memsz) for s in loads)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] - spans[0][0] <= image.header.init_size
    # The PVH entry is in the text segment, just after startup_64.
    assert kernel.pvh_entry is not None
    assert loads[0].paddr < kernel.pvh_entry < loads[0].paddr + loads[0].filesz
    assert any(n.name == "Xen" and n.type == 18 for n in kernel.notes)
    # A segment's bytes are the file's bytes at its offset.
    raw = debian.vmlinux.read_bytes()
    s = loads[1]
    assert kernel.segment_data(s) == raw[s.offset:s.offset + s.filesz]


def test_open_kernel_tells_bzimage_from_vmlinux(debian, tmp_path):
    assert type(open_kernel(debian.kernel)).__name__ == "BzImage"
    assert type(open_kernel(debian.vmlinux)).__name__ == "Vmlinux"
    text = tmp_path / "notes.txt"
    text.write_text("Dear Hero,\n" * 200)
    with pytest.raises(LguestError, match="not a Linux kernel image"):
        open_kernel(text)
    with pytest.raises(LguestError, match="cannot read"):
        open_kernel(tmp_path / "missing")


# --- each decompressor, on data made here -----------------------------------------------

KERNEL_LIKE = b"".join(struct.pack("<IQ", i, i * 0x9E3779B97F4A7C15 % (1 << 64))
                       for i in range(40000)) + b"\0" * 100000


def size_append(data: bytes) -> bytes:
    return struct.pack("<I", len(data))


def lz4_legacy(data: bytes, block: int) -> bytes:
    out = bytearray(struct.pack("<I", LZ4_LEGACY_MAGIC))
    for i in range(0, len(data), block):
        chunk = lz4.block.compress(data[i:i + block], store_size=False)
        out += struct.pack("<I", len(chunk)) + chunk
    return bytes(out)


def zstd_streamed(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=19, write_content_size=False).compress(data)


PAYLOADS = {
    "gzip": lambda d: gzip.compress(d, mtime=0),                    # gzip carries its own size
    "bzip2": lambda d: bz2.compress(d) + size_append(d),
    "xz": lambda d: lzma.compress(d, check=lzma.CHECK_CRC32,
                                  filters=[{"id": lzma.FILTER_X86},
                                           {"id": lzma.FILTER_LZMA2}]) + size_append(d),
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE) + size_append(d),
    "lz4": lambda d: lz4_legacy(d, 64 << 10) + size_append(d),
    "zstd": lambda d: zstd_streamed(d) + size_append(d),
}


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_decompressor(kind):
    payload = PAYLOADS[kind](KERNEL_LIKE)
    assert payload_format(payload) == kind
    assert decompress(payload) == KERNEL_LIKE


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_truncated_payload_is_refused(kind):
    payload = PAYLOADS[kind](KERNEL_LIKE)
    cut = payload[:len(payload) // 2] + payload[-4:]
    with pytest.raises(LguestError) as e:
        decompress(cut)
    assert "\n" not in str(e.value)


def test_lz4_legacy_with_an_appended_stream():
    half = len(KERNEL_LIKE) // 2
    payload = lz4_legacy(KERNEL_LIKE[:half], 1 << 20) + lz4_legacy(KERNEL_LIKE[half:], 1 << 20)
    assert decompress(payload + size_append(KERNEL_LIKE)) == KERNEL_LIKE


def test_wrong_appended_size_is_refused():
    payload = PAYLOADS["lz4"](KERNEL_LIKE)
    with pytest.raises(LguestError, match="says it holds"):
        decompress(payload[:-4] + struct.pack("<I", 12345))


def test_unknown_and_lzo_payloads_are_refused():
    with pytest.raises(LguestError, match="no compression format"):
        decompress(b"MZ" + b"\0" * 100)
    with pytest.raises(LguestError, match="lzo"):
        decompress(b"\x89LZO\0" + b"\0" * 100)


# --- bad images: one sentence each ------------------------------------------------------

def one_line_error(data: bytes, match: str) -> None:
    with pytest.raises(LguestError, match=match) as e:
        parse_bzimage(data, "bad.img")
    assert "\n" not in str(e.value) and "bad.img" in str(e.value)


def patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into("<" + fmt, out, offset, value)
    return bytes(out)


def test_bad_images_are_refused_in_one_line(image):
    good = image.data
    one_line_error(good[:600], "too short")
    one_line_error(good[:200_000], "truncated")
    one_line_error(patched(good, 0x202, "4s", b"HdrX"), "not a Linux kernel image")
    one_line_error(patched(good, 0x1fe, "H", 0x1234), "not a Linux kernel image")
    one_line_error(("#!/bin/sh\necho I am not a kernel\n" * 100).encode(), "not a Linux kernel")
    one_line_error(patched(good, 0x206, "H", 0x0206), "boot protocol 2.06")
    one_line_error(patched(good, 0x236, "H", image.header.xloadflags & ~XLF_KERNEL_64),
                   "no 64-bit entry point")
    one_line_error(patched(good, 0x24c, "I", image.kernel_size + 1), "no payload")


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=4096))
def test_random_bytes_are_refused_cleanly(data):
    with pytest.raises(LguestError):
        parse_bzimage(data, "random")


@settings(max_examples=200, deadline=None)
@given(st.integers(0x1f1, 0x26b), st.integers(0, 255))
def test_a_damaged_header_is_either_fine_or_refused_cleanly(image, offset, byte):
    data = bytearray(image.data[:0x4000])
    data[offset] = byte
    try:
        parse_bzimage(bytes(data), "damaged")
    except LguestError:
        pass


def elf_header_patched(vmlinux: bytes, offset: int, value: bytes) -> bytes:
    return vmlinux[:offset] + value + vmlinux[offset + len(value):]


def test_bad_vmlinux_files_are_refused(debian, tmp_path):
    head = debian.vmlinux.read_bytes()[:1 << 20]
    cases = {
        "text": (b"hello\n" * 100, "not an ELF file"),
        "i386": (elf_header_patched(head, 18, struct.pack("<H", 3)), "not an x86-64 kernel"),
        "object": (elf_header_patched(head, 16, struct.pack("<H", 1)), "not an executable"),
        "truncated": (head, "truncated|damaged"),
    }
    for name, (data, match) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(LguestError, match=match) as e:
            read_vmlinux(path)
        assert "\n" not in str(e.value)
