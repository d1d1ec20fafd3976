"""Chapter II: our cpio writer and reader, the default guest's initramfs and /init,
the module load order, and the guest cache (manifest, no rebuild, no network)."""
from __future__ import annotations

import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from lguest import LguestError
from lguest.guest import CpioWriter, default_guest, read_cpio
from lguest.guest.initramfs import init_script
from lguest.guest.provision.modules import (VIRTIO_MODULES, depends, module_index, module_name,
                                            module_order, read_module)
from lguest.guest.provision.store import valid_manifest, write_manifest

import lguest.guest.provision.modules as modules_mod


@pytest.fixture(scope="session")
def debian():
    return default_guest()


@pytest.fixture(scope="session")
def archive(debian):
    return {e.name: e for e in read_cpio(debian.initrd.read_bytes())}


# --- cpio: written, read back -------------------------------------------------------------

def test_cpio_round_trip_keeps_every_file_mode_and_symlink():
    w = CpioWriter()
    w.directory("etc", 0o700)
    w.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o600)
    w.file("init", b"#!/bin/sh\n", 0o755)
    w.file("empty", b"")
    w.file("a/deep/dir/abc", b"x" * 5)            # parents made for us
    w.symlink("bin/sh", "/bin/busybox")
    w.char_device("dev/console", 5, 1)
    got = {e.name: e for e in read_cpio(w.getvalue())}
    assert list(got) == ["etc", "etc/passwd", "init", "empty", "a", "a/deep", "a/deep/dir",
                         "a/deep/dir/abc", "bin", "bin/sh", "dev", "dev/console"]
    assert got["etc"].mode == stat.S_IFDIR | 0o700
    assert got["etc/passwd"].mode == stat.S_IFREG | 0o600
    assert got["etc/passwd"].data == b"root:x:0:0::/root:/bin/sh\n"
    assert got["init"].mode == stat.S_IFREG | 0o755
    assert got["empty"].data == b""
    assert got["a/deep"].kind == "dir"
    assert got["bin/sh"].kind == "symlink" and got["bin/sh"].data == b"/bin/busybox"
    assert got["dev/console"].kind == "char" and got["dev/console"].rdev == (5, 1)


def test_cpio_is_deterministic_and_aligned():
    def make():
        w = CpioWriter()
        w.file("x", b"123")
        w.symlink("y", "x")
        return w.getvalue()
    data = make()
    assert data == make()
    assert len(data) % 4 == 0
    assert data.startswith(b"070701") and b"TRAILER!!!\0" in data


names = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters="._-"),
                min_size=1, max_size=40).filter(lambda n: n not in (".", ".."))


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(names, st.tuples(st.binary(max_size=300), st.sampled_from([0o644, 0o755, 0o600])),
                       max_size=12))
def test_cpio_round_trip_of_any_files(files):
    w = CpioWriter()
    for name, (data, mode) in files.items():
        w.file(f"d/{name}", data, mode)
    got = {e.name: e for e in read_cpio(w.getvalue())}
    for name, (data, mode) in files.items():
        assert got[f"d/{name}"].data == data
        assert got[f"d/{name}"].mode == stat.S_IFREG | mode


def test_cpio_reader_refuses_damage():
    w = CpioWriter()
    w.file("f", b"hello")
    data = w.getvalue()
    with pytest.raises(LguestError, match="bad magic"):
        read_cpio(b"PK" + data)
    with pytest.raises(LguestError):
        read_cpio(data[:120])


@pytest.mark.skipif(shutil.which("cpio") is None, reason="the cpio program is not installed")
def test_gnu_cpio_agrees_with_our_archive(tmp_path):
    w = CpioWriter()
    w.file("bin/hello", b"hi\n", 0o755)
    w.symlink("bin/hi", "hello")
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=w.getvalue(),
                             capture_output=True, check=True).stdout.decode().split()
    assert listing == ["bin", "bin/hello", "bin/hi"]
    subprocess.run(["cpio", "-id", "--quiet"], input=w.getvalue(), cwd=tmp_path, check=True)
    assert (tmp_path / "bin/hello").read_bytes() == b"hi\n"
    assert os.readlink(tmp_path / "bin/hi") == "hello"
    assert (tmp_path / "bin/hello").stat().st_mode & 0o777 == 0o755


# --- the default guest's archive ----------------------------------------------------------

