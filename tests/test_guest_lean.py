"""Chapter II: the lean guest kernel.

The first run on a machine builds the kernel from Debian's linux-source (minutes, through
the same code `make lean-guest` runs); after that it comes from the cache at once.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lguest.guest import lean_guest, read_bzimage, read_cpio, read_vmlinux
from lguest.guest.provision.lean import config_key, config_problems, config_settings, lean_config


@pytest.fixture(scope="module")
def lean():
    return lean_guest()


# What the chapter says a guest needs, and what it says must be off.
NEEDED = ["CONFIG_64BIT", "CONFIG_SMP", "CONFIG_X86_MPPARSE", "CONFIG_SERIAL_8250",
          "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_PCI", "CONFIG_PCI_MSI", "CONFIG_VIRTIO_PCI",
          "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_NET", "CONFIG_VIRTIO_CONSOLE",
          "CONFIG_HW_RANDOM_VIRTIO", "CONFIG_BLK_DEV_INITRD", "CONFIG_DEVTMPFS",
          "CONFIG_EXT4_FS", "CONFIG_KVM_GUEST", "CONFIG_PARAVIRT", "CONFIG_PARAVIRT_CLOCK",
          "CONFIG_HYPERVISOR_GUEST", "CONFIG_PVH", "CONFIG_BINFMT_SCRIPT", "CONFIG_TMPFS",
          "CONFIG_PROC_FS", "CONFIG_SYSFS", "CONFIG_KERNEL_LZ4", "CONFIG_NET_9P",
          "CONFIG_NET_9P_VIRTIO", "CONFIG_9P_FS", "CONFIG_OVERLAY_FS"]
OFF = ["CONFIG_MODULES", "CONFIG_FTRACE", "CONFIG_KPROBES", "CONFIG_JUMP_LABEL",
       "CONFIG_SECURITY", "CONFIG_X86_5LEVEL", "CONFIG_RANDOMIZE_BASE", "CONFIG_ACPI"]


def test_fragment_says_what_the_chapter_says():
    wanted = config_settings(lean_config())
    for option in NEEDED:
        assert wanted.get(option) == "y" or option == "CONFIG_PARAVIRT_CLOCK", option
    for option in OFF:
        assert wanted.get(option) == "n", option


def test_built_config_honours_every_line_of_the_fragment(lean):
    built = lean.file("config").read_text()
    assert config_problems(lean_config(), built) == []
    have = config_settings(built)
    for option in NEEDED:
        assert have.get(option) == "y", option
    for option in OFF:
        assert have.get(option, "n") == "n", option


def test_config_problems_catches_a_dropped_option():
    built = "CONFIG_PCI=y\n# CONFIG_MODULES is not set\n"
    assert config_problems("CONFIG_PCI=y\nCONFIG_VIRTIO_NET=y\n# CONFIG_MODULES is not set\n",
                           built) == ["CONFIG_VIRTIO_NET=y (got n)"]


def test_comments_in_the_fragment_do_not_force_a_rebuild():
    config = lean_config()
    moved = "# notebooks/02_guest.md:9999\n\n" + config.replace("# notebooks/", "# moved/")
    assert config_key(moved) == config_key(config)
    assert config_key(config + "CONFIG_IPV6=y\n") != config_key(config)


def test_lean_kernel_is_a_bootable_small_bzimage_with_a_pvh_note(lean):
    image = read_bzimage(lean.kernel)
    assert image.header.version >= 0x020c
    assert len(image.data) < 4_000_000
    kernel = read_vmlinux(lean.vmlinux)
    assert kernel.pvh_entry is not None
    assert kernel.entry == 0x1000000
    archive = {e.name for e in read_cpio(lean.initrd.read_bytes())}
    assert "init" in archive and "bin/busybox" in archive
    assert not any(name.startswith("lib/modules/") for name in archive)
    assert "etc/modules" not in archive


def test_second_make_lean_guest_does_no_rebuild(lean):
    directory = lean.kernel.parent
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    manifest = (directory / "manifest.json").read_text()
    run = subprocess.run([sys.executable, "-m", "lguest.guest", "lean"],
                         capture_output=True, text=True, check=True)
    assert str(lean.kernel) in run.stdout
    assert "building" not in run.stderr
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before
    assert (directory / "manifest.json").read_text() == manifest
    assert json.loads(manifest)["build"]["seconds"] > 0