def test_default_initramfs_holds_init_busybox_console_and_modules(debian, archive):
    assert archive["init"].data == init_script()
    assert archive["init"].mode == stat.S_IFREG | 0o755
    assert archive["init"].data.startswith(b"#!/bin/sh\n")
    assert archive["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert archive["bin/busybox"].data[:4] == b"\x7fELF"
    assert archive["bin/sh"].kind == "symlink" and archive["bin/sh"].data == b"/bin/busybox"
    for applet in ("bin/mount", "usr/bin/env", "sbin/insmod", "sbin/reboot", "usr/bin/setsid"):
        assert archive[applet].data == b"/bin/busybox", applet
    assert "usr/bin/rpm2cpio" not in archive      # a rare one: the shell runs it unlinked
    assert b"proc /proc proc" in archive["etc/fstab"].data
    assert archive["dev/console"].rdev == (5, 1) and archive["dev/console"].kind == "char"
    for d in ("proc", "sys", "dev", "tmp"):
        assert archive[d].kind == "dir"
    listed = archive["etc/modules"].data.decode().split()
    assert listed == debian.manifest["modules"]
    for name in listed:
        assert archive[f"lib/modules/{name}.ko"].data[:4] == b"\x7fELF"


def test_module_order_respects_every_depends(archive, debian):
    order = archive["etc/modules"].data.decode().split()
    assert set(VIRTIO_MODULES) <= set(order)
    assert len(order) == len(set(order))
    for i, name in enumerate(order):
        needs = depends(archive[f"lib/modules/{name}.ko"].data)
        for dep in needs:
            assert dep in order[:i], f"{name} needs {dep}, which is loaded later or not at all"
    assert "virtio_ring" in order and order.index("virtio_ring") < order.index("virtio_pci")


def test_init_script_is_valid_shell_and_does_its_jobs():
    script = init_script().decode()
    subprocess.run(["sh", "-n", "-c", script], check=True)
    for job in ("mount -a", "mount -t devpts", "/etc/modules", "insmod", "/proc/cmdline",
                "cttyhack", "reboot -f", "arg lguest.exit"):
        assert job in script


# --- modules: names, compression, order on made-up dependencies ---------------------------

def test_module_names_and_compressed_modules(debian, tmp_path):
    assert module_name(tmp_path / "virtio-rng.ko.zst") == "virtio_rng"
    index = module_index(Path(debian.manifest["modules_from"]))
    plain = read_module(index["virtio_net"])
    packed = tmp_path / "virtio_net.ko.xz"
    packed.write_bytes(lzma.compress(plain))
    assert read_module(packed) == plain
    assert sorted(depends(plain)) == ["net_failover", "virtio", "virtio_ring"]


def fake_modules(monkeypatch, graph):
    monkeypatch.setattr(modules_mod, "read_module", lambda path: path)
    monkeypatch.setattr(modules_mod, "depends", lambda name: graph[name])
    return {name: name for name in graph}


def test_module_order_on_a_made_up_graph(monkeypatch):
    graph = {"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": [], "e": ["builtin_one"]}
    index = fake_modules(monkeypatch, graph)
    order = module_order(["a", "e"], index, {"builtin_one"})
    assert order == ["d", "b", "c", "a", "e"]


def test_module_cycles_and_missing_modules_are_reported(monkeypatch):
    index = fake_modules(monkeypatch, {"a": ["b"], "b": ["a"], "c": ["nowhere"]})
    with pytest.raises(LguestError, match="circle: a -> b -> a"):
        module_order(["a"], index)
    with pytest.raises(LguestError, match="no module nowhere"):
        module_order(["c"], index)


# --- the cache: manifest, no rebuild, no network ------------------------------------------

def test_manifest_notices_a_changed_file(tmp_path):
    (tmp_path / "f").write_bytes(b"one")
    write_manifest(tmp_path, {"recipe": "r1"}, {"kernel": tmp_path / "f"})
    assert valid_manifest(tmp_path, "r1")["files"]["kernel"]["size"] == 3
    assert valid_manifest(tmp_path, "r2") is None
    (tmp_path / "f").write_bytes(b"two")
    assert valid_manifest(tmp_path, "r1") is None


def test_second_default_guest_does_no_network_and_no_rebuild(debian, tmp_path, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in debian.kernel.parent.iterdir()}
    manifest = (debian.kernel.parent / "manifest.json").read_text()
    # No apt on the PATH: if the cached guest needed apt (or the network), this would fail.
    monkeypatch.setenv("PATH", str(tmp_path))
    again = default_guest()
    assert again == debian
    assert {p.name: p.stat().st_mtime_ns for p in debian.kernel.parent.iterdir()} == before
    assert (debian.kernel.parent / "manifest.json").read_text() == manifest
    assert json.loads(manifest)["files"]["kernel"]["sha256"]


def test_python_m_lguest_guest_default_reports_the_guest(debian):
    run = subprocess.run([sys.executable, "-m", "lguest.guest", "default"],
                         capture_output=True, text=True, check=True)
    assert str(debian.kernel) in run.stdout and str(debian.initrd) in run.stdout
    assert "downloading" not in run.stderr and "building" not in run.stderr


def test_host_guest_or_a_clear_sentence():
    from lguest.guest import host_guest
    if not os.access(f"/boot/vmlinuz-{os.uname().release}", os.R_OK):
        with pytest.raises(LguestError, match="not readable"):
            host_guest()
    else:
        guest = host_guest()
        assert guest.kernel.exists() and guest.initrd.exists()
